package rankfuse

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
)

// KRAdapter and EigenLoRAx modules next to LoRA (mirrors tests/c/kinds.c): a basis built from
// three LoRA adapters with random weights, one adapter per kind, a few AdamW steps each (the
// loss goes down), one mixed batch (LoRA, KRAdapter, EigenLoRAx and base-only rows), save
// (adapters and basis), close, reload, and the same outputs bit for bit; plus the kind query,
// the shapes Info reports, and loadings refused on another basis or without one.
func TestModuleKinds(t *testing.T) {
	const in, out, m, mt, capacity = 48, 40, 12, 8, 4
	const mod = "layers.0.q_proj"
	rt, err := NewRuntime(&RuntimeOptions{NumThreads: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer rt.Close()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	seed := uint64(88172645463325252)
	W := randF32(&seed, out*in, 0.2)
	bias := randF32(&seed, out, 0.1)
	x := randF32(&seed, m*in, 1)
	w, b := mustF32(t, W, out, in), mustF32(t, bias, 1, out)

	// Three LoRA adapters to build a basis from (random factors).
	var srcs []*Adapter
	for i := 0; i < 3; i++ {
		a, err := NewAdapter(fmt.Sprintf("src%d", i))
		must(err)
		defer a.Close()
		l, err := a.AddLora(mod, in, out, capacity, 8, ScalingLoRA, F32DType, uint64(10+i))
		must(err)
		must(l.SetWeights(mustF32(t, randF32(&seed, capacity*in, 0.3), capacity, in),
			mustF32(t, randF32(&seed, out*capacity, 0.3), out, capacity)))
		srcs = append(srcs, a)
	}
	basis, err := BuildEigenBasis(srcs, 6, 2, 7)
	must(err)
	defer basis.Close()
	other, err := BuildEigenBasis(srcs[:2], 6, 2, 8)
	must(err)
	defer other.Close()

	// One adapter per kind.
	al, err := NewAdapter("lora")
	must(err)
	ak, err := NewAdapter("kr")
	must(err)
	ae, err := NewAdapter("eig")
	must(err)
	lora, err := al.AddLora(mod, in, out, capacity, 8, ScalingLoRA, F32DType, 1)
	must(err)
	kr, err := ak.AddKRAdapter(mod, in, out, 2, 2)
	must(err)
	eig, err := ae.AddEigenLoRAx(basis, mod, 3, 1, 3)
	must(err)
	for _, c := range []struct {
		l    *Lora
		want ModuleKind
	}{{lora, ModuleKindLoRA}, {kr, ModuleKindKRAdapter}, {eig, ModuleKindEigenLoRAx}} {
		k, err := c.l.Kind()
		must(err)
		if k != c.want {
			t.Errorf("kind %v, want %v", k, c.want)
		}
	}
	ki, err := kr.Info()
	must(err)
	if ki.InFeatures != in || ki.OutFeatures != out {
		t.Errorf("KRAdapter info %+v", ki)
	}
	ei, err := eig.Info()
	must(err)
	if ei.InFeatures != in || ei.OutFeatures != out || ei.Rank != 8 || ei.Capacity != 3 {
		t.Errorf("EigenLoRAx info %+v: want rank 8 (6 + 2 basis components), capacity 3", ei)
	}

	// Train each a few steps: the loss must go down.
	train := func(l *Lora) (float64, float64) {
		xt := randF32(&seed, mt*in, 1)
		target := randF32(&seed, mt*out, 1)
		y := make([]float32, mt*out)
		dy := make([]float32, mt*out)
		xm, ym, dym := mustF32(t, xt, mt, in), mustF32(t, y, mt, out), mustF32(t, dy, mt, out)
		opts := AdamWOptions{LR: 0.05, Beta1: 0.9, Beta2: 0.999, Eps: 1e-8}
		var first, last float64
		for step := 0; step <= 6; step++ {
			must(rt.Linear(xm, w, &b, []Slot{{Lora: l}}, nil, ym))
			var loss float64
			for i := range y {
				d := y[i] - target[i]
				loss += float64(d) * float64(d)
				dy[i] = 2 * d / float32(mt*out)
			}
			loss /= float64(mt * out)
			if step == 0 {
				first = loss
			}
			last = loss
			if step == 6 {
				break
			}
			must(l.ZeroGrad())
			must(rt.Backward(l, xm, w, dym, 0, BackwardNested, nil))
			must(l.AdamWStep(&opts))
		}
		return first, last
	}
	for _, l := range []*Lora{lora, kr, eig} {
		k, _ := l.Kind()
		l0, l1 := train(l)
		t.Logf("%v: loss %.5f -> %.5f after 6 AdamW steps", k, l0, l1)
		if !(l1 < l0) {
			t.Errorf("%v: loss did not decrease (%g -> %g)", k, l0, l1)
		}
	}
	must(eig.SetRank(7)) // the first 7 of 8 basis components

	serve := func(lora, kr, eig *Lora) []float32 {
		t.Helper()
		rowSlot := make([]int32, m)
		for i := range rowSlot {
			rowSlot[i] = int32(i%4 - 1) // base, LoRA, KRAdapter, EigenLoRAx, ...
		}
		y := make([]float32, m*out)
		must(rt.Linear(mustF32(t, x, m, in), w, &b,
			[]Slot{{Lora: lora}, {Lora: kr, ScaleMult: 0.5}, {Lora: eig}}, rowSlot, mustF32(t, y, m, out)))
		return y
	}
	y0 := serve(lora, kr, eig)
	yb := make([]float32, m*out)
	must(rt.Linear(mustF32(t, x, m, in), w, &b, nil, nil, mustF32(t, yb, m, out)))
	for i := 0; i < m; i++ {
		same := true
		for j := 0; j < out; j++ {
			same = same && y0[i*out+j] == yb[i*out+j]
		}
		if same != (i%4 == 0) {
			t.Errorf("row %d: equal to the base = %v", i, same)
		}
	}

	// Save every kind and the basis, close them all, reload and serve again.
	dir := t.TempDir()
	for name, a := range map[string]*Adapter{"lora": al, "kr": ak, "eig": ae} {
		must(a.SavePEFT(filepath.Join(dir, name)))
		must(a.Close())
	}
	must(basis.Save(filepath.Join(dir, "basis")))
	must(basis.Close())
	if _, err := eig.Kind(); err == nil {
		t.Error("Kind on a module of a closed adapter did not fail")
	}
	if _, err := ae.AddEigenLoRAx(basis, mod, 3, 1, 3); err == nil {
		t.Error("AddEigenLoRAx on a closed adapter and basis did not fail")
	}
	basis, err = rt.LoadEigenBasis(filepath.Join(dir, "basis"))
	must(err)
	defer basis.Close()
	al, err = rt.LoadPEFT(filepath.Join(dir, "lora"))
	must(err)
	defer al.Close()
	ak, err = rt.LoadPEFT(filepath.Join(dir, "kr"))
	must(err)
	defer ak.Close()
	ae, err = rt.LoadEigenLoRAx(basis, filepath.Join(dir, "eig"))
	must(err)
	defer ae.Close()
	var re *Error
	if _, err := rt.LoadEigenLoRAx(other, filepath.Join(dir, "eig")); !errors.As(err, &re) ||
		re.Status != StatusInvalidArgument || !strings.Contains(re.Message, "basis") {
		t.Errorf("loadings on another basis: %v", err)
	}
	if _, err := rt.LoadPEFT(filepath.Join(dir, "eig")); !errors.As(err, &re) ||
		re.Status != StatusInvalidArgument || !strings.Contains(re.Message, "rf_adapter_load_eigenlorax") {
		t.Errorf("an EigenLoRAx folder without its basis: %v", err)
	}
	module := func(a *Adapter) *Lora {
		t.Helper()
		l, err := a.Module(mod)
		must(err)
		return l
	}
	if k, err := module(ak).Kind(); err != nil || k != ModuleKindKRAdapter {
		t.Errorf("reloaded KRAdapter: kind %v, %v", k, err)
	}
	if k, err := module(ae).Kind(); err != nil || k != ModuleKindEigenLoRAx {
		t.Errorf("reloaded EigenLoRAx: kind %v, %v", k, err)
	}
	y1 := serve(module(al), module(ak), module(ae))
	for i := range y0 {
		if y0[i] != y1[i] {
			t.Fatalf("outputs differ after save and reload at %d: %g vs %g", i, y0[i], y1[i])
		}
	}
	if _, err := BuildEigenBasis([]*Adapter{al, nil}, 2, 0, 0); err == nil {
		t.Error("BuildEigenBasis with a nil adapter did not fail")
	}
}
