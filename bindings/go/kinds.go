package rankfuse

/*
#include <stdlib.h>
#include <rankfuse.h>
*/
import "C"

import (
	"fmt"
	"runtime"
	"unsafe"
)

// ModuleKind is what a module (Lora) is (rf_module_kind). Every kind serves in Linear slots
// (mixed with the others in one call on CPU runtimes), trains with Backward / ZeroGrad /
// AdamWStep and saves with Adapter.SavePEFT.
type ModuleKind int32

const (
	// ModuleKindLoRA: A (capacity x in), B (out x capacity); rank = components in use.
	ModuleKindLoRA ModuleKind = C.RF_MODULE_KIND_LORA
	// ModuleKindKRAdapter: a Khatri-Rao update; no rank truncation (rank is 1).
	ModuleKindKRAdapter ModuleKind = C.RF_MODULE_KIND_KRADAPTER
	// ModuleKindEigenLoRAx: loadings on a shared EigenBasis; rank = basis components in use.
	ModuleKindEigenLoRAx ModuleKind = C.RF_MODULE_KIND_EIGENLORAX
)

func (k ModuleKind) String() string {
	switch k {
	case ModuleKindLoRA:
		return "LoRA"
	case ModuleKindKRAdapter:
		return "KRAdapter"
	case ModuleKindEigenLoRAx:
		return "EigenLoRAx"
	}
	return fmt.Sprintf("ModuleKind(%d)", int32(k))
}

// Kind reports what the module is.
func (l *Lora) Kind() (ModuleKind, error) {
	p, err := l.live()
	if err != nil {
		return 0, err
	}
	var k C.rf_module_kind
	err = check(C.rf_lora_kind(p, &k))
	runtime.KeepAlive(l.adapter)
	return ModuleKind(k), err
}

// AddKRAdapter appends a trainable KRAdapter module for a linear layer in -> out: U = 0 and V
// kaiming-uniform from seed, so the update is 0 until trained; fixed scale (the paper's default
// is 2). Parameters are f32. Needs exclusive access to a.
func (a *Adapter) AddKRAdapter(module string, in, out int64, scale float32, seed uint64) (*Lora, error) {
	if a == nil || a.ptr == nil {
		return nil, closedErr("adapter")
	}
	cs := C.CString(module)
	defer C.free(unsafe.Pointer(cs))
	var l *C.rf_lora
	err := check(C.rf_adapter_add_kradapter(a.ptr, cs, C.int64_t(in), C.int64_t(out),
		C.float(scale), C.uint64_t(seed), &l))
	runtime.KeepAlive(a)
	if err != nil {
		return nil, err
	}
	return &Lora{ptr: l, adapter: a}, nil
}

// AddEigenLoRAx appends a trainable EigenLoRAx module on basis' module `module` (in and out
// are the basis'): loadings K x rank (K = the basis' components), alpha_B = 0 so the update is
// 0 until trained; fixed scale. Training updates the loadings only; the module keeps the basis
// alive (basis may be closed afterwards). Its rank (Slot.Rank, SetRank) is the number of basis
// components in use. Needs exclusive access to a.
func (a *Adapter) AddEigenLoRAx(basis *EigenBasis, module string, rank uint32, scale float32,
	seed uint64) (*Lora, error) {
	if a == nil || a.ptr == nil {
		return nil, closedErr("adapter")
	}
	bp, err := basis.live()
	if err != nil {
		return nil, err
	}
	cs := C.CString(module)
	defer C.free(unsafe.Pointer(cs))
	var l *C.rf_lora
	err = check(C.rf_adapter_add_eigenlorax(a.ptr, bp, cs, C.uint32_t(rank), C.float(scale),
		C.uint64_t(seed), &l))
	runtime.KeepAlive(a)
	runtime.KeepAlive(basis)
	if err != nil {
		return nil, err
	}
	return &Lora{ptr: l, adapter: a}, nil
}

// LoadEigenLoRAx loads an EigenLoRAx adapter folder (SavePEFT of EigenLoRAx modules) on basis,
// which must be the basis it was trained on (another is StatusInvalidArgument naming the
// module). The basis is shared, not copied: the adapter stays valid after basis.Close().
// LoadPEFT loads LoRA and KRAdapter folders.
func (r *Runtime) LoadEigenLoRAx(basis *EigenBasis, dir string) (*Adapter, error) {
	bp, err := basis.live()
	if err != nil {
		return nil, err
	}
	a, err := r.loadAdapter(dir, func(p *C.rf_runtime, cs *C.char, a **C.rf_adapter) *C.rf_error {
		return C.rf_adapter_load_eigenlorax(p, bp, cs, a)
	})
	runtime.KeepAlive(basis)
	return a, err
}

// EigenBasis is an EigenLoRAx basis: per module, frozen principal directions that many
// adapters share. Immutable; safe to share across goroutines. It needs no runtime once made.
type EigenBasis struct {
	ptr *C.rf_eigen_basis
}

func newEigenBasis(p *C.rf_eigen_basis) *EigenBasis {
	b := &EigenBasis{ptr: p}
	runtime.SetFinalizer(b, (*EigenBasis).Close)
	return b
}

func (b *EigenBasis) live() (*C.rf_eigen_basis, error) {
	if b == nil || b.ptr == nil {
		return nil, closedErr("eigen basis")
	}
	return b.ptr, nil
}

// Close frees the basis (idempotent). Modules made on it keep what they need.
func (b *EigenBasis) Close() error {
	if b == nil || b.ptr == nil {
		return nil
	}
	C.rf_eigen_basis_free(b.ptr)
	b.ptr = nil
	runtime.SetFinalizer(b, nil)
	return nil
}

// LoadEigenBasis loads a basis: a folder written by EigenBasis.Save, or a file of
// `rankfuse eigen build`.
func (r *Runtime) LoadEigenBasis(path string) (*EigenBasis, error) {
	p, err := r.live()
	if err != nil {
		return nil, err
	}
	cs := C.CString(path)
	defer C.free(unsafe.Pointer(cs))
	var out *C.rf_eigen_basis
	err = check(C.rf_eigen_basis_load(p, cs, &out))
	runtime.KeepAlive(r)
	if err != nil {
		return nil, err
	}
	return newEigenBasis(out), nil
}

// BuildEigenBasis builds a basis from LoRA adapters (the modules present in all of them, same
// shapes): per module and side the top `components` principal directions of their rank
// vectors, plus `augment` seeded random orthonormal directions.
func BuildEigenBasis(adapters []*Adapter, components, augment uint32, seed uint64) (*EigenBasis, error) {
	// C pointers only (no Go pointers), so this Go slice may be passed to C.
	ptrs := make([]*C.rf_adapter, len(adapters)+1) // +1: a valid pointer for an empty list
	for i, a := range adapters {
		if a == nil || a.ptr == nil {
			return nil, closedErr(fmt.Sprintf("adapters[%d]", i))
		}
		ptrs[i] = a.ptr
	}
	var out *C.rf_eigen_basis
	err := check(C.rf_eigen_basis_build(&ptrs[0], C.size_t(len(adapters)), C.uint32_t(components),
		C.uint32_t(augment), C.uint64_t(seed), &out))
	runtime.KeepAlive(adapters)
	runtime.KeepAlive(ptrs)
	if err != nil {
		return nil, err
	}
	return newEigenBasis(out), nil
}

// Save writes a basis folder (created if missing) that LoadEigenBasis reads back; adapters on
// the basis store their loadings only.
func (b *EigenBasis) Save(dir string) error {
	p, err := b.live()
	if err != nil {
		return err
	}
	cs := C.CString(dir)
	defer C.free(unsafe.Pointer(cs))
	err = check(C.rf_eigen_basis_save(p, cs))
	runtime.KeepAlive(b)
	return err
}
