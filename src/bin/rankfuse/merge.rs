//! `rankfuse merge`: W' = W + s·B_r·A_r (or, with --unmerge, W - s·B_r·A_r) for every module of a
//! PEFT adapter, written with every other tensor of the base to a new safetensors file. Tensors
//! are produced one at a time while the file is written (peak memory: one merged tensor), and a
//! parity report compares the merged forward with the fused unmerged one per module.

use rankfuse::adapter::peft;
use rankfuse::algebra::merge::{self, Parity};
use rankfuse::dtype::DType;
use rankfuse::runtime::slot;
use rankfuse::{Error, Result, Runtime, Slot, Weights};
use safetensors::tensor::Dtype as StDtype;
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

#[derive(clap::Args)]
pub struct Args {
    /// Base weights (.safetensors or .safetensors.index.json) with `<module>.weight` [out, in].
    #[arg(long)]
    base: PathBuf,
    /// PEFT adapter folder.
    #[arg(long)]
    adapter: PathBuf,
    /// Use the first R components of every module (0 = each module's rank).
    #[arg(long, default_value_t = 0)]
    rank: usize,
    /// Multiplies every module's scale.
    #[arg(long, default_value_t = 1.0)]
    scale: f32,
    /// Subtract instead of add (the base holds merged weights).
    #[arg(long)]
    unmerge: bool,
    /// Output safetensors file (dtypes kept).
    #[arg(long)]
    out: PathBuf,
    /// Parity report (JSON); the markdown table goes to stdout. Rows of x per module.
    #[arg(long)]
    report: Option<PathBuf>,
    #[arg(long, default_value_t = 4)]
    parity_rows: usize,
}

/// Base tensor name for a PEFT module path (as `rankfuse apply` resolves it).
pub fn find_weight(base: &Weights, module: &str) -> Option<String> {
    let mut cands = vec![format!("{module}.weight"), format!("model.{module}.weight")];
    if let Some(m) = module.strip_prefix("model.") {
        cands.push(format!("{m}.weight"));
    }
    cands.into_iter().find(|c| base.contains(c))
}

/// One tensor of the output, produced when the serializer asks for its bytes.
struct OutTensor<'a> {
    name: String,
    st_dtype: StDtype,
    shape: Vec<usize>,
    len: usize,
    source: Source<'a>,
}

enum Source<'a> {
    Copy(&'a [u8]),
    Merge {
        slot: Slot<'a>,
        w: rankfuse::MatRef<'a>,
        sign: f32,
        ctx: &'a Ctx<'a>,
    },
}

struct Ctx<'a> {
    rt: &'a Runtime,
    parity: Mutex<Vec<Parity>>,
    errors: Mutex<Vec<Error>>,
    rows: usize,
    unmerge: bool,
}

impl OutTensor<'_> {
    fn produce(&self) -> Cow<'_, [u8]> {
        match &self.source {
            Source::Copy(b) => Cow::Borrowed(b),
            Source::Merge { slot, w, sign, ctx } => {
                let r = (|| -> Result<Vec<u8>> {
                    let m = merge::merged_tensor(slot, *w, *sign, w.dtype)?;
                    if ctx.rows > 0 {
                        let m32 = merge::merged_tensor(slot, *w, *sign, DType::F32)?;
                        // Merge: the fused forward runs on the input W. Unmerge: on the output.
                        let p = if ctx.unmerge {
                            merge::parity(
                                ctx.rt,
                                slot,
                                &self.name,
                                (m.view(), *w),
                                (m32.view(), *w),
                                ctx.rows,
                                7,
                            )
                        } else {
                            merge::parity(
                                ctx.rt,
                                slot,
                                &self.name,
                                (*w, m.view()),
                                (*w, m32.view()),
                                ctx.rows,
                                7,
                            )
                        };
                        match p {
                            Ok(p) => ctx.parity.lock().unwrap_or_else(|e| e.into_inner()).push(p),
                            Err(e) => ctx.errors.lock().unwrap_or_else(|e| e.into_inner()).push(e),
                        }
                    }
                    Ok(m.bytes().to_vec())
                })();
                match r {
                    Ok(b) => Cow::Owned(b),
                    Err(e) => {
                        ctx.errors
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(e.context(&self.name));
                        Cow::Owned(vec![0u8; self.len])
                    }
                }
            }
        }
    }
}

impl safetensors::View for &OutTensor<'_> {
    fn dtype(&self) -> StDtype {
        self.st_dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        self.produce()
    }
    fn data_len(&self) -> usize {
        self.len
    }
}

pub fn run(rt: &Runtime, a: &Args) -> Result<()> {
    let base = Weights::open(&a.base)?;
    let ad = peft::load(&a.adapter)?;
    if peft::fan_in_fan_out(&ad) {
        return Err(Error::unsupported(format!(
            "adapter '{}': fan_in_fan_out (Conv1D [in, out] weights) is not merged by rankfuse",
            a.adapter.display()
        )));
    }
    let ctx = Ctx {
        rt,
        parity: Mutex::new(Vec::new()),
        errors: Mutex::new(Vec::new()),
        rows: a.parity_rows,
        unmerge: a.unmerge,
    };
    let sign = if a.unmerge { -1.0 } else { 1.0 };
    // Module -> base tensor, checked before anything is written.
    let mut merges: HashMap<String, Slot<'_>> = HashMap::new();
    for l in ad.modules() {
        let t = find_weight(&base, &l.name).ok_or_else(|| {
            Error::not_found(format!(
                "base '{}': no weight for module '{}' (looked for '{}.weight')",
                a.base.display(),
                l.name,
                l.name
            ))
        })?;
        let s = slot(l, a.rank, a.scale)?;
        let w = base.get(&t)?;
        if w.rows != l.out_features || w.cols != l.in_features {
            return Err(Error::shape(format!(
                "module '{}': adapter is {} x {} (out x in), base tensor '{t}' is {} x {}",
                l.name, l.out_features, l.in_features, w.rows, w.cols
            )));
        }
        merges.insert(t, s);
    }
    let mut outs = Vec::new();
    for e in base.entries() {
        let bytes = base.bytes(&e.name)?;
        let st: Option<StDtype> = serde_json::from_value(serde_json::json!(e.dtype_name)).ok();
        let source = match merges.get(&e.name) {
            Some(s) => Source::Merge {
                slot: *s,
                w: base.get(&e.name)?,
                sign,
                ctx: &ctx,
            },
            None => Source::Copy(bytes),
        };
        outs.push(OutTensor {
            name: e.name.clone(),
            st_dtype: st.ok_or_else(|| {
                Error::unsupported(format!("tensor '{}': dtype {}", e.name, e.dtype_name))
            })?,
            shape: e.shape.clone(),
            len: bytes.len(),
            source,
        });
    }
    let n_out = outs.len();
    let items: Vec<(&str, &OutTensor<'_>)> = outs.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut md = base.metadata().clone();
    md.insert(
        "rankfuse_merge".into(),
        format!(
            "{} adapter '{}' (rank {}, scale x{})",
            if a.unmerge { "unmerged" } else { "merged" },
            a.adapter.display(),
            a.rank,
            a.scale
        ),
    );
    safetensors::serialize_to_file(items, Some(md), &a.out).map_err(|e| {
        Error::io(format!(
            "file '{}': cannot write safetensors: {e}",
            a.out.display()
        ))
    })?;
    if let Some(e) = std::mem::take(&mut *ctx.errors.lock().unwrap_or_else(|e| e.into_inner()))
        .into_iter()
        .next()
    {
        let _ = std::fs::remove_file(&a.out);
        return Err(e);
    }
    let mut parity = std::mem::take(&mut *ctx.parity.lock().unwrap_or_else(|e| e.into_inner()));
    parity.sort_by(|x, y| x.module.cmp(&y.module));
    if !parity.is_empty() {
        print!("{}", merge::parity_markdown(&parity, a.unmerge));
    }
    if let Some(p) = &a.report {
        let j =
            serde_json::to_string_pretty(&parity).map_err(|e| Error::internal(e.to_string()))?;
        std::fs::write(p, j).map_err(|e| Error::from_io(p, &e))?;
    }
    eprintln!(
        "{} {} modules into {} ({} tensors)",
        if a.unmerge { "unmerged" } else { "merged" },
        merges.len(),
        a.out.display(),
        n_out
    );
    Ok(())
}
