"""The ctypes declarations (rankfuse/_ffi.py) match include/rankfuse.h exactly: every function,
struct field, opaque type, function-pointer typedef, enum constant and RF_ABI_VERSION. A function added to the header
without a declaration here fails this test; `python bindings/python/rankfuse/_cheader.py
include/rankfuse.h` prints the declarations to paste."""

import ctypes

import pytest

import rankfuse
from rankfuse import _cheader, _ffi
from conftest import HEADER


def drift(h):
    """Every difference between a parsed header and _ffi's tables, as readable lines."""
    ns = vars(_ffi)
    problems = []
    for name, (ret, args) in h.functions.items():
        if name not in _ffi.FUNCTIONS:
            decl = [l for l in _cheader.declaration_lines(h) if f'"{name}"' in l]
            problems.append(f"{name}: not declared in _ffi.FUNCTIONS; add {decl[0].strip()}")
            continue
        restype, argtypes = _ffi.FUNCTIONS[name]
        want_ret = _cheader.ctypes_type(ret, h, ns)
        want_args = [_cheader.ctypes_type(a, h, ns) for a in args]
        if restype is not want_ret:
            problems.append(f"{name}: restype {restype}, header says {ret} -> {want_ret}")
        if len(argtypes) != len(want_args) or any(a is not b for a, b in zip(argtypes, want_args)):
            problems.append(f"{name}: argtypes {argtypes}, header says {args} -> {want_args}")
    for name in _ffi.FUNCTIONS:
        if name not in h.functions:
            problems.append(f"{name}: declared in _ffi.FUNCTIONS but not in the header")
    for name, fields in h.structs.items():
        cls = _ffi.STRUCTS.get(name)
        if cls is None:
            problems.append(f"struct {name}: missing from _ffi.STRUCTS")
            continue
        want = [(f, _cheader.ctypes_type(t, h, ns)) for f, t in fields]
        have = list(cls._fields_)
        if len(have) != len(want) or any(
            hn != wn or ht is not wt for (hn, ht), (wn, wt) in zip(have, want)
        ):
            problems.append(f"struct {name}: fields {have}, header has {want}")
    for name in _ffi.STRUCTS:
        if name not in h.structs:
            problems.append(f"struct {name}: in _ffi.STRUCTS but not in the header")
    for name, (ret, args) in h.funcptrs.items():
        have = _ffi.FUNCPTRS.get(name)
        if have is None or vars(_ffi).get(name) is not have:
            problems.append(f"function pointer {name}: missing; add {_cheader.funcptr_line(name, h)}")
            continue
        want_ret = _cheader.ctypes_type(ret, h, ns)
        want_args = [_cheader.ctypes_type(a, h, ns) for a in args]
        if have._restype_ is not want_ret or list(have._argtypes_) != want_args:
            problems.append(
                f"function pointer {name}: ({have._restype_}, {list(have._argtypes_)}), "
                f"header says {ret} ({args}) -> {_cheader.funcptr_line(name, h)}"
            )
    for name in _ffi.FUNCPTRS:
        if name not in h.funcptrs:
            problems.append(f"function pointer {name}: in _ffi.FUNCPTRS but not in the header")
    if sorted(h.opaque) != sorted(_ffi.OPAQUE):
        problems.append(f"opaque types: header {sorted(h.opaque)}, _ffi {sorted(_ffi.OPAQUE)}")
    if h.enums != _ffi.ENUMS:
        problems.append(f"enums differ: header {h.enums}, _ffi {_ffi.ENUMS}")
    if h.macros.get("RF_ABI_VERSION") != _ffi.ABI_VERSION:
        problems.append(f"RF_ABI_VERSION {h.macros.get('RF_ABI_VERSION')} != {_ffi.ABI_VERSION}")
    return problems


@pytest.fixture(scope="module")
def header_text():
    return HEADER.read_text(encoding="utf-8")


def test_header_matches_ctypes(header_text):
    h = _cheader.parse(header_text)
    assert len(h.functions) >= 50, "the parser found too few prototypes"
    assert "rf_progress_fn" in h.funcptrs, "the parser missed the function-pointer typedef"
    problems = drift(h)
    assert not problems, "include/rankfuse.h and rankfuse/_ffi.py differ:\n" + "\n".join(problems)


def test_library_exports_every_header_function(header_text):
    lib = rankfuse._lib
    missing = [n for n in _cheader.parse(header_text).functions if not hasattr(lib, n)]
    assert not missing, f"{lib._name} lacks {missing}"


def test_struct_sizes_are_the_c_layout():
    # x86-64 / aarch64 LP64 sizes of the header's structs (offsets follow from the fields).
    assert ctypes.sizeof(_ffi.rf_matrix) == 40
    assert ctypes.sizeof(_ffi.rf_lora_info) == 40
    assert ctypes.sizeof(_ffi.rf_lora_slot) == 16
    assert ctypes.sizeof(_ffi.rf_runtime_options) == 32
    assert _ffi.rf_runtime_options.act_quant.offset == 24  # the 0.1 layout ended here
    assert ctypes.sizeof(_ffi.rf_adamw_options) == 24
    assert ctypes.sizeof(_ffi.rf_extract_options) == 64
    assert _ffi.rf_extract_options.seed.offset == 48
    assert ctypes.sizeof(_ffi.rf_elalora_options) == 48


def test_drift_is_detected(header_text):
    """The check itself fails on a changed header (so it cannot pass vacuously)."""
    marker = "#ifdef __cplusplus\n}"
    assert marker in header_text
    added = header_text.replace(
        marker, "rf_error *rf_new_thing(rf_runtime *rt, const float *p, size_t n);\n\n" + marker
    )
    problems = drift(_cheader.parse(added))
    assert len(problems) == 1 and "rf_new_thing" in problems[0]
    assert "(ERR, [P(rf_runtime), P(c_float), c_size_t])" in problems[0]

    changed = header_text.replace(
        "rf_error *rf_lora_set_rank(rf_lora *l, uint32_t rank);",
        "rf_error *rf_lora_set_rank(rf_lora *l, int32_t rank);",
    )
    assert changed != header_text
    problems = drift(_cheader.parse(changed))
    assert len(problems) == 1 and "rf_lora_set_rank: argtypes" in problems[0]

    field = header_text.replace("  int64_t ld;\n} rf_matrix;", "  int32_t ld;\n} rf_matrix;")
    assert field != header_text
    problems = drift(_cheader.parse(field))
    assert len(problems) == 1 and "struct rf_matrix" in problems[0]

    cb = header_text.replace("size_t total, const char *what);", "size_t total, const char *what, int x);")
    assert cb != header_text
    problems = drift(_cheader.parse(cb))
    assert len(problems) == 1 and "function pointer rf_progress_fn" in problems[0]
    assert "c_char_p, c_int)" in problems[0]

    enum = header_text.replace("RF_STATUS_INTERNAL = 11,", "RF_STATUS_INTERNAL = 11,\n  RF_STATUS_NEW = 12,")
    assert enum != header_text
    assert any("enums differ" in p for p in drift(_cheader.parse(enum)))


def test_generator_prints_what_is_missing(header_text):
    assert _cheader.missing_lines(_cheader.parse(header_text), _ffi) == []
    added = header_text.replace(
        "typedef struct rf_weights rf_weights;",
        "typedef struct rf_weights rf_weights;\n\ntypedef struct rf_trainer rf_trainer;\n\n"
        "typedef struct {\n  uint32_t struct_size;\n  const rf_matrix *grad;\n} rf_train_options;",
    ).replace(
        "#ifdef __cplusplus\n}",
        "rf_error *rf_train(rf_trainer *t, const rf_train_options *o);\n\n#ifdef __cplusplus\n}",
    )
    text = "\n".join(_cheader.missing_lines(_cheader.parse(added), _ffi))
    assert "class rf_trainer(ctypes.Structure)" in text
    assert '("grad", P(rf_matrix)),' in text
    assert '"rf_train": (ERR, [P(rf_trainer), P(rf_train_options)]),' in text
    # What it prints is valid Python that defines the new types.
    ns = dict(vars(_ffi))
    exec(compile("import ctypes\n" + "\n".join(
        b for b in _cheader.missing_lines(_cheader.parse(added), _ffi) if b.startswith("# struct") or b.startswith("# opaque")
    ), "<generated>", "exec"), ns)
    assert [f for f, _ in ns["rf_train_options"]._fields_] == ["struct_size", "grad"]


def test_function_pointers_and_macros_parse():
    h = _cheader.parse(
        "#define RF_X 3\n#define RF_F 2.0\n#define RF_S \"a.b\"\n#define RF_L { 8, 16, }\n"
        "typedef int32_t (*rf_cb)(void *user, const rf_cb_arg *const *args);\n"
        "typedef struct rf_cb_arg rf_cb_arg;\ntypedef struct rf_error rf_error;\n"
        "rf_error *rf_run(rf_cb cb, rf_cb *cbs, void *user);\n"
    )
    assert h.macros == {"RF_X": 3, "RF_F": 2.0, "RF_S": "a.b", "RF_L": (8, 16)}
    assert h.funcptrs == {"rf_cb": ("int32_t", ["void *", "const rf_cb_arg *const *"])}
    assert _cheader.funcptr_line("rf_cb", h) == "rf_cb = ctypes.CFUNCTYPE(c_int32, c_void_p, P(P(rf_cb_arg)))"
    assert h.functions["rf_run"] == ("rf_error *", ["rf_cb", "rf_cb *", "void *"])
    assert _cheader.declaration_lines(h) == ['    "rf_run": (ERR, [rf_cb, P(rf_cb), c_void_p]),']


def test_unknown_constructs_fail_loudly():
    with pytest.raises(ValueError):
        _cheader.parse("typedef union { int a; float b; } rf_u;")
    with pytest.raises(ValueError):
        _cheader.parse("#define RF_EXPR (1 << 3)\n")
    with pytest.raises(ValueError):
        _cheader.parse("#pragma once\n")
    with pytest.raises(ValueError):
        _cheader.parse("typedef void (*rf_cb)(void *user);\ntypedef rf_cb rf_cb2;\n")
    with pytest.raises(ValueError):
        _cheader.ctypes_expr("rf_unknown *", _cheader.Header())


def test_q8_activation_runtime():
    # The opt-in mode is accepted and an out-of-range value is refused with its name.
    rt = rankfuse.Runtime(threads=1, act_quant=rankfuse.ActQuant.Q8)
    assert rt.info()["threads"] == 1
    rt.close()
    with pytest.raises(rankfuse.Error, match="act_quant"):
        rankfuse.Runtime(threads=1, act_quant=5)
