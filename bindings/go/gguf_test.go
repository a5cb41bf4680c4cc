package rankfuse

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"
)

// PEFT -> GGUF -> load: GGUF names, the architecture kept, PEFT's outputs; broken files and
// missing options are errors naming what is wrong.
func TestGGUFAdapter(t *testing.T) {
	rt, err := NewRuntime(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer rt.Close()
	a, err := rt.LoadPEFT(filepath.Join(fixture, "adapters", "lora-r8"))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	out := filepath.Join(t.TempDir(), "a.gguf")
	var e *Error
	if err := a.SaveGGUF(out, GGUFSaveOptions{Architecture: "llama"}); !errors.As(err, &e) || !strings.Contains(e.Message, "n_head") {
		t.Fatalf("llama q/k without head counts: %v", err)
	}
	if err := a.SaveGGUF(out, GGUFSaveOptions{Architecture: "qwen2"}); err != nil {
		t.Fatal(err)
	}
	g, err := rt.LoadGGUF(out)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	if arch, err := g.Architecture(); err != nil || arch != "qwen2" {
		t.Fatalf("architecture %q, %v", arch, err)
	}
	if _, err := g.Module("blk.1.ffn_down"); err != nil {
		t.Fatal(err)
	}
	_, err = rt.LoadGGUF("../../tests/fixtures/gguf-adapter/rank-mismatch.gguf")
	if !errors.As(err, &e) || e.Status != StatusShape || !strings.Contains(e.Message, "blk.0.attn_q.weight.lora_b") {
		t.Fatalf("rank mismatch: %v", err)
	}
}
