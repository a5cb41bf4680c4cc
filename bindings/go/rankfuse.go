// Package rankfuse is a thin cgo binding of the rankfuse C ABI (include/rankfuse.h): low-rank
// adapters (LoRA) on frozen base weights.
//
// One Go type per C handle (Runtime, Weights, Adapter; Lora is borrowed from its Adapter). Close
// is idempotent and a finalizer closes objects that are dropped without it; runtime.KeepAlive
// follows every C call so a finalizer cannot run while C still uses a handle. Close must not run
// concurrently with other methods of the same object; everything else follows the C ABI's
// thread-safety (Runtime.Linear may run from many goroutines on shared objects; Lora.SetRank needs
// exclusive access to that lora).
//
// Errors are *Error values (use errors.As) carrying the stable Status and the library's message.
//
// Matrices (Matrix) are views: F32/F16/BF16 wrap Go slices without copying, Weights.Get wraps a
// tensor of the memory-mapped file. cgo rules: C may use Go memory only during the call that
// receives it; rf_linear does not retain any pointer, so passing &slice[0] is allowed, and the
// rf_matrix descriptors themselves are built on the C side (a Go struct holding a Go pointer may
// not be passed to C).
//
// The library is found with pkg-config (package rankfuse): install it with
// scripts/install.sh PREFIX and set PKG_CONFIG_PATH=PREFIX/lib/pkgconfig (and LD_LIBRARY_PATH to
// PREFIX/lib at run time unless PREFIX/lib is a system library directory).
package rankfuse

/*
#cgo pkg-config: rankfuse
#include <stdlib.h>
#include <rankfuse.h>

// rf_linear with the matrix descriptors built here, on the C stack: the data pointers may point
// into Go slices, and cgo forbids passing Go memory that holds Go pointers (an rf_matrix in Go
// memory pointing at a Go slice would be such memory).
static rf_error *rfgo_linear(rf_runtime *rt,
    void *xd, int xt, int64_t xr, int64_t xc, int64_t xl,
    void *wd, int wt, int64_t wr, int64_t wc, int64_t wl,
    int has_bias, void *bd, int bt, int64_t br, int64_t bc, int64_t bl,
    const rf_lora_slot *slots, size_t n_slots, const int32_t *row_slot,
    void *yd, int yt, int64_t yr, int64_t yc, int64_t yl) {
  rf_matrix x = {xd, (rf_dtype)xt, xr, xc, xl};
  rf_matrix w = {wd, (rf_dtype)wt, wr, wc, wl};
  rf_matrix b = {bd, (rf_dtype)bt, br, bc, bl};
  rf_matrix y = {yd, (rf_dtype)yt, yr, yc, yl};
  return rf_linear(rt, &x, &w, has_bias ? &b : NULL, slots, n_slots, row_slot, &y);
}

// rf_lora_merge / rf_lora_unmerge with the descriptor of W built here (see rfgo_linear).
static rf_error *rfgo_merge(rf_runtime *rt, const rf_lora *l, uint32_t rank, float mult,
    int unmerge, void *wd, int wt, int64_t wr, int64_t wc, int64_t wl) {
  rf_matrix w = {wd, (rf_dtype)wt, wr, wc, wl};
  return unmerge ? rf_lora_unmerge(rt, l, rank, mult, &w) : rf_lora_merge(rt, l, rank, mult, &w);
}

static rf_error *rfgo_backward(rf_runtime *rt, rf_lora *l,
    void *xd, int xt, int64_t xr, int64_t xc, int64_t xl,
    void *wd, int wt, int64_t wr, int64_t wc, int64_t wl,
    void *gd, int gt, int64_t gr, int64_t gc, int64_t gl,
    uint32_t rank, uint32_t mode,
    int has_dx, void *dd, int dt, int64_t dr, int64_t dc, int64_t dl) {
  rf_matrix x = {xd, (rf_dtype)xt, xr, xc, xl};
  rf_matrix w = {wd, (rf_dtype)wt, wr, wc, wl};
  rf_matrix dy = {gd, (rf_dtype)gt, gr, gc, gl};
  rf_matrix dx = {dd, (rf_dtype)dt, dr, dc, dl};
  return rf_lora_backward(rt, l, &x, &w, &dy, rank, mode, has_dx ? &dx : NULL);
}

static rf_error *rfgo_set_weights(rf_lora *l,
    void *ad, int at, int64_t ar, int64_t ac, int64_t al,
    void *bd, int bt, int64_t br, int64_t bc, int64_t bl) {
  rf_matrix a = {ad, (rf_dtype)at, ar, ac, al};
  rf_matrix b = {bd, (rf_dtype)bt, br, bc, bl};
  return rf_lora_set_weights(l, &a, &b);
}
*/
import "C"

import (
	"fmt"
	"runtime"
	"sync"
	"unsafe"
)

// HeaderABIVersion is RF_ABI_VERSION of the header this package was compiled against.
const HeaderABIVersion = uint32(C.RF_ABI_VERSION)

// ABIVersion is the ABI version the loaded library implements.
func ABIVersion() uint32 { return uint32(C.rf_abi_version()) }

// Version is the library version, "MAJOR.MINOR.PATCH".
func Version() string { return C.GoString(C.rf_version()) }

// ---------------------------------------------------------------- errors

// Status is the stable status number of an error (rf_status).
type Status int32

const (
	StatusOK              Status = C.RF_STATUS_OK
	StatusInvalidArgument Status = C.RF_STATUS_INVALID_ARGUMENT
	StatusShape           Status = C.RF_STATUS_SHAPE
	StatusDType           Status = C.RF_STATUS_DTYPE
	StatusNotFound        Status = C.RF_STATUS_NOT_FOUND
	StatusIO              Status = C.RF_STATUS_IO
	StatusFormat          Status = C.RF_STATUS_FORMAT
	StatusUnsupported     Status = C.RF_STATUS_UNSUPPORTED
	StatusDevice          Status = C.RF_STATUS_DEVICE
	StatusOutOfMemory     Status = C.RF_STATUS_OUT_OF_MEMORY
	StatusNumeric         Status = C.RF_STATUS_NUMERIC
	StatusInternal        Status = C.RF_STATUS_INTERNAL
)

var statusNames = map[Status]string{
	StatusOK: "OK", StatusInvalidArgument: "INVALID_ARGUMENT", StatusShape: "SHAPE",
	StatusDType: "DTYPE", StatusNotFound: "NOT_FOUND", StatusIO: "IO", StatusFormat: "FORMAT",
	StatusUnsupported: "UNSUPPORTED", StatusDevice: "DEVICE", StatusOutOfMemory: "OUT_OF_MEMORY",
	StatusNumeric: "NUMERIC", StatusInternal: "INTERNAL",
}

func (s Status) String() string {
	if n, ok := statusNames[s]; ok {
		return n
	}
	return fmt.Sprintf("STATUS(%d)", int32(s))
}

// Error is what every failing call returns: the status and the library's message (which names
// the offending argument, tensor, module or file).
type Error struct {
	Status  Status
	Message string
}

func (e *Error) Error() string { return "rankfuse: " + e.Status.String() + ": " + e.Message }

// Is makes errors.Is(err, &rankfuse.Error{Status: rankfuse.StatusNotFound}) match by status
// (a target with a Message must match it too).
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Status == e.Status && (t.Message == "" || t.Message == e.Message)
}

// check takes ownership of an rf_error: nil for NULL, else an *Error (the C object is freed).
func check(e *C.rf_error) error {
	if e == nil {
		return nil
	}
	err := &Error{Status: Status(C.rf_error_code(e)), Message: C.GoString(C.rf_error_message(e))}
	C.rf_error_free(e)
	return err
}

func closedErr(what string) error {
	return &Error{Status: StatusInvalidArgument, Message: what + " is closed"}
}

// ---------------------------------------------------------------- dtypes, matrices

// DType is an element type (rf_dtype).
type DType int32

const (
	F32DType  DType = C.RF_DTYPE_F32
	F16DType  DType = C.RF_DTYPE_F16
	BF16DType DType = C.RF_DTYPE_BF16
)

func (d DType) String() string {
	switch d {
	case F32DType:
		return "f32"
	case F16DType:
		return "f16"
	case BF16DType:
		return "bf16"
	}
	return fmt.Sprintf("DType(%d)", int32(d))
}

// Size is the bytes per element (0 for an unknown dtype).
func (d DType) Size() int {
	switch d {
	case F32DType:
		return 4
	case F16DType, BF16DType:
		return 2
	}
	return 0
}

// Matrix is a row-major view: Rows x Cols elements of DType, LD elements between row starts.
// It never owns memory: it keeps a reference to the Go slice (or the Weights) it views.
type Matrix struct {
	DType          DType
	Rows, Cols, LD int
	ptr            unsafe.Pointer
	slice          interface{} // the Go slice viewed (keeps its backing array alive)
	weights        *Weights    // the Weights a Get view points into
}

func spanElems(rows, cols, ld int) (int, error) {
	if rows < 0 || cols < 0 || ld < cols {
		return 0, &Error{Status: StatusShape,
			Message: fmt.Sprintf("matrix %d x %d with ld %d is not a valid shape", rows, cols, ld)}
	}
	if rows == 0 || cols == 0 {
		return 0, nil
	}
	return (rows-1)*ld + cols, nil
}

func view(ptr unsafe.Pointer, n int, slice interface{}, dt DType, rows, cols, ld int) (Matrix, error) {
	if ld == 0 {
		ld = cols
	}
	need, err := spanElems(rows, cols, ld)
	if err != nil {
		return Matrix{}, err
	}
	if n < need {
		return Matrix{}, &Error{Status: StatusShape, Message: fmt.Sprintf(
			"slice of %d elements is too small for %d x %d (ld %d): %d needed", n, rows, cols, ld, need)}
	}
	if need == 0 {
		ptr = nil
	}
	return Matrix{DType: dt, Rows: rows, Cols: cols, LD: ld, ptr: ptr, slice: slice}, nil
}

// F32 views a []float32 as a rows x cols matrix (ld 0 = cols). No copy.
func F32(s []float32, rows, cols, ld int) (Matrix, error) {
	var p unsafe.Pointer
	if len(s) > 0 {
		p = unsafe.Pointer(&s[0])
	}
	return view(p, len(s), s, F32DType, rows, cols, ld)
}

// BF16 views a []uint16 holding bfloat16 bits. No copy.
func BF16(s []uint16, rows, cols, ld int) (Matrix, error) {
	var p unsafe.Pointer
	if len(s) > 0 {
		p = unsafe.Pointer(&s[0])
	}
	return view(p, len(s), s, BF16DType, rows, cols, ld)
}

// F16 views a []uint16 holding IEEE half bits. No copy.
func F16(s []uint16, rows, cols, ld int) (Matrix, error) {
	var p unsafe.Pointer
	if len(s) > 0 {
		p = unsafe.Pointer(&s[0])
	}
	return view(p, len(s), s, F16DType, rows, cols, ld)
}

func (m *Matrix) usable(name string) error {
	if m.weights != nil && m.weights.ptr == nil {
		return &Error{Status: StatusInvalidArgument,
			Message: name + ": the Weights this view points into are closed"}
	}
	return nil
}

// Float32s copies an F32 matrix into a new compact row-major slice (e.g. to read a tensor of
// Weights into Go memory).
func (m Matrix) Float32s() ([]float32, error) {
	if m.DType != F32DType {
		return nil, &Error{Status: StatusDType, Message: "Float32s on a " + m.DType.String() + " matrix"}
	}
	if err := m.usable("matrix"); err != nil {
		return nil, err
	}
	out := make([]float32, m.Rows*m.Cols)
	if len(out) == 0 {
		return out, nil
	}
	// SAFETY (cgo/unsafe): the view was length-checked (Go slice) or comes from rf_weights_get
	// (a mapping alive while m.weights is open, checked above and kept alive below).
	src := unsafe.Slice((*float32)(m.ptr), (m.Rows-1)*m.LD+m.Cols)
	for i := 0; i < m.Rows; i++ {
		copy(out[i*m.Cols:(i+1)*m.Cols], src[i*m.LD:i*m.LD+m.Cols])
	}
	runtime.KeepAlive(m.weights)
	runtime.KeepAlive(m.slice)
	return out, nil
}

// ---------------------------------------------------------------- runtime

// RuntimeOptions are the options of NewRuntime; the zero value is CPU, all cores.
type RuntimeOptions struct {
	Device      int32 // 0 = CPU, 1 = CUDA (rf_device)
	DeviceIndex int32
	NumThreads  uint32 // CPU threads; 0 = all cores
	// ActQuant: ActQuantExact (default) or ActQuantQ8, integer dots for decode on
	// block-quantized W with x rounded to int8 per 32 values (rf_act_quant).
	ActQuant int32
}

const (
	ActQuantExact int32 = C.RF_ACT_QUANT_EXACT
	ActQuantQ8    int32 = C.RF_ACT_QUANT_Q8
)

const (
	DeviceCPU  int32 = C.RF_DEVICE_CPU
	DeviceCUDA int32 = C.RF_DEVICE_CUDA
)

// Runtime owns an rf_runtime. Objects made with it keep it alive: the C runtime is freed when
// the Runtime is closed and every Weights/Adapter made with it is closed too.
type Runtime struct {
	mu     sync.Mutex
	ptr    *C.rf_runtime
	closed bool
	refs   int // 1 for the Runtime itself while open + 1 per open child
}

// NewRuntime creates a runtime; opts nil = CPU, all cores.
func NewRuntime(opts *RuntimeOptions) (*Runtime, error) {
	var p *C.rf_runtime
	var err error
	if opts == nil {
		err = check(C.rf_runtime_create(nil, &p))
	} else {
		var o C.rf_runtime_options
		o.struct_size = C.uint32_t(unsafe.Sizeof(o))
		o.device = C.rf_device(opts.Device)
		o.device_index = C.int32_t(opts.DeviceIndex)
		o.num_threads = C.uint32_t(opts.NumThreads)
		o.act_quant = C.rf_act_quant(opts.ActQuant)
		err = check(C.rf_runtime_create(&o, &p))
	}
	if err != nil {
		return nil, err
	}
	r := &Runtime{ptr: p, refs: 1}
	runtime.SetFinalizer(r, (*Runtime).Close)
	return r, nil
}

func (r *Runtime) live() (*C.rf_runtime, error) {
	if r == nil || r.closed {
		return nil, closedErr("runtime")
	}
	return r.ptr, nil
}

func (r *Runtime) acquire() {
	r.mu.Lock()
	r.refs++
	r.mu.Unlock()
}

func (r *Runtime) release() {
	r.mu.Lock()
	r.refs--
	if r.refs == 0 && r.ptr != nil {
		C.rf_runtime_free(r.ptr)
		r.ptr = nil
	}
	r.mu.Unlock()
}

// Close releases the runtime (idempotent). The C object is freed once the objects made with it
// are closed as well.
func (r *Runtime) Close() error {
	if r == nil || r.closed {
		return nil
	}
	r.closed = true
	runtime.SetFinalizer(r, nil)
	r.release()
	return nil
}

// Info returns the runtime facts as JSON (version, backend, CPU features, kernel variant,
// threads, GPU).
func (r *Runtime) Info() (string, error) {
	p, err := r.live()
	if err != nil {
		return "", err
	}
	var n C.size_t
	if err := check(C.rf_runtime_info(p, nil, 0, &n)); err != nil {
		return "", err
	}
	buf := make([]byte, int(n)+1)
	err = check(C.rf_runtime_info(p, (*C.char)(unsafe.Pointer(&buf[0])), C.size_t(len(buf)), &n))
	runtime.KeepAlive(r)
	if err != nil {
		return "", err
	}
	return string(buf[:int(n)]), nil
}

// OpenWeights memory-maps a *.safetensors file or a sharded *.safetensors.index.json.
func (r *Runtime) OpenWeights(path string) (*Weights, error) {
	p, err := r.live()
	if err != nil {
		return nil, err
	}
	cs := C.CString(path)
	defer C.free(unsafe.Pointer(cs))
	var w *C.rf_weights
	err = check(C.rf_weights_open(p, cs, &w))
	runtime.KeepAlive(r)
	if err != nil {
		return nil, err
	}
	r.acquire()
	out := &Weights{ptr: w, rt: r}
	runtime.SetFinalizer(out, (*Weights).Close)
	return out, nil
}

// LoadPEFT loads a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors).
func (r *Runtime) LoadPEFT(dir string) (*Adapter, error) {
	return r.loadAdapter(dir, func(p *C.rf_runtime, cs *C.char, a **C.rf_adapter) *C.rf_error {
		return C.rf_adapter_load_peft(p, cs, a)
	})
}

// loadAdapter runs one of the C loaders that take (rt, path, &out) and wraps its adapter.
func (r *Runtime) loadAdapter(path string, load func(*C.rf_runtime, *C.char, **C.rf_adapter) *C.rf_error) (*Adapter, error) {
	p, err := r.live()
	if err != nil {
		return nil, err
	}
	cs := C.CString(path)
	defer C.free(unsafe.Pointer(cs))
	var a *C.rf_adapter
	err = check(load(p, cs, &a))
	runtime.KeepAlive(r)
	if err != nil {
		return nil, err
	}
	r.acquire()
	out := &Adapter{ptr: a, rt: r}
	runtime.SetFinalizer(out, (*Adapter).Close)
	return out, nil
}

// Slot is one adapter slot of a fused call. Lora nil = no adapter in this slot; Rank 0 = the
// lora's current rank; ScaleMult multiplies the lora's scale, and its zero value is taken as 1
// (Go's zero value must mean "as configured"; for no adapter contribution leave Lora nil).
type Slot struct {
	Lora      *Lora
	Rank      uint32
	ScaleMult float32
}

// Linear computes y = x W^T + bias + sum over slots of scale(slot) * (x A[:r]^T) B[:, :r]^T.
// bias may be nil. rowSlot nil: every slot applies to every row; else one entry per row of x
// (index into slots, -1 = base only). y must be its own (writable) memory.
func (r *Runtime) Linear(x, w Matrix, bias *Matrix, slots []Slot, rowSlot []int32, y Matrix) error {
	p, err := r.live()
	if err != nil {
		return err
	}
	if err := w.usable("w"); err != nil {
		return err
	}
	a, err := newLinearArgs(x, bias, slots, rowSlot, y)
	if err != nil {
		return err
	}
	b := a.bias
	err = check(C.rfgo_linear(p,
		x.ptr, C.int(x.DType), C.int64_t(x.Rows), C.int64_t(x.Cols), C.int64_t(x.LD),
		w.ptr, C.int(w.DType), C.int64_t(w.Rows), C.int64_t(w.Cols), C.int64_t(w.LD),
		a.hasBias, b.ptr, C.int(b.DType), C.int64_t(b.Rows), C.int64_t(b.Cols), C.int64_t(b.LD),
		a.slots(), C.size_t(len(a.cs)), a.rowSlot(),
		y.ptr, C.int(y.DType), C.int64_t(y.Rows), C.int64_t(y.Cols), C.int64_t(y.LD)))
	runtime.KeepAlive(r)
	runtime.KeepAlive(w.slice)
	runtime.KeepAlive(w.weights)
	a.keepAlive(x, y, slots)
	return err
}

// linearArgs are the checked C arguments that Linear and LinearPacked share: everything but W.
type linearArgs struct {
	cs      []C.rf_lora_slot
	rows    []int32
	hasBias C.int
	bias    Matrix
}

func newLinearArgs(x Matrix, bias *Matrix, slots []Slot, rowSlot []int32, y Matrix) (*linearArgs, error) {
	for _, m := range []struct {
		name string
		m    *Matrix
	}{{"x", &x}, {"bias", bias}, {"y", &y}} {
		if m.m != nil {
			if err := m.m.usable(m.name); err != nil {
				return nil, err
			}
		}
	}
	if y.weights != nil {
		return nil, &Error{Status: StatusInvalidArgument, Message: "y: a Weights view is read-only"}
	}
	if rowSlot != nil && len(rowSlot) != x.Rows {
		return nil, &Error{Status: StatusShape, Message: fmt.Sprintf(
			"rowSlot has %d entries, x has %d rows", len(rowSlot), x.Rows)}
	}
	a := &linearArgs{cs: make([]C.rf_lora_slot, len(slots)), rows: rowSlot}
	for i, s := range slots {
		mult := s.ScaleMult
		if mult == 0 {
			mult = 1
		}
		a.cs[i].rank = C.uint32_t(s.Rank)
		a.cs[i].scale_mult = C.float(mult)
		if s.Lora != nil {
			lp, err := s.Lora.live()
			if err != nil {
				return nil, fmt.Errorf("slot %d: %w", i, err)
			}
			a.cs[i].lora = lp
		}
	}
	if bias != nil {
		a.hasBias, a.bias = 1, *bias
	}
	return a, nil
}

func (a *linearArgs) slots() *C.rf_lora_slot {
	if len(a.cs) == 0 {
		return nil
	}
	return &a.cs[0]
}

func (a *linearArgs) rowSlot() *C.int32_t {
	if len(a.rows) == 0 {
		return nil
	}
	return (*C.int32_t)(unsafe.Pointer(&a.rows[0]))
}

// keepAlive holds everything the C call read until it returned.
func (a *linearArgs) keepAlive(x, y Matrix, slots []Slot) {
	runtime.KeepAlive(x.slice)
	runtime.KeepAlive(x.weights)
	runtime.KeepAlive(a.bias.slice)
	runtime.KeepAlive(a.bias.weights)
	runtime.KeepAlive(y.slice)
	runtime.KeepAlive(slots)
	runtime.KeepAlive(a.cs)
	runtime.KeepAlive(a.rows)
}

// ---------------------------------------------------------------- weights

// Weights are opened (memory-mapped) safetensors: immutable, safe to share across goroutines.
type Weights struct {
	ptr *C.rf_weights
	rt  *Runtime
}

// Close frees the weights (idempotent); views from Get become unusable.
func (w *Weights) Close() error {
	if w == nil || w.ptr == nil {
		return nil
	}
	C.rf_weights_free(w.ptr)
	w.ptr = nil
	runtime.SetFinalizer(w, nil)
	w.rt.release()
	return nil
}

// Count is the number of tensors (0 once closed).
func (w *Weights) Count() int {
	if w == nil || w.ptr == nil {
		return 0
	}
	n := int(C.rf_weights_count(w.ptr))
	runtime.KeepAlive(w)
	return n
}

// Name is the name of tensor i (file order).
func (w *Weights) Name(i int) (string, error) {
	if w == nil || w.ptr == nil {
		return "", closedErr("weights")
	}
	if i < 0 {
		return "", &Error{Status: StatusInvalidArgument, Message: fmt.Sprintf("index %d is negative", i)}
	}
	var n *C.char
	err := check(C.rf_weights_name(w.ptr, C.size_t(i), &n))
	var s string
	if err == nil {
		s = C.GoString(n)
	}
	runtime.KeepAlive(w)
	return s, err
}

// Names lists every tensor name in file order.
func (w *Weights) Names() ([]string, error) {
	out := make([]string, 0, w.Count())
	for i := 0; i < w.Count(); i++ {
		n, err := w.Name(i)
		if err != nil {
			return nil, err
		}
		out = append(out, n)
	}
	return out, nil
}

// Get is a zero-copy, read-only view of a tensor (1-D as 1 x n), usable while w is open.
func (w *Weights) Get(name string) (Matrix, error) {
	if w == nil || w.ptr == nil {
		return Matrix{}, closedErr("weights")
	}
	cs := C.CString(name)
	defer C.free(unsafe.Pointer(cs))
	var m C.rf_matrix
	err := check(C.rf_weights_get(w.ptr, cs, &m))
	runtime.KeepAlive(w)
	if err != nil {
		return Matrix{}, err
	}
	return Matrix{DType: DType(m.dtype), Rows: int(m.rows), Cols: int(m.cols), LD: int(m.ld),
		ptr: m.data, weights: w}, nil
}

// ---------------------------------------------------------------- adapters

// Adapter is an adapter: a named set of LoRA modules (loaded with Runtime.LoadPEFT or built for
// training with NewAdapter).
type Adapter struct {
	ptr    *C.rf_adapter
	rt     *Runtime
	stored bool // acquired from a Store: shared, read-only; Close releases it
}

// Close frees the adapter (idempotent); its Lora handles become unusable.
func (a *Adapter) Close() error {
	if a == nil || a.ptr == nil {
		return nil
	}
	if a.stored {
		C.rf_store_release(a.ptr)
	} else {
		C.rf_adapter_free(a.ptr)
	}
	a.ptr = nil
	runtime.SetFinalizer(a, nil)
	if a.rt != nil { // nil for NewAdapter's adapters
		a.rt.release()
	}
	return nil
}

// ModuleCount is the number of modules (0 once closed).
func (a *Adapter) ModuleCount() int {
	if a == nil || a.ptr == nil {
		return 0
	}
	n := int(C.rf_adapter_module_count(a.ptr))
	runtime.KeepAlive(a)
	return n
}

// ModuleName is the name of module i (sorted order).
func (a *Adapter) ModuleName(i int) (string, error) {
	if a == nil || a.ptr == nil {
		return "", closedErr("adapter")
	}
	if i < 0 {
		return "", &Error{Status: StatusInvalidArgument, Message: fmt.Sprintf("index %d is negative", i)}
	}
	var n *C.char
	err := check(C.rf_adapter_module_name(a.ptr, C.size_t(i), &n))
	var s string
	if err == nil {
		s = C.GoString(n)
	}
	runtime.KeepAlive(a)
	return s, err
}

// ModuleNames lists the module names (sorted).
func (a *Adapter) ModuleNames() ([]string, error) {
	out := make([]string, 0, a.ModuleCount())
	for i := 0; i < a.ModuleCount(); i++ {
		n, err := a.ModuleName(i)
		if err != nil {
			return nil, err
		}
		out = append(out, n)
	}
	return out, nil
}

// Module is the module at the base model's module path (e.g. "layers.0.self_attn.q_proj"),
// borrowed from the adapter.
func (a *Adapter) Module(name string) (*Lora, error) {
	if a == nil || a.ptr == nil {
		return nil, closedErr("adapter")
	}
	cs := C.CString(name)
	defer C.free(unsafe.Pointer(cs))
	var l *C.rf_lora
	err := check(C.rf_adapter_module(a.ptr, cs, &l))
	runtime.KeepAlive(a)
	if err != nil {
		return nil, err
	}
	return &Lora{ptr: l, adapter: a}, nil
}

// SavePEFT writes the adapter as a PEFT folder (created if missing).
func (a *Adapter) SavePEFT(dir string) error {
	if a == nil || a.ptr == nil {
		return closedErr("adapter")
	}
	cs := C.CString(dir)
	defer C.free(unsafe.Pointer(cs))
	err := check(C.rf_adapter_save_peft(a.ptr, cs))
	runtime.KeepAlive(a)
	return err
}

// Scaling is how a LoRA's scale follows its rank (rf_scaling).
type Scaling int32

const (
	ScalingLoRA   Scaling = C.RF_SCALING_LORA   // alpha / r
	ScalingRSLoRA Scaling = C.RF_SCALING_RSLORA // alpha / sqrt(r)
	ScalingFixed  Scaling = C.RF_SCALING_FIXED  // constant
)

// LoraInfo is what Lora.Info reports (rf_lora_info); Scale is the scale at Rank.
type LoraInfo struct {
	InFeatures, OutFeatures int64
	Capacity, Rank          uint32
	Alpha, Scale            float32
	Scaling                 Scaling
	DType                   DType
}

// Lora is one module, borrowed from its Adapter: usable while the adapter is open.
type Lora struct {
	ptr     *C.rf_lora
	adapter *Adapter
}

func (l *Lora) live() (*C.rf_lora, error) {
	if l == nil || l.adapter == nil || l.adapter.ptr == nil {
		return nil, closedErr("the lora's adapter")
	}
	return l.ptr, nil
}

// Info reports shapes, capacity, rank in use, alpha, scale, scaling rule and dtype.
func (l *Lora) Info() (LoraInfo, error) {
	p, err := l.live()
	if err != nil {
		return LoraInfo{}, err
	}
	var i C.rf_lora_info
	err = check(C.rf_lora_info_get(p, &i))
	runtime.KeepAlive(l.adapter)
	if err != nil {
		return LoraInfo{}, err
	}
	return LoraInfo{InFeatures: int64(i.in_features), OutFeatures: int64(i.out_features),
		Capacity: uint32(i.capacity), Rank: uint32(i.rank), Alpha: float32(i.alpha),
		Scale: float32(i.scale), Scaling: Scaling(i.scaling), DType: DType(i.dtype)}, nil
}

// SetRank sets the default rank of later calls (1..capacity). Needs exclusive access to the lora.
func (l *Lora) SetRank(rank uint32) error {
	p, err := l.live()
	if err != nil {
		return err
	}
	err = check(C.rf_lora_set_rank(p, C.uint32_t(rank)))
	runtime.KeepAlive(l.adapter)
	return err
}

// ---------------------------------------------------------------- merge, training

// Merge folds the lora into a weight in place: W <- W + scale * B[:, :r] A[:r] (rank 0 = the
// lora's current rank; scale = its scale at r times scaleMult, 0 taken as 1 as in Slot). w is
// the caller's writable out x in matrix (a Go slice view; Weights views are read-only).
func (r *Runtime) Merge(l *Lora, rank uint32, scaleMult float32, w Matrix) error {
	return r.merge(l, rank, scaleMult, w, 0)
}

// Unmerge is the inverse of Merge: W <- W - scale * B[:, :r] A[:r].
func (r *Runtime) Unmerge(l *Lora, rank uint32, scaleMult float32, w Matrix) error {
	return r.merge(l, rank, scaleMult, w, 1)
}

func (r *Runtime) merge(l *Lora, rank uint32, scaleMult float32, w Matrix, unmerge C.int) error {
	p, err := r.live()
	if err != nil {
		return err
	}
	lp, err := l.live()
	if err != nil {
		return err
	}
	if w.weights != nil {
		return &Error{Status: StatusInvalidArgument, Message: "w: a Weights view is read-only"}
	}
	if scaleMult == 0 {
		scaleMult = 1
	}
	err = check(C.rfgo_merge(p, lp, C.uint32_t(rank), C.float(scaleMult), unmerge,
		w.ptr, C.int(w.DType), C.int64_t(w.Rows), C.int64_t(w.Cols), C.int64_t(w.LD)))
	runtime.KeepAlive(r)
	runtime.KeepAlive(l.adapter)
	runtime.KeepAlive(w.slice)
	return err
}

// BackwardMode selects which components get gradients (rf_backward_mode).
type BackwardMode uint32

const (
	BackwardNested BackwardMode = C.RF_BACKWARD_NESTED // every active component below the rank
	BackwardFrozen BackwardMode = C.RF_BACKWARD_FROZEN // only component rank-1 (DyLoRA)
)

// NewAdapter creates an empty adapter to add trainable modules to (AddLora). It needs no
// runtime; Close frees it.
func NewAdapter(name string) (*Adapter, error) {
	cs := C.CString(name)
	defer C.free(unsafe.Pointer(cs))
	var a *C.rf_adapter
	if err := check(C.rf_adapter_new(cs, &a)); err != nil {
		return nil, err
	}
	out := &Adapter{ptr: a}
	runtime.SetFinalizer(out, (*Adapter).Close)
	return out, nil
}

// AddLora appends a trainable module for a linear layer in -> out with `capacity` components
// (rank starts at capacity), PEFT's init (A kaiming-uniform from seed, B = 0). dtype is the
// compute dtype the forward reads; masters and optimizer state are f32. Needs exclusive access.
func (a *Adapter) AddLora(module string, in, out int64, capacity uint32, alpha float32,
	scaling Scaling, dtype DType, seed uint64) (*Lora, error) {
	if a == nil || a.ptr == nil {
		return nil, closedErr("adapter")
	}
	cs := C.CString(module)
	defer C.free(unsafe.Pointer(cs))
	var l *C.rf_lora
	err := check(C.rf_adapter_add_lora(a.ptr, cs, C.int64_t(in), C.int64_t(out),
		C.uint32_t(capacity), C.float(alpha), C.uint32_t(scaling), C.uint32_t(dtype),
		C.uint64_t(seed), &l))
	runtime.KeepAlive(a)
	if err != nil {
		return nil, err
	}
	return &Lora{ptr: l, adapter: a}, nil
}

// TrainEnable turns training on for every module (e.g. of a loaded adapter, to fine-tune it).
func (a *Adapter) TrainEnable() error {
	if a == nil || a.ptr == nil {
		return closedErr("adapter")
	}
	err := check(C.rf_adapter_train_enable(a.ptr))
	runtime.KeepAlive(a)
	return err
}

// ZeroGrad zeroes the gradients of every module.
func (a *Adapter) ZeroGrad() error {
	if a == nil || a.ptr == nil {
		return closedErr("adapter")
	}
	err := check(C.rf_adapter_zero_grad(a.ptr))
	runtime.KeepAlive(a)
	return err
}

// ClipGradNorm scales all gradients so their global L2 norm is at most maxNorm and returns the
// norm before clipping (as torch.nn.utils.clip_grad_norm_).
func (a *Adapter) ClipGradNorm(maxNorm float32) (float64, error) {
	if a == nil || a.ptr == nil {
		return 0, closedErr("adapter")
	}
	var n C.double
	err := check(C.rf_adapter_clip_grad_norm(a.ptr, C.float(maxNorm), &n))
	runtime.KeepAlive(a)
	return float64(n), err
}

// AdamWOptions are the AdamW hyper-parameters, used as given: start from DefaultAdamW().
type AdamWOptions struct {
	LR, Beta1, Beta2, Eps, WeightDecay float32
}

// DefaultAdamW is torch.optim.AdamW's defaults (lr 1e-3, betas 0.9/0.999, eps 1e-8, wd 0.01).
func DefaultAdamW() AdamWOptions {
	return AdamWOptions{LR: 1e-3, Beta1: 0.9, Beta2: 0.999, Eps: 1e-8, WeightDecay: 0.01}
}

func (o *AdamWOptions) c() *C.rf_adamw_options {
	if o == nil {
		return nil
	}
	var c C.rf_adamw_options
	c.struct_size = C.uint32_t(unsafe.Sizeof(c))
	c.lr, c.beta1, c.beta2 = C.float(o.LR), C.float(o.Beta1), C.float(o.Beta2)
	c.eps, c.weight_decay = C.float(o.Eps), C.float(o.WeightDecay)
	return &c
}

// AdamWStep is one AdamW step on every module, all-or-nothing (a NaN/Inf gradient anywhere is
// StatusNumeric and changes nothing). opts nil = DefaultAdamW(). Does not zero the gradients.
func (a *Adapter) AdamWStep(opts *AdamWOptions) error {
	if a == nil || a.ptr == nil {
		return closedErr("adapter")
	}
	err := check(C.rf_adapter_adamw_step(a.ptr, opts.c()))
	runtime.KeepAlive(a)
	return err
}

// Backward accumulates the gradients of l for the layer output gradient dy (m x n) of
// y = x W^T + scale * (x A_r^T) B_r^T, at rank (0 = current). dx (nil = not wanted) receives
// dy W + scale * (dy B_r) A_r (m x k, its own writable memory). Needs exclusive access to l.
func (r *Runtime) Backward(l *Lora, x, w, dy Matrix, rank uint32, mode BackwardMode, dx *Matrix) error {
	p, err := r.live()
	if err != nil {
		return err
	}
	lp, err := l.live()
	if err != nil {
		return err
	}
	for _, m := range []struct {
		name string
		m    *Matrix
	}{{"x", &x}, {"w", &w}, {"dy", &dy}, {"dx", dx}} {
		if m.m != nil {
			if err := m.m.usable(m.name); err != nil {
				return err
			}
		}
	}
	hasDx := C.int(0)
	var d Matrix
	if dx != nil {
		if dx.weights != nil {
			return &Error{Status: StatusInvalidArgument, Message: "dx: a Weights view is read-only"}
		}
		hasDx, d = 1, *dx
	}
	err = check(C.rfgo_backward(p, lp,
		x.ptr, C.int(x.DType), C.int64_t(x.Rows), C.int64_t(x.Cols), C.int64_t(x.LD),
		w.ptr, C.int(w.DType), C.int64_t(w.Rows), C.int64_t(w.Cols), C.int64_t(w.LD),
		dy.ptr, C.int(dy.DType), C.int64_t(dy.Rows), C.int64_t(dy.Cols), C.int64_t(dy.LD),
		C.uint32_t(rank), C.uint32_t(mode),
		hasDx, d.ptr, C.int(d.DType), C.int64_t(d.Rows), C.int64_t(d.Cols), C.int64_t(d.LD)))
	runtime.KeepAlive(r)
	runtime.KeepAlive(l.adapter)
	runtime.KeepAlive(x.slice)
	runtime.KeepAlive(x.weights)
	runtime.KeepAlive(w.slice)
	runtime.KeepAlive(w.weights)
	runtime.KeepAlive(dy.slice)
	runtime.KeepAlive(dy.weights)
	runtime.KeepAlive(d.slice)
	return err
}

// ZeroGrad zeroes this module's gradients. Needs exclusive access.
func (l *Lora) ZeroGrad() error {
	p, err := l.live()
	if err != nil {
		return err
	}
	err = check(C.rf_lora_zero_grad(p))
	runtime.KeepAlive(l.adapter)
	return err
}

// AdamWStep is one AdamW step on this module (opts nil = DefaultAdamW()); see Adapter.AdamWStep.
func (l *Lora) AdamWStep(opts *AdamWOptions) error {
	p, err := l.live()
	if err != nil {
		return err
	}
	err = check(C.rf_lora_adamw_step(p, opts.c()))
	runtime.KeepAlive(l.adapter)
	return err
}

// EnableGains turns on per-component gains E (B diag(E) A, AdaLoRA/ElaLoRA), all set to init.
func (l *Lora) EnableGains(init float32) error {
	p, err := l.live()
	if err != nil {
		return err
	}
	err = check(C.rf_lora_enable_gains(p, C.float(init)))
	runtime.KeepAlive(l.adapter)
	return err
}

// SetMask sets the component mask (len = capacity; false masks a component off).
func (l *Lora) SetMask(mask []bool) error {
	p, err := l.live()
	if err != nil {
		return err
	}
	m := make([]C.uint8_t, len(mask)+1) // +1: a valid pointer for an empty mask
	for i, v := range mask {
		if v {
			m[i] = 1
		}
	}
	err = check(C.rf_lora_set_mask(p, &m[0], C.size_t(len(mask))))
	runtime.KeepAlive(l.adapter)
	runtime.KeepAlive(m)
	return err
}

// Mask reports the component mask (true = active), one entry per component of the capacity.
func (l *Lora) Mask() ([]bool, error) {
	info, err := l.Info()
	if err != nil {
		return nil, err
	}
	p, _ := l.live()
	m := make([]C.uint8_t, int(info.Capacity)+1)
	err = check(C.rf_lora_get_mask(p, &m[0], C.size_t(info.Capacity)))
	runtime.KeepAlive(l.adapter)
	if err != nil {
		return nil, err
	}
	out := make([]bool, info.Capacity)
	for i := range out {
		out[i] = m[i] != 0
	}
	return out, nil
}

// Weights copies the module's A (capacity x in) and B (out x capacity), as the forward reads
// them (compute dtype), into new Go slices and returns views of them.
func (l *Lora) Weights() (a, b Matrix, err error) {
	p, err := l.live()
	if err != nil {
		return Matrix{}, Matrix{}, err
	}
	var ca, cb C.rf_matrix
	if err = check(C.rf_lora_weights(p, &ca, &cb)); err == nil {
		a, err = copyMatrix(ca)
		if err == nil {
			b, err = copyMatrix(cb)
		}
	}
	runtime.KeepAlive(l.adapter)
	return a, b, err
}

// copyMatrix copies a C-owned matrix into a compact Go slice of its dtype.
func copyMatrix(m C.rf_matrix) (Matrix, error) {
	rows, cols, ld, dt := int(m.rows), int(m.cols), int(m.ld), DType(m.dtype)
	es := dt.Size()
	if es == 0 {
		return Matrix{}, &Error{Status: StatusDType, Message: "unknown dtype " + dt.String()}
	}
	n, err := spanElems(rows, cols, ld)
	if err != nil {
		return Matrix{}, err
	}
	var src []byte
	if n > 0 {
		// SAFETY (unsafe): rf_lora_weights returned a view of n elements, valid until the module
		// changes; the caller holds the adapter alive and the copy ends before returning.
		src = unsafe.Slice((*byte)(m.data), n*es)
	}
	if dt == F32DType {
		out := make([]float32, rows*cols)
		for i := 0; i < rows; i++ {
			for j := 0; j < cols; j++ {
				out[i*cols+j] = *(*float32)(unsafe.Pointer(&src[(i*ld+j)*4]))
			}
		}
		return F32(out, rows, cols, 0)
	}
	out := make([]uint16, rows*cols)
	for i := 0; i < rows; i++ {
		for j := 0; j < cols; j++ {
			out[i*cols+j] = *(*uint16)(unsafe.Pointer(&src[(i*ld+j)*2]))
		}
	}
	if dt == F16DType {
		return F16(out, rows, cols, 0)
	}
	return BF16(out, rows, cols, 0)
}

// SetWeights replaces A (capacity x in) and B (out x capacity) with copies of a and b (any
// dtype, any ld) and resets the optimizer state. Needs exclusive access.
func (l *Lora) SetWeights(a, b Matrix) error {
	p, err := l.live()
	if err != nil {
		return err
	}
	if err := a.usable("a"); err != nil {
		return err
	}
	if err := b.usable("b"); err != nil {
		return err
	}
	err = check(C.rfgo_set_weights(p,
		a.ptr, C.int(a.DType), C.int64_t(a.Rows), C.int64_t(a.Cols), C.int64_t(a.LD),
		b.ptr, C.int(b.DType), C.int64_t(b.Rows), C.int64_t(b.Cols), C.int64_t(b.LD)))
	runtime.KeepAlive(l.adapter)
	runtime.KeepAlive(a.slice)
	runtime.KeepAlive(a.weights)
	runtime.KeepAlive(b.slice)
	runtime.KeepAlive(b.weights)
	return err
}
