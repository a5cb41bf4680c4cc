//! Where tensors go in device memory: pure functions (no device needed), used by the CUDA
//! backend when weights or adapters are opened on a CUDA runtime, and unit-tested without one.
//!
//! - [`uploadable`]: which tensors of a safetensors file get a device copy (those
//!   `rf_weights_get` can return: F32/F16/BF16 with at most 2 dimensions; the rest stay on the
//!   host only, where `rf_weights_get` reports them as before).
//! - [`pack`]: packs byte ranges into one allocation per group at [`DEVICE_ALIGN`]-aligned
//!   offsets (a group = a shard of a sharded model, or a whole adapter).
//! - [`plan_weights`]: the placement of every tensor of opened weights, one allocation per shard.
//! - [`staging_chunks`]: how a list of host ranges streams through the pinned staging buffers.

use crate::error::{Error, Result};
use crate::weights::{TensorEntry, Weights};

/// Alignment of every tensor placed in device memory (bytes). 256 is what `cudaMalloc`
/// guarantees for an allocation's start; it keeps 16-byte vector loads and the tensor-core path
/// (rows aligned to 16 bytes when the row length allows it) available for every tensor.
///
/// cbindgen:ignore
pub const DEVICE_ALIGN: usize = 256;

/// Does this tensor get a device copy? Exactly the tensors `Weights::get` turns into a matrix.
pub fn uploadable(e: &TensorEntry) -> bool {
    e.dtype.is_some() && e.shape.len() <= 2
}

/// One range inside a group's allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub group: usize,
    pub offset: usize,
    pub bytes: usize,
}

/// Packs `items` (group, bytes) in order: each item starts at the next multiple of
/// [`DEVICE_ALIGN`] inside its group (an empty item takes no space and gets offset 0). Returns each item's placement and each group's total
/// (`n_groups` entries; 0 for a group with no bytes: nothing to allocate). Sizes that overflow
/// are OUT_OF_MEMORY (no device has that much memory), a group index out of range INTERNAL.
pub fn pack(items: &[(usize, usize)], n_groups: usize) -> Result<(Vec<Placement>, Vec<usize>)> {
    let mut totals = vec![0usize; n_groups];
    let mut out = Vec::with_capacity(items.len());
    for &(group, bytes) in items {
        let t = totals
            .get_mut(group)
            .ok_or_else(|| Error::internal(format!("group {group} of {n_groups}")))?;
        if bytes == 0 {
            // Nothing to hold (a tensor with no elements): no space, offset 0.
            out.push(Placement {
                group,
                offset: 0,
                bytes,
            });
            continue;
        }
        let offset = t
            .checked_next_multiple_of(DEVICE_ALIGN)
            .filter(|o| {
                o.checked_add(bytes)
                    .is_some_and(|e| e <= isize::MAX as usize)
            })
            .ok_or_else(|| {
                Error::oom(format!(
                    "{bytes} more bytes after {t} overflow the address space"
                ))
            })?;
        *t = offset + bytes;
        out.push(Placement {
            group,
            offset,
            bytes,
        });
    }
    Ok((out, totals))
}

/// The device layout of opened weights: `tensors[i]` for `weights.entries()[i]` (None = stays on
/// the host), `shard_bytes[s]` = the allocation of shard `s` (0 = none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightsPlan {
    pub tensors: Vec<Option<Placement>>,
    pub shard_bytes: Vec<usize>,
}

impl WeightsPlan {
    /// Total device bytes.
    pub fn total(&self) -> usize {
        self.shard_bytes.iter().sum()
    }
}

/// Plans the upload of every uploadable tensor, packed per shard in file order (a shard's
/// tensors then stream from its file sequentially).
pub fn plan_weights(w: &Weights) -> Result<WeightsPlan> {
    let entries = w.entries();
    let mut items = Vec::new();
    let mut which = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if uploadable(e) {
            items.push((e.shard(), e.byte_len()));
            which.push(i);
        }
    }
    let (placed, shard_bytes) = pack(&items, w.shard_count())
        .map_err(|e| e.context(format!("weights '{}'", w.path().display())))?;
    let mut tensors = vec![None; entries.len()];
    for (i, p) in which.into_iter().zip(placed) {
        tensors[i] = Some(p);
    }
    Ok(WeightsPlan {
        tensors,
        shard_bytes,
    })
}

/// How `lens` (bytes of each piece, in order) stream through two staging buffers of `chunk`
/// bytes: (piece, offset inside the piece, length), alternating buffers 0, 1, 0, ... Covers each
/// piece exactly once, in order; empty pieces produce nothing.
pub fn staging_chunks(lens: &[usize], chunk: usize) -> Vec<(usize, usize, usize)> {
    let chunk = chunk.max(1);
    let mut out = Vec::new();
    for (p, &len) in lens.iter().enumerate() {
        let mut off = 0;
        while off < len {
            let n = chunk.min(len - off);
            out.push((p, off, n));
            off += n;
        }
    }
    out
}
