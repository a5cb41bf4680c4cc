//! Every interleaving (loom) of a reader, a publisher and a retirer on one adapter name of
//! src/store.rs, with a budget of 1 byte (so every unheld folder version is evicted at once).
//! Checked in every interleaving:
//!  - no torn read: the version a reader gets is whole (its A, B and rank all belong to the
//!    generation it reports) and still alive while held;
//!  - the generations a thread sees never go back, and no publish is lost: once the publisher
//!    has returned, every acquisition gets its version;
//!  - every version made is freed exactly once, and only after its last holder let go (none
//!    is left when the store and every holder are gone);
//!  - the counters add up (and never wrap: overflow checks are on).
#![cfg(loom)]

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use rankfuse_loom::store::{Loader, Store, Version, Versioned};
use std::path::{Path, PathBuf};

/// Versions alive (made and not yet freed), shared by a model's threads.
#[derive(Clone)]
struct Live(Arc<AtomicUsize>);

/// A stand-in adapter whose parts are all derived from one tag: a torn read would mix tags.
struct Item {
    tag: u64,
    a: [u64; 2],
    b: [u64; 2],
    rank: u64,
    version: Version,
    /// 1 while alive; its Drop takes it to 0 (and would see 0 on a second free).
    alive: Arc<AtomicUsize>,
    live: Live,
}

impl Item {
    fn new(tag: u64, live: &Live) -> Item {
        live.0.fetch_add(1, Ordering::SeqCst);
        Item {
            tag,
            a: [tag; 2],
            b: [tag * 10; 2],
            rank: tag + 1,
            version: Version::default(),
            alive: Arc::new(AtomicUsize::new(1)),
            live: live.clone(),
        }
    }

    /// What a call does with its version: every part read must belong to one version.
    fn read(&self) -> u64 {
        assert_eq!(
            self.alive.load(Ordering::SeqCst),
            1,
            "a held version was freed"
        );
        let t = self.tag;
        assert!(
            self.a == [t; 2] && self.b == [t * 10; 2] && self.rank == t + 1,
            "torn read"
        );
        self.version.generation
    }
}

impl Drop for Item {
    fn drop(&mut self) {
        assert_eq!(self.alive.fetch_sub(1, Ordering::SeqCst), 1, "freed twice");
        self.live.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Versioned for Item {
    fn set_version(&mut self, v: Version) {
        self.version = v;
    }
}

/// Two folders: the first version of the name and the one published from a folder. The loader
/// tags what it loads by folder (registered: tag 0; published from a folder: tag 1).
fn folders() -> (PathBuf, PathBuf) {
    let d = std::env::temp_dir();
    let p = d.parent().unwrap_or(Path::new("/")).to_path_buf();
    (d, p)
}

fn store(live: &Live) -> Store<Item> {
    let (v0, _) = folders();
    let live = live.clone();
    let loader: Loader<Item> =
        Box::new(move |_, path| Ok((Item::new(u64::from(path != v0), &live), 1)));
    let s = Store::new(1, loader);
    s.register("a", &folders().0).unwrap();
    s
}

/// The reader: acquire, use (check whole and alive), release; twice, generations never going
/// back. Returns the last generation seen.
fn reader(s: &Store<Item>, want_tag: impl Fn(u64) -> u64) -> u64 {
    let mut last = 0;
    for _ in 0..2 {
        let it = s.acquire("a").unwrap();
        let g = it.read();
        assert_eq!(
            it.tag,
            want_tag(g),
            "generation {g} holds the wrong version"
        );
        assert!(g >= last, "generation {g} after {last}");
        last = g;
        drop(it);
    }
    last
}

/// Publish from memory while a reader holds (and loads) the folder version and a retirer trims
/// and lets go of the store: generation 1 is the memory version (tag 7).
#[test]
fn publish_from_memory_against_a_reader_and_a_retirer() {
    loom::model(|| {
        let live = Live(Arc::new(AtomicUsize::new(0)));
        let s = Arc::new(store(&live));
        let tag = |g| if g == 0 { 0 } else { 7 };
        let r = {
            let s = s.clone();
            loom::thread::spawn(move || reader(&s, tag))
        };
        let e = {
            let s = s.clone();
            loom::thread::spawn(move || {
                s.trim();
                // The retirer's reference goes: the store is freed by whoever lets go last.
                drop(s);
            })
        };
        let v = s.publish("a", Item::new(7, &live), 1).unwrap();
        assert_eq!(v.generation, 1);
        // No publish lost: from now on every acquisition gets it.
        let held = s.acquire("a").unwrap();
        assert_eq!((held.read(), held.tag), (1, 7));
        r.join().unwrap();
        e.join().unwrap();
        let st = s.stats();
        assert_eq!((st.publishes, st.in_use, st.resident), (1, 1, 1));
        assert_eq!(st.bytes_resident, 1);
        // The store goes while `held` is still held: it stays whole until released.
        drop(s);
        held.read();
        drop(held);
        assert_eq!(
            live.0.load(Ordering::SeqCst),
            0,
            "a version was never freed"
        );
    });
}

/// Publish from a folder while the reader's first acquisition may be loading the previous
/// version (the publish waits for that load; the load never overwrites the publish), and the
/// retirer evicts: generation 1 is the second folder (tag 1).
#[test]
fn publish_from_a_folder_against_a_loading_reader_and_a_retirer() {
    loom::model(|| {
        let live = Live(Arc::new(AtomicUsize::new(0)));
        let s = Arc::new(store(&live));
        let r = {
            let s = s.clone();
            loom::thread::spawn(move || reader(&s, |g| g))
        };
        let e = {
            let s = s.clone();
            loom::thread::spawn(move || s.trim())
        };
        let v = s.publish_path("a", &folders().1).unwrap();
        assert_eq!(v.generation, 1);
        let held = s.acquire("a").unwrap();
        assert_eq!((held.read(), held.tag), (1, 1));
        r.join().unwrap();
        e.join().unwrap();
        let st = s.stats();
        assert_eq!(st.publishes, 1);
        assert_eq!(st.in_use, 1);
        assert_eq!(st.hits + st.loads, 3, "{st:?}");
        assert_eq!(st.load_failures, 0);
        drop(held);
        // Released: only the current version is left (it fits the budget), then nothing.
        s.trim();
        let st = s.stats();
        assert_eq!(
            (st.resident, st.bytes_resident, st.in_use),
            (1, 1, 0),
            "{st:?}"
        );
        assert_eq!(
            live.0.load(Ordering::SeqCst),
            1,
            "an old version was never freed"
        );
        drop(s);
        assert_eq!(
            live.0.load(Ordering::SeqCst),
            0,
            "a version outlived the store"
        );
    });
}
