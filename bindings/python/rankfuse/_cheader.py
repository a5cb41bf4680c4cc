"""A small parser of include/rankfuse.h (cbindgen's output style), for the drift test and to
print the ctypes declarations that rankfuse/_ffi.py lacks:

    python bindings/python/rankfuse/_cheader.py include/rankfuse.h         # what _ffi.py lacks
    python bindings/python/rankfuse/_cheader.py include/rankfuse.h --all   # every FUNCTIONS entry

(Run as a script, it does not import the package, so it works without the built library.)

It understands what the header uses: `typedef enum {...} name;`, `typedef struct {...} name;`,
`typedef struct name name;` (opaque), function-pointer typedefs `typedef R (*name)(args);`,
`#define NAME value` (integer, float, string or `{ int, ... }` list; a bare include guard),
the include/ifdef/ifndef/endif lines, and one-line function prototypes. Anything it cannot map
raises ValueError naming the construct, so a new kind of declaration fails the test instead of
being skipped.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field

_SCALARS = {
    "void": "None",
    "uint8_t": "c_uint8",
    "int8_t": "c_int8",
    "uint16_t": "c_uint16",
    "int16_t": "c_int16",
    "uint32_t": "c_uint32",
    "int32_t": "c_int32",
    "uint64_t": "c_uint64",
    "int64_t": "c_int64",
    "size_t": "c_size_t",
    "float": "c_float",
    "double": "c_double",
    "bool": "c_bool",
    "char": "c_char",
    "int": "c_int",
}


@dataclass
class Header:
    macros: dict = field(default_factory=dict)  # name -> int | float | str | tuple of int
    enums: dict = field(default_factory=dict)  # type name -> {constant: value}
    structs: dict = field(default_factory=dict)  # type name -> [(field, C type)]
    opaque: list = field(default_factory=list)  # type names
    functions: dict = field(default_factory=dict)  # name -> (C return type, [C arg types])
    funcptrs: dict = field(default_factory=dict)  # typedef name -> (C return type, [C arg types])


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def _norm(t: str) -> str:
    """Normalizes a C type: single spaces, '*' attached as ' *'."""
    t = re.sub(r"\s*\*\s*", " *", t.strip())
    return re.sub(r"\s+", " ", t).replace("* *", "**").strip()


def _split_decl(decl: str) -> tuple[str, str]:
    """'const rf_matrix *x' -> ('const rf_matrix *', 'x')."""
    m = re.fullmatch(r"(.*?)([A-Za-z_]\w*)\s*", decl.strip(), flags=re.S)
    if not m or not m.group(1).strip():
        raise ValueError(f"cannot parse declaration {decl!r}")
    return _norm(m.group(1)), m.group(2)


_DIRECTIVES = ("include", "ifndef", "ifdef", "endif", "define")


def _macro_value(name: str, value: str):
    value = value.strip()
    if re.fullmatch(r"-?\d+", value):
        return int(value)
    if re.fullmatch(r"-?\d+\.\d*(?:[eE][-+]?\d+)?f?|-?\d+[eE][-+]?\d+f?", value):
        return float(value.rstrip("f"))
    if re.fullmatch(r'"[^"\\]*"', value):
        return value[1:-1]
    m = re.fullmatch(r"\{\s*((?:-?\d+\s*,\s*)*(?:-?\d+)?)\s*,?\s*\}", value)
    if m:
        return tuple(int(v) for v in re.findall(r"-?\d+", m.group(1)))
    raise ValueError(f"#define {name}: cannot parse the value {value!r}")


def _args(args: str) -> list:
    args = args.strip()
    return [] if args in ("", "void") else [_split_decl(a)[0] for a in args.split(",")]


def parse(text: str) -> Header:
    h = Header()
    body = _strip_comments(text)
    for m in re.finditer(r"^\s*#\s*(\w+)(.*)$", body, flags=re.M):
        directive, rest_of_line = m.group(1), m.group(2).strip()
        if directive not in _DIRECTIVES:
            raise ValueError(f"unparsed preprocessor line: {m.group(0).strip()!r}")
        if directive == "define":
            dm = re.fullmatch(r"(\w+)(?:\s+(.*))?", rest_of_line)
            if not dm:
                raise ValueError(f"unparsed #define: {m.group(0).strip()!r}")
            if dm.group(2) is not None:  # a bare `#define NAME` is the include guard
                h.macros[dm.group(1)] = _macro_value(dm.group(1), dm.group(2))
    body = re.sub(r"^\s*#[^\n]*", " ", body, flags=re.M)
    body = re.sub(r'extern\s+"C"\s*\{', " ", body)
    for m in re.finditer(r"typedef\s+enum\s*\{(.*?)\}\s*(\w+)\s*;", body, flags=re.S):
        consts = {}
        for item in filter(None, (s.strip() for s in m.group(1).split(","))):
            cm = re.fullmatch(r"(\w+)\s*=\s*(-?\d+)", item)
            if not cm:
                raise ValueError(f"enum {m.group(2)}: cannot parse {item!r} (explicit values only)")
            consts[cm.group(1)] = int(cm.group(2))
        h.enums[m.group(2)] = consts
    for m in re.finditer(r"typedef\s+struct\s*\{(.*?)\}\s*(\w+)\s*;", body, flags=re.S):
        fields = []
        for decl in filter(None, (s.strip() for s in m.group(1).split(";"))):
            ctype, name = _split_decl(decl)
            fields.append((name, ctype))
        h.structs[m.group(2)] = fields
    h.opaque = re.findall(r"typedef\s+struct\s+(\w+)\s+\1\s*;", body)
    funcptr = r"typedef\s+([^;{}()]+?)\(\s*\*\s*(\w+)\s*\)\s*\(([^()]*)\)\s*;"
    for m in re.finditer(funcptr, body, flags=re.S):
        h.funcptrs[m.group(2)] = (_norm(m.group(1)), _args(m.group(3)))
    rest = re.sub(r"typedef\s+(enum|struct)\s*\{.*?\}\s*\w+\s*;", " ", body, flags=re.S)
    rest = re.sub(r"typedef\s+struct\s+\w+\s+\w+\s*;", " ", rest)
    rest = re.sub(funcptr, " ", rest, flags=re.S)
    for m in re.finditer(r"([^;{}()]*?)\b(rf_\w+)\s*\(([^()]*)\)\s*;", rest, flags=re.S):
        h.functions[m.group(2)] = (_norm(m.group(1)), _args(m.group(3)))
    leftover = re.sub(r"([^;{}()]*?)\brf_\w+\s*\([^()]*\)\s*;", " ", rest, flags=re.S)
    leftover = re.sub(r"[{}\s]+", " ", leftover).strip()  # the braces of extern "C" { }
    if leftover:
        raise ValueError(f"unparsed text in the header: {leftover[:200]!r}")
    return h


def ctypes_expr(ctype: str, h: Header) -> str:
    """The ctypes expression (as _ffi.py writes it) for a C type of the header."""
    t = ctype.replace("const ", "").strip()
    stars = t.count("*")
    base = t.replace("*", "").strip()
    if base == "char" and stars >= 1:  # char strings
        expr = "c_char_p" if ctype.startswith("const char") else "P(c_char)"
        stars -= 1
    elif base == "void" and stars >= 1:
        expr = "c_void_p"
        stars -= 1
    elif base in _SCALARS:
        expr = _SCALARS[base]
    elif base in h.enums:
        expr = "c_enum"
    elif base in h.structs or base in h.opaque or base in h.funcptrs:
        expr = base  # a function-pointer typedef is a CFUNCTYPE of the same name in _ffi
    else:
        raise ValueError(f"no ctypes mapping for C type {ctype!r}")
    for _ in range(stars):
        expr = f"P({expr})"
    return expr


def ctypes_type(ctype: str, h: Header, ns: dict):
    """The ctypes type object for a C type, evaluated in namespace `ns` (rankfuse._ffi)."""
    expr = ctypes_expr(ctype, h)
    return eval(expr, dict(ns))  # noqa: S307 - the expression is built above from a fixed grammar


def funcptr_line(name: str, h: Header) -> str:
    """`name = ctypes.CFUNCTYPE(restype, *argtypes)` for a function-pointer typedef."""
    ret, args = h.funcptrs[name]
    return f"{name} = ctypes.CFUNCTYPE({', '.join(ctypes_expr(t, h) for t in [ret] + args)})"


def declaration_lines(h: Header) -> list[str]:
    out = []
    for name, (ret, args) in h.functions.items():
        r = ctypes_expr(ret, h)
        r = "ERR" if r == "P(rf_error)" else r
        a = ", ".join(ctypes_expr(x, h) for x in args)
        out.append(f'    "{name}": ({r}, [{a}]),')
    return out


def missing_lines(h: Header, ffi) -> list[str]:
    """Declarations of everything in the header that the module `ffi` (rankfuse._ffi) lacks,
    in the header's order, ready to paste (each block says where)."""
    out = []
    for name in h.opaque:
        if name not in ffi.OPAQUE:
            out.append(f"# opaque handle: add the class and list it in OPAQUE\nclass {name}(ctypes.Structure):\n    pass\n")
    for name, consts in h.enums.items():
        if ffi.ENUMS.get(name) != consts:
            body = ", ".join(f'"{k}": {v}' for k, v in consts.items())
            out.append(f'# ENUMS entry (replace or add)\n    "{name}": {{{body}}},\n')
    for name in h.funcptrs:
        if name not in ffi.FUNCPTRS:
            out.append(f"# function-pointer type: add it and list it in FUNCPTRS\n{funcptr_line(name, h)}\n")
    for name, fields in h.structs.items():
        if name not in ffi.STRUCTS:
            lines = [f"# struct: add the class and list it in STRUCTS\nclass {name}(ctypes.Structure):",
                     "    _fields_ = ["]
            lines += [f'        ("{f}", {ctypes_expr(t, h)}),' for f, t in fields]
            out.append("\n".join(lines + ["    ]\n"]))
    decls = dict(zip(h.functions, declaration_lines(h)))
    new = [decls[n] for n in h.functions if n not in ffi.FUNCTIONS]
    if new:
        out.append("# FUNCTIONS entries\n" + "\n".join(new))
    return out


def _load_ffi_by_path():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).with_name("_ffi.py")
    spec = importlib.util.spec_from_file_location("rankfuse_ffi_standalone", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--all"]
    if len(args) != 1:
        sys.exit("usage: python bindings/python/rankfuse/_cheader.py include/rankfuse.h [--all]")
    with open(args[0], encoding="utf-8") as f:
        header = parse(f.read())
    if "--all" in sys.argv:
        print("\n".join(declaration_lines(header)))
    else:
        blocks = missing_lines(header, _load_ffi_by_path())
        print("\n".join(blocks) if blocks else "# rankfuse/_ffi.py declares everything in the header")
