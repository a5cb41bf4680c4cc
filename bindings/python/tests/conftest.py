from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
FIXTURE = REPO / "tests" / "fixtures" / "peft-tiny"
HEADER = REPO / "include" / "rankfuse.h"

MODULES = [
    f"layers.{b}.{m}"
    for b in (0, 1)
    for m in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
]


@pytest.fixture
def rt():
    import rankfuse

    with rankfuse.Runtime(threads=2) as r:
        yield r


@pytest.fixture
def io(rt):
    with rt.open_weights(FIXTURE / "io.safetensors") as w:
        yield w


@pytest.fixture
def base(rt):
    with rt.open_weights(FIXTURE / "base.safetensors") as w:
        yield w
