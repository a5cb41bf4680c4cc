//! Publish under load (the harness of `rankfuse soak`, src/bin/rankfuse/soak/harness.rs, run in
//! this process): 8 callers acquire a stored name, run a mixed batch and release while a
//! publisher publishes a version every 0.3 ms (from a folder or from memory, with a rank change
//! every fourth) and pins / trims, and a retirer frees stores and acquisitions while versions are
//! held. Every output must equal, bit for bit, the serial result of the version that call
//! reported; generations never go back; no publish is lost; the counters add up; every adapter
//! made is freed (so this file holds one test: the harness counts adapters process-wide).
//! Seconds: RANKFUSE_SOAK_SECONDS (default 2); the long soak is
//! `rankfuse soak --threads 8 --seconds 60`.

mod common;

#[allow(dead_code)]
#[path = "../src/bin/rankfuse/soak/harness.rs"]
mod harness;

#[test]
fn publish_under_load_every_call_sees_one_whole_version() {
    let seconds = std::env::var("RANKFUSE_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let c = harness::Config {
        fixture: common::fixture(""),
        callers: 8,
        seconds,
        publish_us: 300,
        runtime_threads: 2,
    };
    let r = harness::run(&c).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        r.calls > 0 && r.publishes > 0 && r.retire_rounds > 0,
        "{r:?}"
    );
    eprintln!("soak: {r}");
}
