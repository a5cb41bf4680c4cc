"""Writes tests/fixtures/gguf-adapter/llamacpp/: a PEFT LoRA for the tiny random Llama of
tests/llama/interop.py (peft/) and the GGUF adapter llama.cpp's own convert_lora_to_gguf.py makes
of it (convert_lora_to_gguf.gguf), so `cargo test` reads a file written by llama.cpp's converter
without torch or llama.cpp (tests/gguf_adapter.rs).

Usage: python scripts/make_llamacpp_lora_fixture.py <vendored llama.cpp dir>
(the llama-cpp-python 0.3.16 sdist's vendor/llama.cpp; needs torch, transformers, mistral_common
and its gguf-py installed).
"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

root = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(root / "tests" / "llama"))
import interop  # noqa: E402

llama_cpp = Path(sys.argv[1])
out = root / "tests" / "fixtures" / "gguf-adapter" / "llamacpp"
out.mkdir(parents=True, exist_ok=True)
with tempfile.TemporaryDirectory() as t:
    t = Path(t)
    model = interop.hf_model()
    hf = t / "hf"
    hf.mkdir()
    interop.write_st(hf / "model.safetensors", model)
    (hf / "config.json").write_text(__import__("json").dumps(interop.hf_config(), indent=2))
    interop.peft_adapter(model, t / "peft")
    subprocess.run(
        [sys.executable, str(llama_cpp / "convert_lora_to_gguf.py"), "--outtype", "f32",
         "--base", str(hf), "--outfile", str(out / "convert_lora_to_gguf.gguf"), str(t / "peft")],
        check=True, stdout=subprocess.DEVNULL)
    if (out / "peft").exists():
        shutil.rmtree(out / "peft")
    shutil.copytree(t / "peft", out / "peft")
    shutil.copy(hf / "config.json", out / "config.json")
print("wrote", out)
