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

// Store is an adapter store (rf_store): adapters registered by name, loaded on first use,
// evicted least-recently-used (when nobody holds them) under a byte budget, with new versions
// published under a name while calls run on the old one. Every method may run from many
// goroutines at once, except Close.
type Store struct {
	ptr *C.rf_store
	rt  *Runtime
}

// StoreStats are the store's counters (rf_store_stats).
type StoreStats struct {
	Registered, Resident, BytesResident, InUse, Pinned uint64
	Hits, Loads, LoadFailures, Evictions, Publishes    uint64
	BudgetBytes                                        uint64
}

// NewStore creates a store on r's device with a budget in bytes (0 = no limit).
func (r *Runtime) NewStore(budgetBytes uint64) (*Store, error) {
	p, err := r.live()
	if err != nil {
		return nil, err
	}
	var s *C.rf_store
	err = check(C.rf_store_create(p, C.uint64_t(budgetBytes), &s))
	runtime.KeepAlive(r)
	if err != nil {
		return nil, err
	}
	r.acquire()
	out := &Store{ptr: s, rt: r}
	runtime.SetFinalizer(out, (*Store).Close)
	return out, nil
}

// Close frees the store (idempotent). Adapters acquired from it stay valid until closed.
func (s *Store) Close() error {
	if s == nil || s.ptr == nil {
		return nil
	}
	C.rf_store_free(s.ptr)
	s.ptr = nil
	runtime.SetFinalizer(s, nil)
	s.rt.release()
	return nil
}

func (s *Store) live() (*C.rf_store, error) {
	if s == nil || s.ptr == nil {
		return nil, closedErr("store")
	}
	return s.ptr, nil
}

// Register registers the PEFT folder path as adapter name (loaded on first Acquire).
func (s *Store) Register(name, path string) error {
	p, err := s.live()
	if err != nil {
		return err
	}
	cn, cp := C.CString(name), C.CString(path)
	defer C.free(unsafe.Pointer(cn))
	defer C.free(unsafe.Pointer(cp))
	err = check(C.rf_store_register(p, cn, cp))
	runtime.KeepAlive(s)
	return err
}

// Acquire returns the current version of name: shared and read-only (use it in Linear; do not
// train it), never evicted until its Close, which releases it.
func (s *Store) Acquire(name string) (*Adapter, error) {
	p, err := s.live()
	if err != nil {
		return nil, err
	}
	cn := C.CString(name)
	defer C.free(unsafe.Pointer(cn))
	var a *C.rf_adapter
	err = check(C.rf_store_acquire(p, cn, &a))
	runtime.KeepAlive(s)
	if err != nil {
		return nil, err
	}
	s.rt.acquire()
	out := &Adapter{ptr: a, rt: s.rt, stored: true}
	runtime.SetFinalizer(out, (*Adapter).Close)
	return out, nil
}

// PublishPEFT publishes the PEFT folder path as the new version of name; returns its generation.
// Adapters acquired before keep the version they got.
func (s *Store) PublishPEFT(name, path string) (uint64, error) {
	p, err := s.live()
	if err != nil {
		return 0, err
	}
	cn, cp := C.CString(name), C.CString(path)
	defer C.free(unsafe.Pointer(cn))
	defer C.free(unsafe.Pointer(cp))
	var g C.uint64_t
	err = check(C.rf_store_publish_peft(p, cn, cp, &g))
	runtime.KeepAlive(s)
	return uint64(g), err
}

// Publish publishes a (private) adapter as the new version of name; the store takes it over and
// a is closed. Returns the generation.
func (s *Store) Publish(name string, a *Adapter) (uint64, error) {
	p, err := s.live()
	if err != nil {
		return 0, err
	}
	if a == nil || a.ptr == nil || a.stored {
		return 0, &Error{Status: StatusInvalidArgument, Message: "Publish needs an open private adapter"}
	}
	cn := C.CString(name)
	defer C.free(unsafe.Pointer(cn))
	var g C.uint64_t
	err = check(C.rf_store_publish(p, cn, a.ptr, &g))
	runtime.KeepAlive(s)
	if err != nil {
		return 0, err
	}
	a.ptr = nil // the store owns it now
	runtime.SetFinalizer(a, nil)
	if a.rt != nil {
		a.rt.release()
	}
	return uint64(g), nil
}

// Pin pins (never evicted) or unpins name.
func (s *Store) Pin(name string, pinned bool) error {
	p, err := s.live()
	if err != nil {
		return err
	}
	cn := C.CString(name)
	defer C.free(unsafe.Pointer(cn))
	err = check(C.rf_store_pin(p, cn, C.bool(pinned)))
	runtime.KeepAlive(s)
	return err
}

// Trim evicts what the budget asks for now; returns how many adapters went.
func (s *Store) Trim() (int, error) {
	p, err := s.live()
	if err != nil {
		return 0, err
	}
	var n C.size_t
	err = check(C.rf_store_trim(p, &n))
	runtime.KeepAlive(s)
	return int(n), err
}

// Stats is a snapshot of the store's counters.
func (s *Store) Stats() (StoreStats, error) {
	p, err := s.live()
	if err != nil {
		return StoreStats{}, err
	}
	var st C.rf_store_stats
	err = check(C.rf_store_stats_get(p, &st))
	runtime.KeepAlive(s)
	return StoreStats{Registered: uint64(st.registered), Resident: uint64(st.resident),
		BytesResident: uint64(st.bytes_resident), InUse: uint64(st.in_use),
		Pinned: uint64(st.pinned), Hits: uint64(st.hits), Loads: uint64(st.loads),
		LoadFailures: uint64(st.load_failures), Evictions: uint64(st.evictions),
		Publishes: uint64(st.publishes), BudgetBytes: uint64(st.budget_bytes)}, err
}

// Version is (id, generation) of an adapter from a Store ((0, 0) otherwise): key caches on it.
func (a *Adapter) Version() (id, generation uint64, err error) {
	if a == nil || a.ptr == nil {
		return 0, 0, closedErr("adapter")
	}
	var i, g C.uint64_t
	err = check(C.rf_adapter_version(a.ptr, &i, &g))
	runtime.KeepAlive(a)
	return uint64(i), uint64(g), err
}
