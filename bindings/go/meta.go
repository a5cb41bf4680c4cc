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

// MetaType is the type of a metadata value (rf_meta_type; GGUF's value type numbers).
type MetaType int32

// Metadata value types.
const (
	MetaU8     MetaType = C.RF_META_U8
	MetaI8     MetaType = C.RF_META_I8
	MetaU16    MetaType = C.RF_META_U16
	MetaI16    MetaType = C.RF_META_I16
	MetaU32    MetaType = C.RF_META_U32
	MetaI32    MetaType = C.RF_META_I32
	MetaF32    MetaType = C.RF_META_F32
	MetaBool   MetaType = C.RF_META_BOOL
	MetaString MetaType = C.RF_META_STRING
	MetaArray  MetaType = C.RF_META_ARRAY
	MetaU64    MetaType = C.RF_META_U64
	MetaI64    MetaType = C.RF_META_I64
	MetaF64    MetaType = C.RF_META_F64
)

// metaCall runs f with w's handle and key as a C string (nil error = success).
func (w *Weights) metaCall(key string, f func(p *C.rf_weights, k *C.char) *C.rf_error) error {
	if w == nil || w.ptr == nil {
		return closedErr("weights")
	}
	ck := C.CString(key)
	defer C.free(unsafe.Pointer(ck))
	err := check(f(w.ptr, ck))
	runtime.KeepAlive(w)
	return err
}

// MetaCount is the number of metadata keys (GGUF key/values, safetensors __metadata__).
func (w *Weights) MetaCount() int {
	if w == nil || w.ptr == nil {
		return 0
	}
	n := int(C.rf_weights_meta_count(w.ptr))
	runtime.KeepAlive(w)
	return n
}

// MetaKey is metadata key i (file order).
func (w *Weights) MetaKey(i int) (string, error) {
	if w == nil || w.ptr == nil {
		return "", closedErr("weights")
	}
	var k *C.char
	err := check(C.rf_weights_meta_key(w.ptr, C.size_t(i), &k))
	s := ""
	if err == nil {
		s = C.GoString(k)
	}
	runtime.KeepAlive(w)
	return s, err
}

// MetaType is the type of the value under key.
func (w *Weights) MetaType(key string) (MetaType, error) {
	var t C.rf_meta_type
	err := w.metaCall(key, func(p *C.rf_weights, k *C.char) *C.rf_error {
		return C.rf_weights_meta_type(p, k, &t)
	})
	return MetaType(t), err
}

// MetaArrayLen is the element type and length of the array under key.
func (w *Weights) MetaArrayLen(key string) (MetaType, int, error) {
	var t C.rf_meta_type
	var n C.size_t
	err := w.metaCall(key, func(p *C.rf_weights, k *C.char) *C.rf_error {
		return C.rf_weights_meta_array_len(p, k, &t, &n)
	})
	return MetaType(t), int(n), err
}

// MetaU64 reads an unsigned integer value (any width that fits).
func (w *Weights) MetaU64(key string) (uint64, error) {
	var v C.uint64_t
	err := w.metaCall(key, func(p *C.rf_weights, k *C.char) *C.rf_error {
		return C.rf_weights_meta_get_u64(p, k, &v)
	})
	return uint64(v), err
}

// MetaI64 reads a signed integer value.
func (w *Weights) MetaI64(key string) (int64, error) {
	var v C.int64_t
	err := w.metaCall(key, func(p *C.rf_weights, k *C.char) *C.rf_error {
		return C.rf_weights_meta_get_i64(p, k, &v)
	})
	return int64(v), err
}

// MetaF64 reads a floating-point value.
func (w *Weights) MetaF64(key string) (float64, error) {
	var v C.double
	err := w.metaCall(key, func(p *C.rf_weights, k *C.char) *C.rf_error {
		return C.rf_weights_meta_get_f64(p, k, &v)
	})
	return float64(v), err
}

// MetaBool reads a boolean value.
func (w *Weights) MetaBool(key string) (bool, error) {
	var v C.bool
	err := w.metaCall(key, func(p *C.rf_weights, k *C.char) *C.rf_error {
		return C.rf_weights_meta_get_bool(p, k, &v)
	})
	return bool(v), err
}

// MetaString reads a string value (copied into Go memory).
func (w *Weights) MetaString(key string) (string, error) {
	var s *C.char
	var n C.size_t
	err := w.metaCall(key, func(p *C.rf_weights, k *C.char) *C.rf_error {
		return C.rf_weights_meta_get_str(p, k, &s, &n)
	})
	if err != nil {
		return "", err
	}
	out := C.GoStringN(s, C.int(n))
	runtime.KeepAlive(w)
	return out, nil
}

// MetaArrayU64 reads element i of an array of unsigned integers.
func (w *Weights) MetaArrayU64(key string, i int) (uint64, error) {
	var v C.uint64_t
	err := w.metaCall(key, func(p *C.rf_weights, k *C.char) *C.rf_error {
		return C.rf_weights_meta_array_get_u64(p, k, C.size_t(i), &v)
	})
	return uint64(v), err
}

// MetaArrayI64 reads element i of an array of signed integers.
func (w *Weights) MetaArrayI64(key string, i int) (int64, error) {
	var v C.int64_t
	err := w.metaCall(key, func(p *C.rf_weights, k *C.char) *C.rf_error {
		return C.rf_weights_meta_array_get_i64(p, k, C.size_t(i), &v)
	})
	return int64(v), err
}

// MetaArrayF64 reads element i of an array of floating-point values.
func (w *Weights) MetaArrayF64(key string, i int) (float64, error) {
	var v C.double
	err := w.metaCall(key, func(p *C.rf_weights, k *C.char) *C.rf_error {
		return C.rf_weights_meta_array_get_f64(p, k, C.size_t(i), &v)
	})
	return float64(v), err
}

// MetaArrayString reads element i of an array of strings.
func (w *Weights) MetaArrayString(key string, i int) (string, error) {
	var s *C.char
	var n C.size_t
	err := w.metaCall(key, func(p *C.rf_weights, k *C.char) *C.rf_error {
		return C.rf_weights_meta_array_get_str(p, k, C.size_t(i), &s, &n)
	})
	if err != nil {
		return "", err
	}
	out := C.GoStringN(s, C.int(n))
	runtime.KeepAlive(w)
	return out, nil
}
