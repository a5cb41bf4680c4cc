package rankfuse

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strings"
	"sync"
	"testing"
)

const fixture = "../../tests/fixtures/peft-tiny"

var modules = []string{
	"layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj",
	"layers.0.self_attn.o_proj", "layers.0.mlp.gate_proj", "layers.0.mlp.up_proj",
	"layers.0.mlp.down_proj", "layers.1.self_attn.q_proj", "layers.1.self_attn.k_proj",
	"layers.1.self_attn.v_proj", "layers.1.self_attn.o_proj", "layers.1.mlp.gate_proj",
	"layers.1.mlp.up_proj", "layers.1.mlp.down_proj",
}

type env struct {
	rt       *Runtime
	base, io *Weights
	hasBias  map[string]bool
}

func open(t *testing.T, baseFile string) *env {
	t.Helper()
	rt, err := NewRuntime(&RuntimeOptions{NumThreads: 2})
	if err != nil {
		t.Fatal(err)
	}
	base, err := rt.OpenWeights(filepath.Join(fixture, baseFile))
	if err != nil {
		t.Fatal(err)
	}
	io, err := rt.OpenWeights(filepath.Join(fixture, "io.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	names, err := base.Names()
	if err != nil {
		t.Fatal(err)
	}
	e := &env{rt: rt, base: base, io: io, hasBias: map[string]bool{}}
	for _, n := range names {
		if strings.HasSuffix(n, ".bias") {
			e.hasBias[strings.TrimSuffix(n, ".bias")] = true
		}
	}
	t.Cleanup(func() {
		// Children first, then the runtime; every Close is idempotent.
		e.base.Close()
		e.io.Close()
		e.rt.Close()
	})
	return e
}

func (e *env) adapter(t *testing.T, name string) *Adapter {
	t.Helper()
	a, err := e.rt.LoadPEFT(filepath.Join(fixture, "adapters", name))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	return a
}

func (e *env) get(t *testing.T, w *Weights, name string) Matrix {
	t.Helper()
	m, err := w.Get(name)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// goF32 copies a tensor into Go memory (so Linear sees a Go slice, the zero-copy slice path).
func (e *env) goF32(t *testing.T, w *Weights, name string) ([]float32, Matrix) {
	t.Helper()
	s, err := e.get(t, w, name).Float32s()
	if err != nil {
		t.Fatal(err)
	}
	m := e.get(t, w, name)
	v, err := F32(s, m.Rows, m.Cols, 0)
	if err != nil {
		t.Fatal(err)
	}
	return s, v
}

// run computes module m with the given slots into a Go []float32.
func (e *env) run(t *testing.T, m string, x Matrix, slots []Slot, rowSlot []int32) []float32 {
	t.Helper()
	w := e.get(t, e.base, m+".weight")
	var bias *Matrix
	if e.hasBias[m] {
		b := e.get(t, e.base, m+".bias")
		bias = &b
	}
	y := make([]float32, x.Rows*w.Rows)
	ym, err := F32(y, x.Rows, w.Rows, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.rt.Linear(x, w, bias, slots, rowSlot, ym); err != nil {
		t.Fatalf("%s: %v", m, err)
	}
	return y
}

// compare checks |got - ref| <= atol + rtol*|ref| element-wise; returns the max |diff|.
func compare(t *testing.T, what string, got, ref []float32, atol, rtol float64) float64 {
	t.Helper()
	if len(got) != len(ref) {
		t.Fatalf("%s: %d values, reference has %d", what, len(got), len(ref))
	}
	worst := 0.0
	for i := range ref {
		d := math.Abs(float64(got[i]) - float64(ref[i]))
		worst = math.Max(worst, d)
		if !(d <= atol+rtol*math.Abs(float64(ref[i]))) {
			t.Fatalf("%s: element %d: got %g, reference %g (|diff| %g)", what, i, got[i], ref[i], d)
		}
	}
	return worst
}

func TestVersion(t *testing.T) {
	if ABIVersion() != HeaderABIVersion {
		t.Fatalf("library ABI %d, header ABI %d", ABIVersion(), HeaderABIVersion)
	}
	if !regexp.MustCompile(`^\d+\.\d+\.\d+$`).MatchString(Version()) {
		t.Fatalf("version %q is not MAJOR.MINOR.PATCH", Version())
	}
	e := open(t, "base.safetensors")
	info, err := e.rt.Info()
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]interface{}
	if err := json.Unmarshal([]byte(info), &m); err != nil {
		t.Fatalf("info is not JSON: %v: %s", err, info)
	}
	if m["version"] != Version() || m["threads"] != float64(2) {
		t.Fatalf("info %s: want version %s and threads 2", info, Version())
	}
}

// The opt-in Q8 activation mode is accepted; a value that is not an rf_act_quant is refused.
func TestActQuantOption(t *testing.T) {
	rt, err := NewRuntime(&RuntimeOptions{NumThreads: 1, ActQuant: ActQuantQ8})
	if err != nil {
		t.Fatal(err)
	}
	rt.Close()
	_, err = NewRuntime(&RuntimeOptions{NumThreads: 1, ActQuant: 9})
	var e *Error
	if !errors.As(err, &e) || e.Status != StatusInvalidArgument || !strings.Contains(e.Message, "act_quant") {
		t.Fatalf("act_quant 9: got %v", err)
	}
}

// Every module of every fixture adapter, f32, against PEFT's own outputs.
func TestFixtureParity(t *testing.T) {
	e := open(t, "base.safetensors")
	for _, name := range []string{"lora-r8", "rslora-pattern", "lora-r64"} {
		a := e.adapter(t, name)
		if a.ModuleCount() != len(modules) {
			t.Fatalf("%s: %d modules, want %d", name, a.ModuleCount(), len(modules))
		}
		worst := 0.0
		for _, m := range modules {
			l, err := a.Module(m)
			if err != nil {
				t.Fatal(err)
			}
			_, x := e.goF32(t, e.io, "x."+m)
			y := e.run(t, m, x, []Slot{{Lora: l}}, nil)
			ref, _ := e.goF32(t, e.io, "y."+name+"."+m)
			worst = math.Max(worst, compare(t, name+" "+m, y, ref, 1e-4, 1e-4))
		}
		t.Logf("%s: 14 modules, max |y - y_peft| = %.3g", name, worst)
	}
}

func toBF16(f float32) uint16 {
	b := math.Float32bits(f)
	return uint16((b + 0x7fff + ((b >> 16) & 1)) >> 16)
}

// bf16 base weights (a view of the mapping) and bf16 x (a Go []uint16).
func TestBF16(t *testing.T) {
	e := open(t, "base-bf16.safetensors")
	a := e.adapter(t, "lora-r8")
	for _, m := range modules {
		if w := e.get(t, e.base, m+".weight"); w.DType != BF16DType {
			t.Fatalf("%s: base-bf16 weight is %s", m, w.DType)
		}
		l, err := a.Module(m)
		if err != nil {
			t.Fatal(err)
		}
		xs, xm := e.goF32(t, e.io, "x."+m)
		xb := make([]uint16, len(xs))
		for i, v := range xs {
			xb[i] = toBF16(v)
		}
		x, err := BF16(xb, xm.Rows, xm.Cols, 0)
		if err != nil {
			t.Fatal(err)
		}
		y := e.run(t, m, x, []Slot{{Lora: l}}, nil)
		ref, _ := e.goF32(t, e.io, "y.lora-r8."+m)
		compare(t, "bf16 "+m, y, ref, 5e-2, 2e-2)
	}
}

// A mixed batch: rows pick different adapters or none.
func TestMixedBatch(t *testing.T) {
	e := open(t, "base.safetensors")
	m := "layers.0.mlp.up_proj"
	l8, err := e.adapter(t, "lora-r8").Module(m)
	if err != nil {
		t.Fatal(err)
	}
	lrs, err := e.adapter(t, "rslora-pattern").Module(m)
	if err != nil {
		t.Fatal(err)
	}
	_, x := e.goF32(t, e.io, "x."+m)
	rowSlot := []int32{0, -1, 1, 0, 1}
	y := e.run(t, m, x, []Slot{{Lora: l8}, {Lora: lrs}}, rowSlot)
	refs := map[int32][]float32{}
	for s, n := range map[int32]string{0: "y.lora-r8.", 1: "y.rslora-pattern.", -1: "y_base."} {
		refs[s], _ = e.goF32(t, e.io, n+m)
	}
	cols := len(y) / x.Rows
	for i, s := range rowSlot {
		compare(t, m+" row", y[i*cols:(i+1)*cols], refs[s][i*cols:(i+1)*cols], 1e-4, 1e-4)
	}
}

func TestLoraInfoRankAndSave(t *testing.T) {
	e := open(t, "base.safetensors")
	rs := e.adapter(t, "rslora-pattern")
	l, err := rs.Module("layers.0.self_attn.q_proj")
	if err != nil {
		t.Fatal(err)
	}
	info, err := l.Info()
	if err != nil {
		t.Fatal(err)
	}
	want := LoraInfo{InFeatures: 256, OutFeatures: 64, Capacity: 4, Rank: 4, Alpha: 16, Scale: 8,
		Scaling: ScalingRSLoRA, DType: F32DType}
	if info != want {
		t.Fatalf("info %+v, want %+v", info, want)
	}

	// DyLoRA-style truncation: rank 8 of the r=64 adapter is the fixture's trunc8 output.
	a := e.adapter(t, "lora-r64")
	m := "layers.1.mlp.gate_proj"
	l64, err := a.Module(m)
	if err != nil {
		t.Fatal(err)
	}
	if err := l64.SetRank(8); err != nil {
		t.Fatal(err)
	}
	_, x := e.goF32(t, e.io, "x."+m)
	ref, _ := e.goF32(t, e.io, "y.lora-r64.trunc8."+m)
	compare(t, "trunc8 via SetRank", e.run(t, m, x, []Slot{{Lora: l64}}, nil), ref, 1e-4, 1e-4)
	if err := l64.SetRank(64); err != nil {
		t.Fatal(err)
	}
	compare(t, "trunc8 via Slot.Rank", e.run(t, m, x, []Slot{{Lora: l64, Rank: 8}}, nil), ref, 1e-4, 1e-4)

	// Save as PEFT and load back: same outputs.
	dir := filepath.Join(t.TempDir(), "saved")
	if err := e.adapter(t, "lora-r8").SavePEFT(dir); err != nil {
		t.Fatal(err)
	}
	back, err := e.rt.LoadPEFT(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer back.Close()
	names, err := back.ModuleNames()
	if err != nil {
		t.Fatal(err)
	}
	sorted := append([]string(nil), modules...)
	sort.Strings(sorted)
	if strings.Join(names, ",") != strings.Join(sorted, ",") {
		t.Fatalf("reloaded modules %v", names)
	}
	lb, err := back.Module(m)
	if err != nil {
		t.Fatal(err)
	}
	ref8, _ := e.goF32(t, e.io, "y.lora-r8."+m)
	compare(t, "saved lora-r8", e.run(t, m, x, []Slot{{Lora: lb}}, nil), ref8, 1e-4, 1e-4)
}

func TestErrors(t *testing.T) {
	e := open(t, "base.safetensors")
	a := e.adapter(t, "lora-r8")

	_, err := a.Module("layers.9.nope")
	var re *Error
	if !errors.As(err, &re) || re.Status != StatusNotFound || !strings.Contains(re.Message, "layers.9.nope") {
		t.Fatalf("missing module: got %v", err)
	}
	if !errors.Is(err, &Error{Status: StatusNotFound}) {
		t.Fatalf("errors.Is by status failed for %v", err)
	}

	missing := filepath.Join(t.TempDir(), "missing.safetensors")
	_, err = e.rt.OpenWeights(missing)
	if !errors.As(err, &re) || re.Status == StatusOK || !strings.Contains(re.Message, missing) {
		t.Fatalf("missing file: got %v", err)
	}

	// A shape mismatch found by the library: x has 172 columns, q_proj's weight 256.
	_, x := e.goF32(t, e.io, "x.layers.0.mlp.down_proj")
	w := e.get(t, e.base, "layers.0.self_attn.q_proj.weight")
	y := make([]float32, x.Rows*w.Rows)
	ym, _ := F32(y, x.Rows, w.Rows, 0)
	err = e.rt.Linear(x, w, nil, nil, nil, ym)
	if !errors.As(err, &re) || re.Status != StatusShape || re.Message == "" {
		t.Fatalf("shape mismatch: got %v", err)
	}
	t.Logf("shape mismatch surfaces as: %v", err)

	// Checks on the Go side: a slice too small for its shape, a read-only y, rowSlot length.
	if _, err := F32(make([]float32, 10), 3, 4, 0); !errors.As(err, &re) || re.Status != StatusShape {
		t.Fatalf("small slice: got %v", err)
	}
	if err := e.rt.Linear(x, w, nil, nil, nil, w); !errors.As(err, &re) || re.Status != StatusInvalidArgument {
		t.Fatalf("read-only y: got %v", err)
	}
	if err := e.rt.Linear(x, w, nil, nil, []int32{0}, ym); !errors.As(err, &re) || re.Status != StatusShape {
		t.Fatalf("rowSlot length: got %v", err)
	}

	// A rank over capacity.
	l, err := a.Module("layers.0.mlp.up_proj")
	if err != nil {
		t.Fatal(err)
	}
	if err := l.SetRank(9); !errors.As(err, &re) || re.Status != StatusInvalidArgument {
		t.Fatalf("rank 9 of capacity 8: got %v", err)
	}

	// Use after Close is an error, never a crash; Close is idempotent.
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Info(); !errors.As(err, &re) || !strings.Contains(re.Message, "closed") {
		t.Fatalf("lora of a closed adapter: got %v", err)
	}
	view := e.get(t, e.io, "x.layers.0.mlp.up_proj")
	e.io.Close()
	if _, err := view.Float32s(); err == nil {
		t.Fatal("a view of closed weights was readable")
	}
	// The runtime's C object outlives Close while weights made with it are open.
	if err := e.rt.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := e.rt.OpenWeights(missing); !errors.As(err, &re) || !strings.Contains(re.Message, "closed") {
		t.Fatalf("closed runtime: got %v", err)
	}
	if e.base.Count() == 0 {
		t.Fatal("weights made with a closed runtime stopped working before their own Close")
	}
}

// Objects dropped without Close are freed by finalizers (children before their runtime).
func TestFinalizers(t *testing.T) {
	for i := 0; i < 3; i++ {
		func() {
			rt, err := NewRuntime(nil)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := rt.OpenWeights(filepath.Join(fixture, "base.safetensors")); err != nil {
				t.Fatal(err)
			}
			if _, err := rt.LoadPEFT(filepath.Join(fixture, "adapters", "lora-r8")); err != nil {
				t.Fatal(err)
			}
		}()
		runtime.GC()
		runtime.GC()
	}
}

// Every function of include/rankfuse.h is called by this package, unless listed in
// unwrapped.txt (one name per line; each skipped name is printed).
func TestHeaderCoverage(t *testing.T) {
	header, err := os.ReadFile("../../include/rankfuse.h")
	if err != nil {
		t.Fatal(err)
	}
	protos := regexp.MustCompile(`(?m)^[A-Za-z_][\w \*]*?\b(rf_\w+)\(`).FindAllSubmatch(header, -1)
	if len(protos) < 20 {
		t.Fatalf("found only %d prototypes in rankfuse.h: the parser is out of date", len(protos))
	}
	// Every non-test Go file of the package counts as wrapping.
	var src []byte
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		src = append(src, b...)
	}
	skip := map[string]bool{}
	if f, err := os.Open("unwrapped.txt"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if n := strings.TrimSpace(sc.Text()); n != "" && !strings.HasPrefix(n, "#") {
				skip[n] = true
			}
		}
		f.Close()
	}
	var missing []string
	inHeader := map[string]bool{}
	for _, p := range protos {
		name := string(p[1])
		inHeader[name] = true
		if regexp.MustCompile(`\b` + name + `\(`).Match(src) {
			if skip[name] {
				t.Errorf("%s is wrapped in rankfuse.go: remove it from unwrapped.txt", name)
			}
			continue
		}
		if skip[name] {
			t.Logf("SKIP %s: listed in unwrapped.txt, not wrapped in Go yet", name)
			continue
		}
		missing = append(missing, name)
	}
	for name := range skip {
		if !inHeader[name] {
			t.Errorf("unwrapped.txt lists %s, which rankfuse.h does not declare", name)
		}
	}
	if len(missing) > 0 {
		t.Fatalf("functions of rankfuse.h with no Go wrapper: %v (wrap them in the package, "+
			"or list them in unwrapped.txt)", missing)
	}
}

// Many goroutines share one runtime, weights and adapter (the C ABI allows concurrent rf_linear).
func TestConcurrentLinear(t *testing.T) {
	e := open(t, "base.safetensors")
	a := e.adapter(t, "lora-r8")
	type job struct {
		x   Matrix
		ref []float32
		l   *Lora
		m   string
	}
	var jobs []job
	for _, m := range modules {
		l, err := a.Module(m)
		if err != nil {
			t.Fatal(err)
		}
		_, x := e.goF32(t, e.io, "x."+m)
		ref, _ := e.goF32(t, e.io, "y.lora-r8."+m)
		jobs = append(jobs, job{x, ref, l, m})
	}
	errs := make(chan error, 4*len(jobs))
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for _, j := range jobs {
				w, err := e.base.Get(j.m + ".weight")
				if err != nil {
					errs <- err
					return
				}
				var bias *Matrix
				if e.hasBias[j.m] {
					b, _ := e.base.Get(j.m + ".bias")
					bias = &b
				}
				y := make([]float32, len(j.ref))
				ym, _ := F32(y, j.x.Rows, w.Rows, 0)
				if err := e.rt.Linear(j.x, w, bias, []Slot{{Lora: j.l}}, nil, ym); err != nil {
					errs <- err
					return
				}
				for i := range y {
					if d := math.Abs(float64(y[i] - j.ref[i])); d > 1e-4+1e-4*math.Abs(float64(j.ref[i])) {
						errs <- fmt.Errorf("%s: element %d off by %g", j.m, i, d)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// matMulT returns a (m x k) times b^T (n x k): m x n.
func matMulT(a []float32, m, k int, b []float32, n int) []float32 {
	out := make([]float32, m*n)
	for i := 0; i < m; i++ {
		for j := 0; j < n; j++ {
			var s float64
			for p := 0; p < k; p++ {
				s += float64(a[i*k+p]) * float64(b[j*k+p])
			}
			out[i*n+j] = float32(s)
		}
	}
	return out
}

func mustF32(t *testing.T, s []float32, rows, cols int) Matrix {
	t.Helper()
	m, err := F32(s, rows, cols, 0)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func randF32(seed *uint64, n int, amp float32) []float32 {
	out := make([]float32, n)
	for i := range out {
		*seed = *seed*6364136223846793005 + 1442695040888963407
		out[i] = amp * (float32(*seed>>40)/float32(1<<24)*2 - 1)
	}
	return out
}

// A trainable module from NewAdapter: weights round trip, merge/unmerge against Linear,
// backward's dx against a Go reference, masks, and a few AdamW steps that lower the loss.
func TestTrainingAndMerge(t *testing.T) {
	rt, err := NewRuntime(&RuntimeOptions{NumThreads: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer rt.Close()
	a, err := NewAdapter("go-train")
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	const m, k, n, capacity = 6, 7, 5, 4
	l, err := a.AddLora("layer", k, n, capacity, 8, ScalingLoRA, F32DType, 7)
	if err != nil {
		t.Fatal(err)
	}
	info, err := l.Info()
	if err != nil {
		t.Fatal(err)
	}
	if info.Capacity != capacity || info.Rank != capacity || info.Scale != 2 || info.InFeatures != k {
		t.Fatalf("info %+v", info)
	}
	am, bm, err := l.Weights()
	if err != nil {
		t.Fatal(err)
	}
	if am.Rows != capacity || am.Cols != k || bm.Rows != n || bm.Cols != capacity {
		t.Fatalf("A %dx%d, B %dx%d", am.Rows, am.Cols, bm.Rows, bm.Cols)
	}
	b0, _ := bm.Float32s()
	for _, v := range b0 {
		if v != 0 {
			t.Fatalf("B should start at zero, has %g", v)
		}
	}
	seed := uint64(1)
	A := randF32(&seed, capacity*k, 0.5)
	B := randF32(&seed, n*capacity, 0.5)
	W := randF32(&seed, n*k, 1)
	x := randF32(&seed, m*k, 1)
	if err := l.SetWeights(mustF32(t, A, capacity, k), mustF32(t, B, n, capacity)); err != nil {
		t.Fatal(err)
	}
	am, bm, _ = l.Weights()
	gotA, _ := am.Float32s()
	gotB, _ := bm.Float32s()
	compare(t, "A round trip", gotA, A, 0, 0)
	compare(t, "B round trip", gotB, B, 0, 0)

	// Merge: Linear with the lora == Linear on the merged weight, and unmerge restores W.
	yLora := make([]float32, m*n)
	if err := rt.Linear(mustF32(t, x, m, k), mustF32(t, W, n, k), nil, []Slot{{Lora: l}}, nil,
		mustF32(t, yLora, m, n)); err != nil {
		t.Fatal(err)
	}
	merged := append([]float32(nil), W...)
	if err := rt.Merge(l, 0, 1, mustF32(t, merged, n, k)); err != nil {
		t.Fatal(err)
	}
	yMerged := make([]float32, m*n)
	if err := rt.Linear(mustF32(t, x, m, k), mustF32(t, merged, n, k), nil, nil, nil,
		mustF32(t, yMerged, m, n)); err != nil {
		t.Fatal(err)
	}
	compare(t, "merged vs fused", yMerged, yLora, 1e-5, 1e-5)
	if err := rt.Unmerge(l, 0, 1, mustF32(t, merged, n, k)); err != nil {
		t.Fatal(err)
	}
	compare(t, "unmerge", merged, W, 1e-6, 1e-5)
	if err := rt.Merge(l, 0, 1, mustF32(t, make([]float32, k*k), k, k)); !errors.Is(err, &Error{Status: StatusShape}) {
		t.Fatalf("merge into a k x k weight: %v, want SHAPE", err)
	}

	// Backward's dx = dy W + scale (dy B) A.
	dy := randF32(&seed, m*n, 1)
	dx := make([]float32, m*k)
	dxm := mustF32(t, dx, m, k)
	if err := rt.Backward(l, mustF32(t, x, m, k), mustF32(t, W, n, k), mustF32(t, dy, m, n), 0,
		BackwardNested, &dxm); err != nil {
		t.Fatal(err)
	}
	wT := make([]float32, k*n) // W^T, so dy W = matMulT(dy, W^T)
	for i := 0; i < n; i++ {
		for j := 0; j < k; j++ {
			wT[j*n+i] = W[i*k+j]
		}
	}
	aT := make([]float32, k*capacity)
	for i := 0; i < capacity; i++ {
		for j := 0; j < k; j++ {
			aT[j*capacity+i] = A[i*k+j]
		}
	}
	bT := make([]float32, capacity*n)
	for i := 0; i < n; i++ {
		for j := 0; j < capacity; j++ {
			bT[j*n+i] = B[i*capacity+j]
		}
	}
	ref := matMulT(dy, m, n, wT, k)
	dyB := matMulT(dy, m, n, bT, capacity)
	lo := matMulT(dyB, m, capacity, aT, k)
	for i := range ref {
		ref[i] += info.Scale * lo[i]
	}
	compare(t, "dx", dx, ref, 1e-5, 1e-5)
	norm, err := a.ClipGradNorm(1e9)
	if err != nil || !(norm > 0) {
		t.Fatalf("grad norm %g, %v", norm, err)
	}

	// Masks round trip.
	if err := l.SetMask([]bool{true, false, true, true}); err != nil {
		t.Fatal(err)
	}
	mask, err := l.Mask()
	if err != nil || fmt.Sprint(mask) != "[true false true true]" {
		t.Fatalf("mask %v, %v", mask, err)
	}
	if err := l.SetMask([]bool{true, true, true, true}); err != nil {
		t.Fatal(err)
	}

	// A few AdamW steps on 0.5 ||y - target||^2 lower the loss (W frozen).
	target := randF32(&seed, m*n, 1)
	loss := func() (float64, []float32) {
		y := make([]float32, m*n)
		if err := rt.Linear(mustF32(t, x, m, k), mustF32(t, W, n, k), nil, []Slot{{Lora: l}}, nil,
			mustF32(t, y, m, n)); err != nil {
			t.Fatal(err)
		}
		var s float64
		g := make([]float32, m*n)
		for i := range y {
			g[i] = y[i] - target[i]
			s += 0.5 * float64(g[i]) * float64(g[i])
		}
		return s, g
	}
	first, _ := loss()
	opts := DefaultAdamW()
	opts.LR = 1e-2
	for step := 0; step < 30; step++ {
		_, g := loss()
		if err := l.ZeroGrad(); err != nil {
			t.Fatal(err)
		}
		if err := rt.Backward(l, mustF32(t, x, m, k), mustF32(t, W, n, k), mustF32(t, g, m, n), 0,
			BackwardNested, nil); err != nil {
			t.Fatal(err)
		}
		var err error
		if step%2 == 0 {
			err = l.AdamWStep(&opts)
		} else {
			err = a.AdamWStep(&opts)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	last, _ := loss()
	t.Logf("loss %.4f -> %.4f after 30 AdamW steps", first, last)
	if !(last < 0.9*first) {
		t.Fatalf("loss %g -> %g: training did not lower it", first, last)
	}
	if err := a.ZeroGrad(); err != nil {
		t.Fatal(err)
	}
	if err := l.EnableGains(1); err != nil {
		t.Fatal(err)
	}
	if err := a.TrainEnable(); err != nil {
		t.Fatal(err)
	}
}

// Packed base weights: every fixture base dtype, the PEFT outputs, and mixed rows equal to the
// unpacked W; the pack outlives the Go slice it was made from.
func TestPacked(t *testing.T) {
	for _, f := range []struct {
		file, ref string
		tol       float64
	}{{"base.safetensors", "y.lora-r8.", 1e-4}, {"base-bf16.safetensors", "y_bf16base.lora-r8.", 1e-4},
		{"base-f16.safetensors", "y.lora-r8.", 2e-3}} {
		e := open(t, f.file)
		l8a, lrsa := e.adapter(t, "lora-r8"), e.adapter(t, "rslora-pattern")
		for _, m := range modules {
			l8, err := l8a.Module(m)
			if err != nil {
				t.Fatal(err)
			}
			lrs, err := lrsa.Module(m)
			if err != nil {
				t.Fatal(err)
			}
			w := e.get(t, e.base, m+".weight")
			pk, err := e.rt.Pack(w)
			if err != nil {
				t.Fatal(err)
			}
			info, err := pk.Info()
			if err != nil {
				t.Fatal(err)
			}
			if info.Rows != w.Rows || info.Cols != w.Cols || info.DType != w.DType ||
				info.Bytes < uint64(w.Rows*w.Cols*w.DType.Size()) || info.Kernels == "" {
				t.Fatalf("%s: packed info %+v for a %d x %d %s matrix", m, info, w.Rows, w.Cols, w.DType)
			}
			var bias *Matrix
			if e.hasBias[m] {
				b := e.get(t, e.base, m+".bias")
				bias = &b
			}
			_, x := e.goF32(t, e.io, "x."+m)
			y := make([]float32, x.Rows*w.Rows)
			ym, _ := F32(y, x.Rows, w.Rows, 0)
			if err := e.rt.LinearPacked(x, pk, bias, []Slot{{Lora: l8}}, nil, ym); err != nil {
				t.Fatalf("%s: %v", m, err)
			}
			ref, _ := e.goF32(t, e.io, f.ref+m)
			compare(t, "packed "+f.file+" "+m, y, ref, f.tol, f.tol)
			rowSlot := make([]int32, x.Rows)
			for i := range rowSlot {
				rowSlot[i] = int32(i%3) - 1
			}
			slots := []Slot{{Lora: l8}, {Lora: lrs}}
			if err := e.rt.LinearPacked(x, pk, bias, slots, rowSlot, ym); err != nil {
				t.Fatal(err)
			}
			yu := e.run(t, m, x, slots, rowSlot)
			compare(t, "packed mixed "+m, y, yu, 1e-5, 1e-5)
			pk.Close()
			pk.Close()
			if _, err := pk.Info(); err == nil {
				t.Fatal("Info on a closed pack succeeded")
			}
			if err := e.rt.LinearPacked(x, pk, bias, nil, nil, ym); err == nil {
				t.Fatal("LinearPacked with a closed pack succeeded")
			}
		}
	}
}

// The adapter store: load on first use, versions published while one is held, counters.
func TestStore(t *testing.T) {
	e := open(t, "base.safetensors")
	m := "layers.0.mlp.up_proj"
	_, x := e.goF32(t, e.io, "x."+m)
	st, err := e.rt.NewStore(0)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	dir := func(n string) string { return filepath.Join(fixture, "adapters", n) }
	if err := st.Register("live", dir("lora-r8")); err != nil {
		t.Fatal(err)
	}
	if err := st.Register("live", dir("lora-r8")); err == nil {
		t.Fatal("registering a name twice succeeded")
	}
	if _, err := st.Acquire("nope"); err == nil {
		t.Fatal("acquiring an unknown name succeeded")
	}
	held, err := st.Acquire("live")
	if err != nil {
		t.Fatal(err)
	}
	id, g, err := held.Version()
	if err != nil || id == 0 || g != 0 {
		t.Fatalf("version (%d, %d), %v", id, g, err)
	}
	if g, err := st.PublishPEFT("live", dir("rslora-pattern")); err != nil || g != 1 {
		t.Fatalf("PublishPEFT: %d, %v", g, err)
	}
	mem, err := e.rt.LoadPEFT(dir("lora-r64"))
	if err != nil {
		t.Fatal(err)
	}
	if g, err := st.Publish("live", mem); err != nil || g != 2 {
		t.Fatalf("Publish: %d, %v", g, err)
	}
	cur, err := st.Acquire("live")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		a   *Adapter
		ref string
	}{{held, "y.lora-r8."}, {cur, "y.lora-r64."}} {
		l, err := c.a.Module(m)
		if err != nil {
			t.Fatal(err)
		}
		y := e.run(t, m, x, []Slot{{Lora: l}}, nil)
		ref, _ := e.goF32(t, e.io, c.ref+m)
		compare(t, "store "+c.ref, y, ref, 1e-4, 1e-4)
	}
	held.Close()
	cur.Close()
	s, err := st.Stats()
	if err != nil || s.Publishes != 2 || s.InUse != 0 || s.Registered != 1 {
		t.Fatalf("stats %+v, %v", s, err)
	}
}

// GGUF metadata through the typed getters (tests/fixtures/gguf/tiny.gguf, written by llama.cpp's
// gguf package: scripts/make_gguf_fixtures.py).
func TestGGUFMetadata(t *testing.T) {
	rt, err := NewRuntime(&RuntimeOptions{NumThreads: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer rt.Close()
	w, err := rt.OpenWeights(filepath.Join(fixture, "..", "gguf", "tiny.gguf"))
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	keys := map[string]bool{}
	for i := 0; i < w.MetaCount(); i++ {
		k, err := w.MetaKey(i)
		if err != nil {
			t.Fatal(err)
		}
		keys[k] = true
	}
	if !keys["test.u64"] || !keys["test.nested"] {
		t.Fatalf("keys %v", keys)
	}
	if v, err := w.MetaU64("test.u64"); err != nil || v != 1<<63+5 {
		t.Fatalf("test.u64 = %d, %v", v, err)
	}
	if v, err := w.MetaI64("test.i32"); err != nil || v != -2000000000 {
		t.Fatalf("test.i32 = %d, %v", v, err)
	}
	if v, err := w.MetaF64("test.f64"); err != nil || v != -2.5e-300 {
		t.Fatalf("test.f64 = %g, %v", v, err)
	}
	if v, err := w.MetaBool("test.bool"); err != nil || !v {
		t.Fatalf("test.bool = %v, %v", v, err)
	}
	if v, err := w.MetaString("test.string"); err != nil || v != "grüße, gguf" {
		t.Fatalf("test.string = %q, %v", v, err)
	}
	if ty, n, err := w.MetaArrayLen("test.array_str"); err != nil || ty != MetaString || n != 3 {
		t.Fatalf("test.array_str: %d x %d, %v", ty, n, err)
	}
	if v, err := w.MetaArrayString("test.array_str", 1); err != nil || v != "bc" {
		t.Fatalf("test.array_str[1] = %q, %v", v, err)
	}
	if v, err := w.MetaArrayI64("test.array_i32", 1); err != nil || v != -2 {
		t.Fatalf("test.array_i32[1] = %d, %v", v, err)
	}
	if ty, err := w.MetaType("test.nested"); err != nil || ty != MetaArray {
		t.Fatalf("test.nested type %d, %v", ty, err)
	}
	if _, err := w.MetaU64("test.string"); err == nil {
		t.Fatal("a string read as u64")
	}
	if _, err := w.MetaU64("no.such.key"); err == nil {
		t.Fatal("a missing key read")
	}
}
