#!/usr/bin/env python3
"""Compiles kernels/*.cu to PTX with NVRTC through ctypes (no nvcc needed).

Usage: nvrtc_ptx.py LIBNVRTC OUT_DIR ARCH... (ARCH like compute_70)
Writes OUT_DIR/<stem>.<arch>.ptx for every kernels/*.cu and every ARCH. Options are fixed here so
the output is reproducible: the CI step regenerates and compares byte for byte.
"""
import ctypes
import os
import sys

# Kept minimal and explicit: fmad on (the default), no fast math, no debug info.
OPTIONS = ["-std=c++17", "--fmad=true"]


def check(lib, res, what, prog=None):
    if res != 0:
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        msg = lib.nvrtcGetErrorString(res).decode()
        log = ""
        if prog is not None:
            n = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
            buf = ctypes.create_string_buffer(n.value)
            lib.nvrtcGetProgramLog(prog, buf)
            log = buf.value.decode(errors="replace")
        sys.exit(f"nvrtc: {what}: {msg}\n{log}")


def compile_one(lib, src_path, arch, include_dir):
    with open(src_path, "rb") as f:
        src = f.read()
    prog = ctypes.c_void_p()
    name = os.path.basename(src_path).encode()
    check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), src, name, 0, None, None), f"create {src_path}")
    opts = [f"--gpu-architecture={arch}", f"-I{include_dir}"] + OPTIONS
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    res = lib.nvrtcCompileProgram(prog, len(opts), arr)
    # Warnings are errors: the log must be empty.
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    buf = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, buf)
    log = buf.value.decode(errors="replace").strip()
    check(lib, res, f"compile {src_path} for {arch}", prog)
    if log:
        sys.exit(f"nvrtc: {src_path} ({arch}) compiled with diagnostics:\n{log}")
    size = ctypes.c_size_t()
    check(lib, lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "ptx size", prog)
    ptx = ctypes.create_string_buffer(size.value)
    check(lib, lib.nvrtcGetPTX(prog, ptx), "ptx", prog)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return ptx.value.decode()


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    lib = ctypes.CDLL(sys.argv[1])
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    out_dir = sys.argv[2]
    archs = sys.argv[3:]
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(f for f in os.listdir(here) if f.endswith(".cu"))
    os.makedirs(out_dir, exist_ok=True)
    for src in sources:
        for arch in archs:
            ptx = compile_one(lib, os.path.join(here, src), arch, here)
            if ".entry" not in ptx:
                continue  # e.g. the tensor-core kernels in the compute_70 build (guarded out)
            out = os.path.join(out_dir, f"{src[:-3]}.{arch}.ptx")
            with open(out, "w") as f:
                f.write(ptx)
    print(f"nvrtc {major.value}.{minor.value}: {len(sources)} sources x {len(archs)} archs -> {out_dir}")


if __name__ == "__main__":
    main()
