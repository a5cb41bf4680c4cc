//! Importance scores with EMA smoothing (AdaLoRA / ElaLoRA): sensitivity I = |w · g|,
//! I-bar <- beta1 I-bar + (1 - beta1) I, U-bar <- beta2 U-bar + (1 - beta2) |I - I-bar| (with the
//! new I-bar), score s = I-bar · U-bar.

use crate::adapter::Lora;
use crate::error::Result;
use crate::train::state::ImportanceState;

/// One EMA update of an element; returns its new score.
#[inline]
pub fn ema_update(ibar: &mut f32, ubar: &mut f32, sensitivity: f32, beta1: f32, beta2: f32) -> f32 {
    *ibar = beta1 * *ibar + (1.0 - beta1) * sensitivity;
    *ubar = beta2 * *ubar + (1.0 - beta2) * (sensitivity - *ibar).abs();
    *ibar * *ubar
}

/// Allocates (zeroed) importance state on a trainable module.
pub fn init(lora: &mut Lora) -> Result<()> {
    let t = lora.train_state_mut()?;
    let (na, nb, cap) = (t.a.len(), t.b.len(), t.capacity());
    t.importance = Some(ImportanceState {
        ia: vec![0.0; na],
        ua: vec![0.0; na],
        ib: vec![0.0; nb],
        ub: vec![0.0; nb],
        ie: vec![0.0; cap],
        ue: vec![0.0; cap],
    });
    Ok(())
}

/// Updates the EMAs of every element of the active components from the current weights and
/// gradients.
pub fn update(lora: &mut Lora, beta1: f32, beta2: f32) -> Result<()> {
    let (k, cap) = (lora.in_features, lora.capacity);
    if lora.train_state()?.importance.is_none() {
        init(lora)?;
    }
    let t = lora.train_state_mut()?;
    let imp = t.importance.as_mut().expect("initialised above");
    let n = t.b.len() / cap;
    for c in 0..cap {
        if !t.mask[c] {
            continue;
        }
        for i in c * k..(c + 1) * k {
            ema_update(
                &mut imp.ia[i],
                &mut imp.ua[i],
                (t.a[i] * t.ga[i]).abs(),
                beta1,
                beta2,
            );
        }
        for j in 0..n {
            let i = j * cap + c;
            ema_update(
                &mut imp.ib[i],
                &mut imp.ub[i],
                (t.b[i] * t.gb[i]).abs(),
                beta1,
                beta2,
            );
        }
        if let Some(e) = &t.e {
            ema_update(
                &mut imp.ie[c],
                &mut imp.ue[c],
                (e[c] * t.ge[c]).abs(),
                beta1,
                beta2,
            );
        }
    }
    Ok(())
}

/// Component scores: s(E_c) + mean_j s(A_c,j) + mean_j s(B_j,c); masked components get -inf.
pub fn component_scores(lora: &Lora) -> Result<Vec<f32>> {
    let (k, cap) = (lora.in_features, lora.capacity);
    let t = lora.train_state()?;
    let n = t.b.len() / cap;
    let Some(imp) = &t.importance else {
        return Ok(vec![0.0; cap]);
    };
    Ok((0..cap)
        .map(|c| {
            if !t.mask[c] {
                return f32::NEG_INFINITY;
            }
            let sa: f64 = (c * k..(c + 1) * k)
                .map(|i| imp.ia[i] as f64 * imp.ua[i] as f64)
                .sum::<f64>()
                / k as f64;
            let sb: f64 = (0..n)
                .map(|j| imp.ib[j * cap + c] as f64 * imp.ub[j * cap + c] as f64)
                .sum::<f64>()
                / n as f64;
            let se = imp.ie[c] as f64 * imp.ue[c] as f64;
            (se + sa + sb) as f32
        })
        .collect())
}

/// Forgets the importance of component `c` (a grown or re-initialised component).
pub fn reset_component(lora: &mut Lora, c: usize) -> Result<()> {
    let (k, cap) = (lora.in_features, lora.capacity);
    let t = lora.train_state_mut()?;
    let n = t.b.len() / cap;
    if let Some(imp) = t.importance.as_mut() {
        imp.ia[c * k..(c + 1) * k].fill(0.0);
        imp.ua[c * k..(c + 1) * k].fill(0.0);
        for j in 0..n {
            imp.ib[j * cap + c] = 0.0;
            imp.ub[j * cap + c] = 0.0;
        }
        imp.ie[c] = 0.0;
        imp.ue[c] = 0.0;
    }
    Ok(())
}
