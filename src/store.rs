//! An adapter store: many adapters registered by name, loaded on first use, kept under a byte
//! budget by evicting the least recently used adapters that no caller holds, with pinning and
//! counters.
//!
//! Generic over what it keeps (`T`) and how it loads it (a [`Loader`]), so the core knows nothing
//! of C handles: the C ABI keeps `rf_adapter`s in it (`src/ffi/store.rs`). A caller holds an
//! `Arc<T>`; the store never frees what a caller holds: eviction only drops the store's own
//! reference of an adapter nobody else holds, and an adapter acquired before the store is dropped
//! stays valid until its last holder lets go.
//!
//! Versions: every registered name has a stable 64-bit `id`; each publish of a new version
//! under the name (from a folder, or an adapter built in memory, e.g. after training steps)
//! bumps its `generation`. Publishing swaps what *new* acquisitions get; callers holding the
//! previous version keep it, whole and unchanged, until they release it, and it is freed with
//! the last release (reference counting: no call ever sees a mix of two versions). Hosts key
//! their KV / prefix caches on (id, generation).

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
// loom's primitives when loom/ (a crate of its own) compiles this file under `--cfg loom` to
// model-check every interleaving of acquire, publish and evict; std's otherwise.
#[cfg(loom)]
use loom::sync::{Arc, Condvar, Mutex, MutexGuard};
#[cfg(not(loom))]
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Loads the adapter registered as `name` from `path`; returns it and the bytes it keeps resident.
pub type Loader<T> = Box<dyn Fn(&str, &Path) -> Result<(T, usize)> + Send + Sync>;

/// What a store keeps: told its version when it enters the store.
pub trait Versioned {
    fn set_version(&mut self, v: Version);
}

/// A version's identity: the name's stable id and the publish count under it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Version {
    pub id: u64,
    pub generation: u64,
}

/// Ids of registered names, unique in the process (so two stores never share one).
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Counters and gauges of a store (a consistent snapshot).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Adapters registered.
    pub registered: u64,
    /// Adapters loaded now.
    pub resident: u64,
    /// Bytes the resident adapters keep (their tensors; on a CUDA runtime also the device copy).
    pub bytes_resident: u64,
    /// Resident adapters some caller holds now (not evictable).
    pub in_use: u64,
    /// Resident adapters pinned.
    pub pinned: u64,
    /// Acquisitions served by a resident adapter.
    pub hits: u64,
    /// Loads (first uses and uses after an eviction).
    pub loads: u64,
    /// Loads that failed (the error went to the caller; the entry stays registered).
    pub load_failures: u64,
    /// Adapters evicted to stay under the budget.
    pub evictions: u64,
    /// New versions published.
    pub publishes: u64,
}

enum Slot<T> {
    Cold,
    /// One thread loads; others wanting the same adapter wait for it.
    Loading,
    Resident {
        value: Arc<T>,
        bytes: usize,
    },
}

/// Where a name's current version comes from: a folder (reloadable after an eviction) or memory
/// (never evicted: there is nothing to reload it from).
enum Source {
    Path(PathBuf),
    Memory,
}

struct Entry<T> {
    source: Source,
    slot: Slot<T>,
    pinned: bool,
    last_use: u64,
    version: Version,
}

struct State<T> {
    entries: HashMap<String, Entry<T>>,
    tick: u64,
    stats: StoreStats,
}

/// See the module documentation. All methods take `&self` and may run from many threads.
pub struct Store<T> {
    loader: Loader<T>,
    budget: u64,
    state: Mutex<State<T>>,
    loaded: Condvar,
}

impl<T: Send + Sync + Versioned> Store<T> {
    /// A store that keeps at most `budget` bytes of unheld adapters resident (0 = no limit).
    pub fn new(budget: u64, loader: Loader<T>) -> Store<T> {
        Store {
            loader,
            budget,
            state: Mutex::new(State {
                entries: HashMap::new(),
                tick: 0,
                stats: StoreStats::default(),
            }),
            loaded: Condvar::new(),
        }
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic while holding the lock leaves the state consistent (every update is a few
        // field writes), so a poisoned lock is taken over rather than propagated.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers `path` under `name` (loaded on first use). The name must be new and the path
    /// must exist.
    pub fn register(&self, name: &str, path: &Path) -> Result<()> {
        if name.is_empty() {
            return Err(Error::invalid("store: an adapter name is empty"));
        }
        std::fs::metadata(path)
            .map_err(|e| Error::io(format!("store: adapter '{name}': {}: {e}", path.display())))?;
        let mut st = self.lock();
        if st.entries.contains_key(name) {
            return Err(Error::invalid(format!(
                "store: an adapter named '{name}' is already registered"
            )));
        }
        st.entries.insert(
            name.to_string(),
            Entry {
                source: Source::Path(path.to_path_buf()),
                slot: Slot::Cold,
                pinned: false,
                last_use: 0,
                version: Version {
                    id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                    generation: 0,
                },
            },
        );
        st.stats.registered += 1;
        Ok(())
    }

    /// Publishes a new version of `name` from the folder `path` (registering the name if it is
    /// new): later acquisitions load it; holders of the previous version keep theirs.
    pub fn publish_path(&self, name: &str, path: &Path) -> Result<Version> {
        std::fs::metadata(path)
            .map_err(|e| Error::io(format!("store: adapter '{name}': {}: {e}", path.display())))?;
        let (v, old) = self.publish_with(name, Source::Path(path.to_path_buf()), |_| None)?;
        drop(old);
        Ok(v)
    }

    /// Publishes `value` (built in memory) as the new version of `name` (registering the name if
    /// it is new). It stays resident (never evicted) until a later publish replaces it.
    pub fn publish(&self, name: &str, value: T, bytes: usize) -> Result<Version> {
        let mut value = Some(value);
        let (v, old) = self.publish_with(name, Source::Memory, |ver| {
            let mut t = value.take().expect("called once");
            t.set_version(ver);
            Some((Arc::new(t), bytes))
        })?;
        drop(old);
        Ok(v)
    }

    fn publish_with(
        &self,
        name: &str,
        source: Source,
        make: impl FnOnce(Version) -> Option<(Arc<T>, usize)>,
    ) -> Result<(Version, Vec<Arc<T>>)> {
        if name.is_empty() {
            return Err(Error::invalid("store: an adapter name is empty"));
        }
        let mut st = self.lock();
        // A load of the previous version in flight finishes first (its result is then
        // replaced), so a publish is never overwritten by an older load.
        while matches!(st.entries.get(name).map(|e| &e.slot), Some(Slot::Loading)) {
            st = self.loaded.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        let st = &mut *st;
        let version = match st.entries.get(name) {
            Some(e) => Version {
                id: e.version.id,
                generation: e.version.generation + 1,
            },
            None => {
                st.stats.registered += 1;
                Version {
                    id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                    generation: 0,
                }
            }
        };
        let e = st.entries.entry(name.to_string()).or_insert(Entry {
            source: Source::Memory,
            slot: Slot::Cold,
            pinned: false,
            last_use: 0,
            version,
        });
        let mut old = Vec::new();
        if let Slot::Resident { value, bytes } = std::mem::replace(&mut e.slot, Slot::Cold) {
            st.stats.resident -= 1;
            st.stats.bytes_resident -= bytes as u64;
            old.push(value);
        }
        e.source = source;
        e.version = version;
        if let Some((value, bytes)) = make(version) {
            st.tick += 1;
            e.slot = Slot::Resident { value, bytes };
            e.last_use = st.tick;
            st.stats.resident += 1;
            st.stats.bytes_resident += bytes as u64;
        }
        st.stats.publishes += 1;
        old.extend(self.evict(st));
        Ok((version, old))
    }

    /// The current version of `name` (what the next acquisition gets).
    pub fn version(&self, name: &str) -> Result<Version> {
        let st = self.lock();
        st.entries.get(name).map(|e| e.version).ok_or_else(|| {
            Error::not_found(format!("store: no adapter named '{name}' is registered"))
        })
    }

    /// The adapter registered as `name`, loaded now if it is not resident (one load however
    /// many threads ask at once). While the caller holds the `Arc` it is never evicted.
    pub fn acquire(&self, name: &str) -> Result<Arc<T>> {
        let mut st = self.lock();
        loop {
            let st_ref = &mut *st;
            let e = st_ref.entries.get_mut(name).ok_or_else(|| {
                Error::not_found(format!("store: no adapter named '{name}' is registered"))
            })?;
            match &e.slot {
                Slot::Resident { value, .. } => {
                    let v = value.clone();
                    st_ref.tick += 1;
                    e.last_use = st_ref.tick;
                    st_ref.stats.hits += 1;
                    return Ok(v);
                }
                Slot::Loading => st = self.loaded.wait(st).unwrap_or_else(|p| p.into_inner()),
                Slot::Cold => {
                    let Source::Path(path) = &e.source else {
                        unreachable!("a version published from memory is never evicted")
                    };
                    let (path, version) = (path.clone(), e.version);
                    e.slot = Slot::Loading;
                    drop(st);
                    return self.load(name, &path, version);
                }
            }
        }
    }

    /// Loads outside the lock, then publishes the result (or puts the entry back to Cold).
    fn load(&self, name: &str, path: &Path, version: Version) -> Result<Arc<T>> {
        // Resets the entry if the loader panics, so waiters are not left hanging.
        struct Reset<'a, T: Send + Sync + Versioned> {
            store: &'a Store<T>,
            name: &'a str,
            armed: bool,
        }
        impl<T: Send + Sync + Versioned> Drop for Reset<'_, T> {
            fn drop(&mut self) {
                if self.armed {
                    let mut st = self.store.lock();
                    if let Some(e) = st.entries.get_mut(self.name) {
                        e.slot = Slot::Cold;
                    }
                    st.stats.load_failures += 1;
                    drop(st);
                    self.store.loaded.notify_all();
                }
            }
        }
        let mut reset = Reset {
            store: self,
            name,
            armed: true,
        };
        let loaded = (self.loader)(name, path);
        reset.armed = false;
        let mut st = self.lock();
        let result = match loaded {
            Ok((mut value, bytes)) => {
                value.set_version(version);
                let value = Arc::new(value);
                st.tick += 1;
                let tick = st.tick;
                let e = st.entries.get_mut(name).expect("entries are never removed");
                e.slot = Slot::Resident {
                    value: value.clone(),
                    bytes,
                };
                e.last_use = tick;
                st.stats.loads += 1;
                st.stats.resident += 1;
                st.stats.bytes_resident += bytes as u64;
                Ok(value)
            }
            Err(err) => {
                if let Some(e) = st.entries.get_mut(name) {
                    e.slot = Slot::Cold;
                }
                st.stats.load_failures += 1;
                Err(err.context(format!("store: loading adapter '{name}'")))
            }
        };
        let evicted = self.evict(&mut st);
        drop(st);
        self.loaded.notify_all();
        // Freed outside the lock (unmapping, device frees).
        drop(evicted);
        result
    }

    /// Drops the store's reference of least recently used, unpinned, unheld adapters until the
    /// resident bytes fit the budget (or nothing more can go); returns them to drop unlocked.
    fn evict(&self, st: &mut State<T>) -> Vec<Arc<T>> {
        let mut out = Vec::new();
        while self.budget > 0 && st.stats.bytes_resident > self.budget {
            let victim = st
                .entries
                .iter()
                .filter(|(_, e)| !e.pinned && matches!(e.source, Source::Path(_)))
                .filter_map(|(n, e)| match &e.slot {
                    // strong_count 1: only the store holds it. A caller cloning it needs the
                    // lock (acquire), which this thread holds, so the count cannot grow here.
                    Slot::Resident { value, .. } if Arc::strong_count(value) == 1 => {
                        Some((e.last_use, n.clone()))
                    }
                    _ => None,
                })
                .min();
            let Some((_, name)) = victim else { break };
            let e = st.entries.get_mut(&name).expect("just found");
            if let Slot::Resident { value, bytes } = std::mem::replace(&mut e.slot, Slot::Cold) {
                st.stats.bytes_resident -= bytes as u64;
                st.stats.resident -= 1;
                st.stats.evictions += 1;
                out.push(value);
            }
        }
        out
    }

    /// Evicts what the budget asks for now (adapters released since the last load may have
    /// become evictable); returns how many went.
    pub fn trim(&self) -> usize {
        let mut st = self.lock();
        let evicted = self.evict(&mut st);
        drop(st);
        evicted.len()
    }

    /// Pins (never evicted) or unpins `name`. Pinning does not load it.
    pub fn pin(&self, name: &str, pinned: bool) -> Result<()> {
        let mut st = self.lock();
        let e = st.entries.get_mut(name).ok_or_else(|| {
            Error::not_found(format!("store: no adapter named '{name}' is registered"))
        })?;
        e.pinned = pinned;
        Ok(())
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> StoreStats {
        let st = self.lock();
        let mut s = st.stats;
        s.in_use = 0;
        s.pinned = 0;
        for e in st.entries.values() {
            if let Slot::Resident { value, .. } = &e.slot {
                s.in_use += u64::from(Arc::strong_count(value) > 1);
                s.pinned += u64::from(e.pinned);
            }
        }
        s
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A stand-in adapter: its name (or, published, any text) and the version it was given.
    #[derive(Debug, PartialEq)]
    struct Item(String, Version);
    impl Versioned for Item {
        fn set_version(&mut self, v: Version) {
            self.1 = v;
        }
    }
    impl PartialEq<&str> for Item {
        fn eq(&self, o: &&str) -> bool {
            self.0 == *o
        }
    }

    fn store(budget: u64, loads: Arc<AtomicUsize>) -> Store<Item> {
        Store::new(
            budget,
            Box::new(move |name, path| {
                loads.fetch_add(1, Ordering::SeqCst);
                if name == "bad" {
                    return Err(Error::format("broken adapter"));
                }
                let tag = path
                    .file_name()
                    .map_or(String::new(), |f| f.to_string_lossy().into());
                let text = if tag.starts_with("v") {
                    tag
                } else {
                    name.to_string()
                };
                Ok((Item(text, Version::default()), 100))
            }),
        )
    }

    #[test]
    fn publishing_swaps_new_acquisitions_and_keeps_held_versions_whole() {
        let s = store(150, Arc::new(AtomicUsize::new(0)));
        let dir = tempfile::tempdir().unwrap();
        for v in ["v1", "v2"] {
            std::fs::create_dir(dir.path().join(v)).unwrap();
        }
        s.register("a", dir.path()).unwrap();
        let g0 = s.acquire("a").unwrap();
        assert_eq!((g0.0.as_str(), g0.1.generation), ("a", 0));
        let id = g0.1.id;
        // From a folder: the next acquisition loads it; the held version is untouched.
        let v = s.publish_path("a", &dir.path().join("v1")).unwrap();
        assert_eq!(v, Version { id, generation: 1 });
        let g1 = s.acquire("a").unwrap();
        assert_eq!((g1.0.as_str(), g1.1), ("v1", v));
        assert_eq!((g0.0.as_str(), g0.1.generation), ("a", 0));
        // From memory: resident at once, never evicted, even far over budget.
        let v2 = s
            .publish("a", Item("mem".into(), Version::default()), 1000)
            .unwrap();
        assert_eq!(v2.generation, 2);
        assert_eq!(s.acquire("a").unwrap().0, "mem");
        assert_eq!(s.trim(), 0);
        assert_eq!(s.version("a").unwrap(), v2);
        // A new name by publish; ids differ per name; stats count it.
        let b = s
            .publish("b", Item("b".into(), Version::default()), 1)
            .unwrap();
        assert_ne!(b.id, id);
        assert_eq!(b.generation, 0);
        let st = s.stats();
        assert_eq!((st.registered, st.publishes), (2, 3));
        drop((g0, g1));
        // Back to a folder version: the memory one goes when no one holds it.
        s.publish_path("a", &dir.path().join("v2")).unwrap();
        assert_eq!(s.acquire("a").unwrap().0, "v2");
        assert_eq!(s.acquire("a").unwrap().1.generation, 3);
    }

    #[test]
    fn lru_eviction_skips_held_and_pinned_adapters() {
        let loads = Arc::new(AtomicUsize::new(0));
        let s = store(250, loads.clone());
        let dir = std::env::temp_dir();
        for n in ["a", "b", "c", "d", "bad"] {
            s.register(n, &dir).unwrap();
        }
        assert!(s.register("a", &dir).is_err());
        assert!(s.register("x", Path::new("/no/such/path")).is_err());
        drop(s.acquire("a").unwrap());
        drop(s.acquire("b").unwrap());
        assert_eq!(*s.acquire("a").unwrap(), "a"); // a hit; now b is the least recent
        let held_c = s.acquire("c").unwrap(); // 300 > 250: evicts b
        let st = s.stats();
        assert_eq!((st.resident, st.bytes_resident, st.evictions), (2, 200, 1));
        assert_eq!((st.loads, st.hits, st.in_use), (3, 1, 1));
        s.pin("a", true).unwrap();
        // d needs room: a is pinned, c is held, so nothing can go; over budget is allowed.
        let held_d = s.acquire("d").unwrap();
        assert_eq!(s.stats().bytes_resident, 300);
        drop(held_c);
        assert_eq!(s.trim(), 1); // c, released, goes now
        drop(held_d);
        assert_eq!(s.stats().pinned, 1);
        assert_eq!(loads.load(Ordering::SeqCst), 4);
        // b was evicted: the next use loads it again.
        drop(s.acquire("b").unwrap());
        assert_eq!(loads.load(Ordering::SeqCst), 5);
        // A failed load is reported and leaves the entry registered.
        assert!(s.acquire("bad").is_err());
        assert!(s.acquire("bad").is_err());
        assert_eq!(s.stats().load_failures, 2);
        assert!(s.acquire("nope").is_err());
        assert!(s.pin("nope", true).is_err());
    }

    #[test]
    fn many_threads_share_one_load() {
        let loads = Arc::new(AtomicUsize::new(0));
        let s = Arc::new(store(0, loads.clone()));
        s.register("a", &std::env::temp_dir()).unwrap();
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || (0..100).all(|_| *s.acquire("a").unwrap() == "a"))
            })
            .collect();
        assert!(handles.into_iter().all(|h| h.join().unwrap()));
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert_eq!(s.stats().hits, 799);
    }

    #[test]
    fn held_adapters_outlive_the_store() {
        let s = store(0, Arc::new(AtomicUsize::new(0)));
        s.register("a", &std::env::temp_dir()).unwrap();
        let a = s.acquire("a").unwrap();
        drop(s);
        assert_eq!(*a, "a");
    }
}
