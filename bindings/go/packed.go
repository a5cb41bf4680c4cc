package rankfuse

/*
#include <rankfuse.h>

// rf_weights_pack / rf_linear_packed with the matrix descriptors built on the C stack (see
// rfgo_linear in rankfuse.go for why).
static rf_error *rfgo_weights_pack(rf_runtime *rt,
    void *wd, int wt, int64_t wr, int64_t wc, int64_t wl, rf_packed **out) {
  rf_matrix w = {wd, (rf_dtype)wt, wr, wc, wl};
  return rf_weights_pack(rt, &w, out);
}

static rf_error *rfgo_linear_packed(rf_runtime *rt,
    void *xd, int xt, int64_t xr, int64_t xc, int64_t xl,
    const rf_packed *w,
    int has_bias, void *bd, int bt, int64_t br, int64_t bc, int64_t bl,
    const rf_lora_slot *slots, size_t n_slots, const int32_t *row_slot,
    void *yd, int yt, int64_t yr, int64_t yc, int64_t yl) {
  rf_matrix x = {xd, (rf_dtype)xt, xr, xc, xl};
  rf_matrix b = {bd, (rf_dtype)bt, br, bc, bl};
  rf_matrix y = {yd, (rf_dtype)yt, yr, yc, yl};
  return rf_linear_packed(rt, &x, w, has_bias ? &b : NULL, slots, n_slots, row_slot, &y);
}
*/
import "C"

import (
	"runtime"
)

// Packed is a frozen base matrix packed once for a runtime's CPU kernels (Runtime.Pack): a copy
// independent of the matrix it was made from and of the runtime. Immutable: LinearPacked may use
// it from many goroutines at once. Close must not run concurrently with its other uses.
type Packed struct {
	ptr *C.rf_packed
}

// PackedInfo is what rf_packed_info_get reports.
type PackedInfo struct {
	Rows, Cols int
	DType      DType
	Bytes      uint64 // memory the pack owns
	PanelCols  uint32 // columns per panel of the layout
	Kernels    string // the kernels the layout is for (the runtime's "isa")
}

// Pack packs w (F32/F16/BF16 host memory) for this runtime's CPU kernels; w may change or go
// afterwards. CUDA runtimes: StatusUnsupported.
func (r *Runtime) Pack(w Matrix) (*Packed, error) {
	p, err := r.live()
	if err != nil {
		return nil, err
	}
	if err := w.usable("w"); err != nil {
		return nil, err
	}
	var out *C.rf_packed
	err = check(C.rfgo_weights_pack(p,
		w.ptr, C.int(w.DType), C.int64_t(w.Rows), C.int64_t(w.Cols), C.int64_t(w.LD), &out))
	runtime.KeepAlive(r)
	runtime.KeepAlive(w.slice)
	runtime.KeepAlive(w.weights)
	if err != nil {
		return nil, err
	}
	pk := &Packed{ptr: out}
	runtime.SetFinalizer(pk, (*Packed).Close)
	return pk, nil
}

// Close frees the packed matrix (idempotent).
func (p *Packed) Close() error {
	if p == nil || p.ptr == nil {
		return nil
	}
	C.rf_packed_free(p.ptr)
	p.ptr = nil
	runtime.SetFinalizer(p, nil)
	return nil
}

// Info reports the shape, dtype, bytes and layout of the pack.
func (p *Packed) Info() (PackedInfo, error) {
	if p == nil || p.ptr == nil {
		return PackedInfo{}, closedErr("packed matrix")
	}
	var i C.rf_packed_info
	err := check(C.rf_packed_info_get(p.ptr, &i))
	runtime.KeepAlive(p)
	if err != nil {
		return PackedInfo{}, err
	}
	return PackedInfo{Rows: int(i.rows), Cols: int(i.cols), DType: DType(i.dtype),
		Bytes: uint64(i.bytes), PanelCols: uint32(i.panel_cols),
		Kernels: C.GoString(i.kernels)}, nil
}

// LinearPacked is Linear with W packed by Pack: the same forms and dtypes. A pack made for other
// kernels than r's is StatusInvalidArgument, never a wrong result.
func (r *Runtime) LinearPacked(x Matrix, w *Packed, bias *Matrix, slots []Slot, rowSlot []int32, y Matrix) error {
	p, err := r.live()
	if err != nil {
		return err
	}
	if w == nil || w.ptr == nil {
		return closedErr("packed matrix")
	}
	a, err := newLinearArgs(x, bias, slots, rowSlot, y)
	if err != nil {
		return err
	}
	b := a.bias
	err = check(C.rfgo_linear_packed(p,
		x.ptr, C.int(x.DType), C.int64_t(x.Rows), C.int64_t(x.Cols), C.int64_t(x.LD),
		w.ptr,
		a.hasBias, b.ptr, C.int(b.DType), C.int64_t(b.Rows), C.int64_t(b.Cols), C.int64_t(b.LD),
		a.slots(), C.size_t(len(a.cs)), a.rowSlot(),
		y.ptr, C.int(y.DType), C.int64_t(y.Rows), C.int64_t(y.Cols), C.int64_t(y.LD)))
	runtime.KeepAlive(r)
	runtime.KeepAlive(w)
	a.keepAlive(x, y, slots)
	return err
}
