//! adapter_config.json from arbitrary bytes, then its rank_pattern / alpha_pattern compiled and
//! matched against module names (the input's own keys and a fixed list). Errors must be FORMAT
//! or UNSUPPORTED and name the config file or the pattern field; matching must stay fast (the
//! regex sizes are capped; libFuzzer's -timeout flags slow inputs).
#![no_main]
use libfuzzer_sys::fuzz_target;
use rankfuse::adapter::pattern::PatternMap;
use rankfuse::adapter::peft::PeftConfig;
use rankfuse::Status;
use rankfuse_fuzz::check_error;
use std::path::Path;

const MODULES: [&str; 6] = [
    "layers.0.self_attn.q_proj",
    "model.layers.10.mlp.down_proj",
    "q_proj",
    "",
    ".",
    "a.b.c.d.e.f.g.h.i.j.k.l.m.n.o.p",
];

fuzz_target!(|data: &[u8]| {
    let cfg = match PeftConfig::parse(Path::new("fuzz/adapter_config.json"), data) {
        Ok(c) => c,
        Err(e) => {
            check_error(
                &e,
                &[Status::Format, Status::Unsupported],
                Some("adapter_config.json"),
            );
            return;
        }
    };
    assert!(cfg.r >= 1 && cfg.lora_alpha.is_finite());
    let keys: Vec<String> = cfg
        .rank_pattern
        .iter()
        .map(|(k, _)| k.clone())
        .chain(cfg.alpha_pattern.iter().map(|(k, _)| k.clone()))
        .collect();
    let ranks = PatternMap::new("rank_pattern", cfg.rank_pattern.clone());
    let alphas = PatternMap::new("alpha_pattern", cfg.alpha_pattern.clone());
    for (field, m) in [
        ("rank_pattern", ranks.as_ref().err()),
        ("alpha_pattern", alphas.as_ref().err()),
    ] {
        if let Some(e) = m {
            check_error(e, &[Status::Format], Some(field));
        }
    }
    for module in MODULES
        .iter()
        .copied()
        .chain(keys.iter().map(|s| s.as_str()))
    {
        if let Ok(r) = &ranks {
            if let Some(v) = r.resolve(module) {
                assert!(v >= 1);
            }
        }
        if let Ok(a) = &alphas {
            if let Some(v) = a.resolve(module) {
                assert!(v.is_finite());
            }
        }
    }
});
