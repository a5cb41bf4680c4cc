//! DyLoRA sampler and RankAdaptor (performance model + search + rank_pattern on save).

use rankfuse::rank::dylora::DyLoraSampler;
use rankfuse::rank::schedule::{self, LayerInfo, Probe};
use rankfuse::{Adapter, DType, Lora, Scaling};

#[test]
fn dylora_sampler_is_seeded_uniform_and_in_range() {
    let mut a = DyLoraSampler::new(42, 2, 6).unwrap();
    let mut b = DyLoraSampler::new(42, 2, 6).unwrap();
    let mut counts = [0usize; 7];
    for _ in 0..5000 {
        let x = a.sample();
        assert_eq!(x, b.sample());
        assert!((2..=6).contains(&x));
        counts[x] += 1;
    }
    for (v, &c) in counts.iter().enumerate().skip(2) {
        assert!(
            (800..1200).contains(&c),
            "value {v} drawn {c} times of 5000"
        );
    }
    assert!(DyLoraSampler::new(1, 0, 4).is_err());
    assert!(DyLoraSampler::new(1, 5, 4).is_err());
}

fn layers() -> Vec<LayerInfo> {
    let ratios = [0.2, 0.35, 0.5, 0.5, 0.35, 0.2];
    ratios
        .iter()
        .enumerate()
        .map(|(i, &p)| LayerInfo {
            name: format!("l{i}"),
            index: i,
            n_layers: 6,
            in_features: 64,
            out_features: (256.0 * (1.0 - p)) as usize,
            prune_ratio: p,
        })
        .collect()
}

#[test]
fn rankadaptor_fits_a_known_model_and_searches_within_budget() {
    let ls = layers();
    // Ground truth: quality = sum_l (1 + 3 p_l) ln(1 + r_l)  (heavier-pruned layers gain more).
    let truth = |ranks: &[usize]| -> f64 {
        ls.iter()
            .zip(ranks)
            .map(|(l, &r)| (1.0 + 3.0 * l.prune_ratio) * (1.0 + r as f64).ln())
            .sum()
    };
    let budget: usize = ls.iter().map(|l| l.params(8)).sum();
    let maps = schedule::probe_maps(&ls, 30, budget, 1, 16, 7);
    assert_eq!(maps.len(), 30);
    let probes: Vec<Probe> = maps
        .iter()
        .map(|m| Probe {
            ranks: m.clone(),
            quality: truth(m),
        })
        .collect();
    let model = schedule::fit(&ls, &probes, 1e-6).unwrap();
    for p in &probes {
        let e = (model.predict(&ls, &p.ranks) - p.quality).abs();
        assert!(e < 1e-6 * p.quality.abs().max(1.0), "fit error {e}");
    }
    let map = schedule::search(&model, &ls, budget, 1, 16, 200, 3).unwrap();
    let cost: usize = ls.iter().zip(&map).map(|(l, &r)| l.params(r)).sum();
    assert!(cost <= budget, "{cost} > {budget}");
    // Better than uniform under the true model, with more rank where pruning was heavier.
    assert!(truth(&map) > truth(&[8; 6]), "{map:?}");
    assert!(map[2] > map[0] && map[3] > map[5], "{map:?}");
    assert!(schedule::fit(&ls, &probes[..1], 1e-3).is_err());
}

#[test]
fn rank_map_is_saved_as_rank_pattern() {
    let mut ad = Adapter::new("ra");
    for (i, r) in [4usize, 8, 4].iter().enumerate() {
        let l = Lora::new_trainable(
            &format!("model.layers.{i}.mlp.up_proj"),
            16,
            24,
            8,
            16.0,
            Scaling::Lora,
            DType::F32,
            i as u64,
        )
        .unwrap();
        l.set_rank(*r).unwrap();
        ad.add(l).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    rankfuse::adapter::peft::save(&ad, dir.path()).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["rank_pattern"][r"model\.layers\.1\.mlp\.up_proj"], 8);
    let back = rankfuse::adapter::peft::load(dir.path()).unwrap();
    assert_eq!(back.get("model.layers.1.mlp.up_proj").unwrap().rank(), 8);
    assert_eq!(back.get("model.layers.0.mlp.up_proj").unwrap().rank(), 4);
}
