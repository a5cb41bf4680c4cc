//! Saving trained adapters as PEFT folders and resuming training from them.
//!
//! PEFT has no gains and no masks, so `rf_adapter_save_peft` folds the forward's gains
//! (E ⊙ mask) into B: PEFT loads a plain LoRA with the same outputs. What PEFT cannot hold goes
//! into the safetensors metadata under `rankfuse_train` (JSON, per module): capacity, rank, mask,
//! E, the raw B columns the fold cannot invert (gain 0), A rows / B columns beyond the saved rank,
//! and the E importance EMAs with the component scores. `enable_all` rebuilds the full training
//! state from it; element-level importance of A and B restarts from zero (an EMA warms up in a
//! few steps).

use crate::adapter::{Adapter, Lora, TensorData};
use crate::error::{Error, Result};
use crate::matrix::Matrix;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const TRAIN_META_KEY: &str = "rankfuse_train";

#[derive(Serialize, Deserialize, Debug, Default)]
struct TrainMeta {
    capacity: usize,
    rank: usize,
    mask: Vec<u8>,
    gains: Option<Vec<f32>>,
    /// Raw B columns (component -> n values) below the rank whose forward gain is 0.
    b_raw: BTreeMap<usize, Vec<f32>>,
    /// A rows rank..capacity (row-major) and B columns rank..capacity (column by column).
    a_tail: Vec<f32>,
    b_tail: Vec<Vec<f32>>,
    importance_e: Option<(Vec<f32>, Vec<f32>)>,
    scores: Option<Vec<f32>>,
}

/// B[:, :r] with the forward's gains folded in (compute dtype), when the module has gains or a
/// mask; None when B can be saved as it is.
pub fn folded_b(l: &Lora, r: usize) -> Option<Matrix> {
    let t = l.train.as_deref()?;
    t.gains_eff.as_ref()?;
    let n = l.out_features;
    let bv = l.b_view(r);
    let mut vals = vec![0f32; n * r];
    for j in 0..n {
        for c in 0..r {
            vals[j * r + c] = t.b[j * l.capacity + c] * t.gain(c);
        }
    }
    Matrix::from_f32(bv.dtype, n, r, &vals).ok()
}

/// The `rankfuse_train` metadata value, when any module is trainable.
pub fn save_meta(adapter: &Adapter) -> Result<Option<String>> {
    let mut all: BTreeMap<String, TrainMeta> = BTreeMap::new();
    for l in adapter.modules() {
        let Some(t) = l.train.as_deref() else {
            continue;
        };
        let (k, cap, r) = (l.in_features, l.capacity, l.rank());
        let n = l.out_features;
        let mut m = TrainMeta {
            capacity: cap,
            rank: r,
            mask: t.mask.iter().map(|&b| b as u8).collect(),
            gains: t.e.clone(),
            a_tail: t.a[r * k..].to_vec(),
            b_tail: (r..cap)
                .map(|c| (0..n).map(|j| t.b[j * cap + c]).collect())
                .collect(),
            ..Default::default()
        };
        if t.gains_eff.is_some() {
            for c in 0..r {
                if t.gain(c) == 0.0 {
                    m.b_raw
                        .insert(c, (0..n).map(|j| t.b[j * cap + c]).collect());
                }
            }
        }
        if let Some(imp) = &t.importance {
            m.importance_e = Some((imp.ie.clone(), imp.ue.clone()));
            // Masked components score -inf, which JSON cannot hold: they are written as 0.
            let sc = crate::rank::importance::component_scores(l)?;
            m.scores = Some(
                sc.into_iter()
                    .map(|v| if v.is_finite() { v } else { 0.0 })
                    .collect(),
            );
        }
        all.insert(l.name.clone(), m);
    }
    if all.is_empty() {
        return Ok(None);
    }
    serde_json::to_string(&all)
        .map(Some)
        .map_err(|e| Error::internal(e.to_string()))
}

/// Turns training on for every module; modules loaded from a file saved by rankfuse get their
/// capacity, mask, gains and the rest back from the metadata.
pub fn enable_all(adapter: &mut Adapter) -> Result<()> {
    let name = adapter.name.clone();
    for l in adapter.modules_mut() {
        enable_one(l).map_err(|e| e.context(format!("adapter '{name}'")))?;
    }
    Ok(())
}

fn stored_meta(l: &Lora) -> Result<Option<TrainMeta>> {
    let TensorData::Mapped { _keep, .. } = &l.a else {
        return Ok(None);
    };
    let Some(text) = _keep.metadata().get(TRAIN_META_KEY) else {
        return Ok(None);
    };
    let mut all: BTreeMap<String, TrainMeta> = serde_json::from_str(text).map_err(|e| {
        Error::format(format!(
            "file '{}': metadata '{TRAIN_META_KEY}' is not valid: {e}",
            _keep.path().display()
        ))
    })?;
    Ok(all.remove(&l.name))
}

fn enable_one(l: &mut Lora) -> Result<()> {
    if l.train.is_some() {
        return Ok(());
    }
    let Some(m) = stored_meta(l)? else {
        return l.enable_training();
    };
    let (k, n, r) = (l.in_features, l.out_features, l.capacity);
    let cap = m.capacity;
    let bad = |why: &str| Error::format(format!("module '{}': rankfuse_train {why}", l.name));
    if m.rank != r
        || cap < r
        || m.mask.len() != cap
        || m.a_tail.len() != (cap - r) * k
        || m.b_tail.len() != cap - r
        || m.b_tail.iter().any(|c| c.len() != n)
        || m.gains.as_ref().is_some_and(|g| g.len() != cap)
        || m.b_raw.iter().any(|(&c, v)| c >= r || v.len() != n)
    {
        return Err(bad("does not match the saved tensors"));
    }
    let dtype = l.dtype();
    let av = l.a.view().to_f32_vec();
    let bv = l.b.view().to_f32_vec();
    let mask: Vec<bool> = m.mask.iter().map(|&v| v != 0).collect();
    let gain = |c: usize| -> f32 {
        if !mask[c] {
            0.0
        } else {
            m.gains.as_ref().map_or(1.0, |g| g[c])
        }
    };
    let has_fold = m.gains.is_some() || mask.iter().any(|&b| !b);
    let mut a = av;
    a.extend_from_slice(&m.a_tail);
    let mut b = vec![0f32; n * cap];
    for j in 0..n {
        for c in 0..r {
            let saved = bv[j * r + c];
            b[j * cap + c] = match m.b_raw.get(&c) {
                Some(col) => col[j],
                None if has_fold => saved / gain(c),
                None => saved,
            };
        }
        for c in r..cap {
            b[j * cap + c] = m.b_tail[c - r][j];
        }
    }
    l.a = TensorData::Owned(Matrix::from_f32(dtype, cap, k, &a)?);
    l.b = TensorData::Owned(Matrix::from_f32(dtype, n, cap, &b)?);
    l.capacity = cap;
    l.enable_training()?;
    l.set_rank(r)?;
    {
        let t = l.train_state_mut()?;
        // Masters exact in f32 (the compute copy may be rounded).
        t.a = a;
        t.b = b;
        t.mask = mask;
        if let Some(g) = m.gains {
            t.mom_e = super::state::Moments {
                m: vec![0.0; cap],
                v: vec![0.0; cap],
            };
            t.e = Some(g);
        }
        t.refresh_gains();
    }
    if let Some((ie, ue)) = m.importance_e {
        crate::rank::importance::init(l)?;
        let t = l.train_state_mut()?;
        let imp = t.importance.as_mut().expect("initialised");
        if ie.len() == cap && ue.len() == cap {
            imp.ie = ie;
            imp.ue = ue;
        }
    }
    l.sync_from_master()
}
