#!/usr/bin/env python3
"""Assembles every committed PTX with ptxas for each target SM and writes kernels/REPORT.md.

Usage: ptxas_report.py PTXAS PTX_DIR OUT_MD
For each target the PTX the host loads there is assembled (same rule as
src/backend/cuda/modules.rs `ptx_arch_for_sm`): sm_70..75 <- compute_70, sm_80..89 <- compute_80,
sm_90 <- compute_90. Exits non-zero if ptxas fails. Spills are reported (and counted at the end).
"""
import concurrent.futures
import os
import re
import subprocess
import sys

TARGETS = [70, 72, 75, 80, 86, 87, 89, 90]


def ptx_arch_for_sm(sm):
    if sm >= 90:
        return "compute_90"
    if sm >= 80:
        return "compute_80"
    return "compute_70"


def assemble(ptxas, path, sm):
    r = subprocess.run([ptxas, f"-arch=sm_{sm}", "-v", path, "-o", os.devnull], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"ptxas failed for {path} (sm_{sm}):\n{r.stderr}")
    rows, cur = [], None
    for line in r.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            cur = {"kernel": m.group(1), "stack": 0, "spill_st": 0, "spill_ld": 0, "regs": 0, "smem": 0}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["stack"], cur["spill_st"], cur["spill_ld"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(s.group(1)) if s else 0
    return rows


def main():
    ptxas, ptx_dir, out_md = sys.argv[1:4]
    version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    jobs = []
    for sm in TARGETS:
        arch = ptx_arch_for_sm(sm)
        for f in sorted(os.listdir(ptx_dir)):
            if f.endswith(f".{arch}.ptx"):
                jobs.append((sm, f))
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as ex:
        results = list(ex.map(lambda j: (j, assemble(ptxas, os.path.join(ptx_dir, j[1]), j[0])), jobs))
    lines = [
        "# ptxas report (generated — do not edit)",
        "",
        "Regenerated and checked by `.ci/steps/40-cuda-ptx.sh`: every file in `kernels/ptx/` assembled with",
        f"`ptxas -v` ({version}) for the SM that loads it. Registers per thread, static shared",
        "memory per block (bytes; the decode kernel's x chunk is dynamic and not counted), stack frame and spills",
        "(bytes). Compile-time facts only: nothing here was run on a GPU.",
        "",
    ]
    spills = 0
    by_sm = {}
    for (sm, f), rows in results:
        by_sm.setdefault(sm, []).extend((f, r) for r in rows)
    for sm in TARGETS:
        lines += [f"## sm_{sm} (PTX {ptx_arch_for_sm(sm)})", "", "| kernel | registers | smem | stack | spill stores | spill loads |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for f, r in sorted(by_sm.get(sm, []), key=lambda t: t[1]["kernel"]):
            spills += r["spill_st"] + r["spill_ld"]
            lines.append(f"| {r['kernel']} | {r['regs']} | {r['smem']} | {r['stack']} | {r['spill_st']} | {r['spill_ld']} |")
        lines.append("")
    lines.append(f"Total spill bytes over all kernels and targets: {spills}.")
    with open(out_md, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"ptxas: {len(jobs)} assemblies, {sum(len(r) for _, r in results)} kernel builds, spill bytes {spills}")


if __name__ == "__main__":
    main()
