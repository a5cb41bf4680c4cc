package rankfuse

/*
#include <stdlib.h>
#include <rankfuse.h>
*/
import "C"

import (
	"runtime"
	"unsafe"
)

// GGUFAlpha is how SaveGGUF chooses the file's single adapter.lora.alpha (rf_gguf_alpha).
type GGUFAlpha int32

const (
	// GGUFAlphaAuto: the alpha reproducing most modules' scales; the rest folded into lora_b.
	GGUFAlphaAuto GGUFAlpha = C.RF_GGUF_ALPHA_AUTO
	// GGUFAlphaFold: alpha 0 (scale 1), every module's scale folded into lora_b.
	GGUFAlphaFold GGUFAlpha = C.RF_GGUF_ALPHA_FOLD
)

// GGUFSaveOptions are the options of SaveGGUF. Architecture "" = the adapter's own;
// NHead/NHeadKV are needed for llama/mistral q/k modules (llama.cpp permutes their rows).
type GGUFSaveOptions struct {
	Architecture string
	Alpha        GGUFAlpha
	NHead        uint32
	NHeadKV      uint32
}

// LoadGGUF loads a GGUF LoRA adapter (llama.cpp's format); modules are named by their base
// tensor without ".weight" ("blk.0.attn_q").
func (r *Runtime) LoadGGUF(path string) (*Adapter, error) {
	return r.loadAdapter(path, func(p *C.rf_runtime, cs *C.char, a **C.rf_adapter) *C.rf_error {
		return C.rf_adapter_load_gguf(p, cs, a)
	})
}

// SaveGGUF writes the adapter as a GGUF LoRA file that llama.cpp loads.
func (a *Adapter) SaveGGUF(path string, o GGUFSaveOptions) error {
	if a == nil || a.ptr == nil {
		return closedErr("adapter")
	}
	var opts C.rf_gguf_save_options
	if err := check(C.rf_gguf_save_options_default(&opts)); err != nil {
		return err
	}
	opts.alpha = C.rf_gguf_alpha(o.Alpha)
	opts.n_head = C.uint32_t(o.NHead)
	opts.n_head_kv = C.uint32_t(o.NHeadKV)
	if o.Architecture != "" {
		ca := C.CString(o.Architecture)
		defer C.free(unsafe.Pointer(ca))
		opts.architecture = ca
	}
	cs := C.CString(path)
	defer C.free(unsafe.Pointer(cs))
	err := check(C.rf_adapter_save_gguf(a.ptr, cs, &opts))
	runtime.KeepAlive(a)
	return err
}

// Architecture is general.architecture of the GGUF file the adapter came from ("" = none).
func (a *Adapter) Architecture() (string, error) {
	if a == nil || a.ptr == nil {
		return "", closedErr("adapter")
	}
	var out *C.char
	err := check(C.rf_adapter_architecture(a.ptr, &out))
	defer runtime.KeepAlive(a)
	if err != nil || out == nil {
		return "", err
	}
	return C.GoString(out), nil
}

// CheckBase fails unless every module has a base tensor "<module>.weight" of shape [out, in]
// and a GGUF base's architecture matches the adapter's.
func (a *Adapter) CheckBase(base *Weights) error {
	if a == nil || a.ptr == nil {
		return closedErr("adapter")
	}
	if base == nil || base.ptr == nil {
		return closedErr("weights")
	}
	err := check(C.rf_adapter_check_base(a.ptr, base.ptr))
	runtime.KeepAlive(a)
	runtime.KeepAlive(base)
	return err
}
