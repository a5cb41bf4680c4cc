//! DyLoRA: a seeded sampler of the truncation rank b, uniform in [r_min, r_max], drawn once per
//! step and used for every layer (as the paper's released code). The scale at b follows the
//! module's rule: alpha / b (LoRA) or alpha / sqrt(b) (rsLoRA) — `Lora::scale_at(b)`.

use crate::error::{Error, Result};
use crate::rng::SplitMix64;

#[derive(Clone, Debug)]
pub struct DyLoraSampler {
    rng: SplitMix64,
    pub r_min: usize,
    pub r_max: usize,
}

impl DyLoraSampler {
    pub fn new(seed: u64, r_min: usize, r_max: usize) -> Result<DyLoraSampler> {
        if r_min == 0 || r_min > r_max || r_max > (1 << 16) {
            return Err(Error::invalid(format!(
                "DyLoRA: need 1 <= r_min <= r_max <= 65536, got r_min = {r_min}, r_max = {r_max}"
            )));
        }
        Ok(DyLoraSampler {
            rng: SplitMix64::new(seed),
            r_min,
            r_max,
        })
    }
    /// The next truncation rank b.
    pub fn sample(&mut self) -> usize {
        self.rng.range(self.r_min, self.r_max)
    }
}
