//! GGUF LoRA adapters, as llama.cpp reads them (`llama_adapter_lora_init`, src/llama-adapter.cpp)
//! and `convert_lora_to_gguf.py` writes them:
//!
//! - metadata `general.type = "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha` (f32;
//!   missing or 0 = scale 1 whatever the rank, else scale = alpha / rank), and
//!   `general.architecture` (llama.cpp refuses an adapter whose architecture differs from the
//!   model's);
//! - per adapted base tensor `<base>.weight` two tensors `<base>.weight.lora_a` with GGUF dims
//!   [in, r] (row-major [r, in], PEFT's lora_A) and `<base>.weight.lora_b` with dims [r, out]
//!   (row-major [out, r], PEFT's lora_B); the rank is lora_a's ne[1] and must equal lora_b's
//!   ne[0]; f32, f16, bf16 or q8_0 (q8_0 is decoded to f32 on load, exactly as ggml does).
//!
//! rankfuse names a module by its base tensor without `.weight` (`blk.0.attn_q`).
//!
//! llama.cpp has ONE alpha for the whole file. On save, the alpha that reproduces the most
//! modules' scales exactly is written; a module whose scale (rsLoRA, Fixed, its own
//! alpha_pattern alpha, a truncated rank) no single alpha reproduces gets its scale ratio
//! folded into lora_b (`AlphaPolicy::Auto`), or every scale is folded and alpha = 0
//! (`AlphaPolicy::Fold`). What llama.cpp cannot express but rankfuse can (the scaling rule and
//! alpha of modules written unfolded, the PEFT names and config) goes into `rankfuse.*` keys,
//! which llama.cpp ignores.

use super::names::{self, Family};
use super::{Adapter, Lora, Scaling, TensorData};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::matrix::Matrix;
use crate::weights::gguf_write::{self, GgufTensor};
use crate::weights::{MetaValue, Weights};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

pub const SUFFIX_A: &str = ".lora_a";
pub const SUFFIX_B: &str = ".lora_b";
pub const KEY_TYPE: &str = "general.type";
pub const KEY_ARCH: &str = "general.architecture";
pub const KEY_ADAPTER_TYPE: &str = "adapter.type";
pub const KEY_ALPHA: &str = "adapter.lora.alpha";
/// JSON: module -> {"scaling", "alpha"} for modules written unfolded (their rule is restored).
pub const KEY_RF_MODULES: &str = "rankfuse.modules";
/// Array of "<gguf module>\t<PEFT module>" strings.
pub const KEY_RF_PEFT_NAMES: &str = "rankfuse.peft_names";
/// The PEFT adapter_config.json the adapter came from (a JSON string).
pub const KEY_RF_PEFT_CONFIG: &str = "rankfuse.peft_config";

/// How the single GGUF alpha is chosen. Numbers match `rf_gguf_alpha`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AlphaPolicy {
    /// The alpha reproducing the most modules' scales exactly; the other modules' scale ratios
    /// are folded into their lora_b.
    #[default]
    Auto = 0,
    /// alpha = 0 (scale 1) and every module's scale folded into lora_b.
    Fold = 1,
}

impl AlphaPolicy {
    pub fn from_raw(v: i64) -> Option<AlphaPolicy> {
        match v {
            0 => Some(AlphaPolicy::Auto),
            1 => Some(AlphaPolicy::Fold),
            _ => None,
        }
    }
}

/// Options of [`save`].
#[derive(Clone, Debug, Default)]
pub struct SaveOptions {
    /// `general.architecture`; None = the adapter's own (from the GGUF it was loaded from).
    pub architecture: Option<String>,
    pub alpha: AlphaPolicy,
    /// Attention heads and key/value heads of the base (config.json's num_attention_heads and
    /// num_key_value_heads; 0 = same as heads). Needed only when Hugging Face q/k modules of a
    /// llama/mistral adapter are mapped: llama.cpp's converter permutes those rows (rotary
    /// layout), so lora_b's rows are permuted the same way.
    pub n_head: usize,
    pub n_head_kv: usize,
}

/// The heads a q (true) or k (false) projection is permuted by, or an error saying what to give.
fn heads_for(q: bool, n_head: usize, n_head_kv: usize, module: &str, arch: &str) -> Result<usize> {
    if n_head == 0 {
        return Err(Error::invalid(format!(
            "module '{module}': llama.cpp's '{arch}' layout permutes q/k rows per attention head; \
             give the base model's head counts (n_head, n_head_kv)"
        )));
    }
    Ok(if q || n_head_kv == 0 {
        n_head
    } else {
        n_head_kv
    })
}

/// Rows of a dense row-major matrix reordered: output row i = input row `perm[i]`.
fn permute_rows(bytes: &[u8], row_bytes: usize, perm: &[usize]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    for &src in perm {
        out.extend_from_slice(&bytes[src * row_bytes..(src + 1) * row_bytes]);
    }
    out
}

/// What [`save`] wrote, for reports.
#[derive(Clone, Debug)]
pub struct SaveReport {
    pub alpha: f32,
    pub architecture: String,
    /// (module as in the adapter, GGUF module, rank written, folded into lora_b?)
    pub modules: Vec<(String, String, usize, bool)>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ModuleMeta {
    scaling: String,
    alpha: f32,
}

fn meta_str<'a>(w: &'a Weights, key: &str) -> Result<Option<&'a str>> {
    match w.meta_get(key) {
        None => Ok(None),
        Some(MetaValue::Str(s)) => std::str::from_utf8(s).map(Some).map_err(|_| {
            Error::format(format!(
                "file '{}': metadata '{key}' is not UTF-8",
                w.path().display()
            ))
        }),
        Some(v) => Err(Error::format(format!(
            "file '{}': metadata '{key}' is {}, not a string",
            w.path().display(),
            v.type_name()
        ))),
    }
}

/// Loads a GGUF LoRA adapter file. f32/f16/bf16 tensors stay in the file's mapping; q8_0 (or
/// a and b of different dtypes) are decoded to owned f32.
pub fn load(path: &Path) -> Result<Adapter> {
    let name = path
        .file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    let w = Arc::new(Weights::open(path).map_err(|e| e.context(format!("adapter '{name}'")))?);
    from_weights(&name, &w).map_err(|e| e.context(format!("adapter '{name}'")))
}

/// Builds an adapter from an opened GGUF file (see the module docs for the checks).
pub fn from_weights(name: &str, w: &Arc<Weights>) -> Result<Adapter> {
    let file = w.path().display().to_string();
    if !w.is_gguf() {
        return Err(Error::format(format!(
            "file '{file}' is not a GGUF file (a GGUF adapter starts with \"GGUF\")"
        )));
    }
    match meta_str(w, KEY_TYPE)? {
        Some("adapter") => {}
        other => {
            return Err(Error::format(format!(
                "file '{file}': {KEY_TYPE} is {}, not \"adapter\" (a model, not a LoRA adapter?)",
                other.map_or("missing".into(), |t| format!("\"{t}\""))
            )))
        }
    }
    match meta_str(w, KEY_ADAPTER_TYPE)? {
        Some("lora") => {}
        other => {
            return Err(Error::unsupported(format!(
                "file '{file}': {KEY_ADAPTER_TYPE} is {}; only \"lora\" adapters are supported",
                other.map_or("missing".into(), |t| format!("\"{t}\""))
            )))
        }
    }
    // llama.cpp reads a missing alpha as 0 (scale 1).
    let alpha = match w.meta_get(KEY_ALPHA) {
        None => 0.0,
        Some(MetaValue::F32(a)) if a.is_finite() => *a,
        Some(v) => {
            return Err(Error::format(format!(
                "file '{file}': {KEY_ALPHA} is {} {v:?}, not a finite f32",
                v.type_name()
            )))
        }
    };
    let arch = meta_str(w, KEY_ARCH)?.map(str::to_string);
    let restore: HashMap<String, ModuleMeta> = match meta_str(w, KEY_RF_MODULES)? {
        Some(s) => serde_json::from_str(s).map_err(|e| {
            Error::format(format!("file '{file}': metadata '{KEY_RF_MODULES}': {e}"))
        })?,
        None => HashMap::new(),
    };

    // Pair the tensors up, as llama.cpp does: everything must end in .lora_a / .lora_b.
    let mut pairs: BTreeMap<String, (Option<String>, Option<String>)> = BTreeMap::new();
    for t in w.entries() {
        let (base, which) = if let Some(b) = t.name.strip_suffix(SUFFIX_A) {
            (b, 0)
        } else if let Some(b) = t.name.strip_suffix(SUFFIX_B) {
            (b, 1)
        } else if t.name.ends_with("_norm.weight") {
            // llama.cpp skips norm vectors in adapters (convert_lora_to_gguf.py may write them).
            continue;
        } else {
            return Err(Error::format(format!(
                "file '{file}': tensor '{}' is neither a .lora_a nor a .lora_b tensor",
                t.name
            )));
        };
        let Some(module) = base.strip_suffix(".weight").filter(|m| !m.is_empty()) else {
            return Err(Error::format(format!(
                "file '{file}': tensor '{}': its base tensor '{base}' does not end in '.weight'",
                t.name
            )));
        };
        let slot = pairs.entry(module.to_string()).or_default();
        let slot = if which == 0 { &mut slot.0 } else { &mut slot.1 };
        *slot = Some(t.name.clone());
    }
    if pairs.is_empty() {
        return Err(Error::format(format!(
            "file '{file}': no .lora_a/.lora_b tensors"
        )));
    }
    let mut ad = Adapter::new(name);
    ad.set_architecture(arch.as_deref())?;
    for (module, (ka, kb)) in pairs {
        let (ka, kb) = match (ka, kb) {
            (Some(a), Some(b)) => (a, b),
            (Some(a), None) => {
                return Err(Error::format(format!(
                    "file '{file}': tensor '{a}' has no '{module}.weight{SUFFIX_B}'"
                )))
            }
            (None, Some(b)) => {
                return Err(Error::format(format!(
                    "file '{file}': tensor '{b}' has no '{module}.weight{SUFFIX_A}'"
                )))
            }
            (None, None) => unreachable!("a slot was filled"),
        };
        if module == "token_embd" {
            return Err(Error::unsupported(format!(
                "file '{file}': tensor '{ka}': LoRA on the token embedding (a lookup, stored \
                 transposed by llama.cpp) is not supported"
            )));
        }
        let (ea, eb) = (w.entry(&ka).expect("listed"), w.entry(&kb).expect("listed"));
        for e in [ea, eb] {
            if e.shape.len() != 2 {
                return Err(Error::shape(format!(
                    "file '{file}': tensor '{}' has {} dims {:?}; LoRA tensors are 2-D",
                    e.name,
                    e.shape.len(),
                    e.shape
                )));
            }
            if !matches!(
                e.dtype,
                Some(DType::F32 | DType::F16 | DType::BF16 | DType::Q8_0)
            ) {
                return Err(Error::unsupported(format!(
                    "file '{file}': tensor '{}' is {}; GGUF LoRA tensors are read as F32, F16, \
                     BF16 or Q8_0",
                    e.name, e.dtype_name
                )));
            }
        }
        // Row-major [r, in] and [out, r]: GGUF ne = [in, r] and [r, out].
        let (ra, rb) = (ea.shape[0], eb.shape[1]);
        if ra != rb {
            return Err(Error::shape(format!(
                "file '{file}': tensor '{ka}' has rank {ra} (ne[1]) but '{kb}' has rank {rb} \
                 (ne[0]); lora_a is [in, r] and lora_b [r, out] in GGUF dims"
            )));
        }
        let (a, b) = if ea.dtype == eb.dtype && ea.dtype != Some(DType::Q8_0) {
            (TensorData::mapped(w, &ka)?, TensorData::mapped(w, &kb)?)
        } else {
            (decode_f32(w, &ka)?, decode_f32(w, &kb)?)
        };
        let mut lora = if alpha == 0.0 {
            Lora::new(&module, a, b, 0.0, Scaling::Fixed, 1.0)?
        } else {
            Lora::new(&module, a, b, alpha, Scaling::Lora, 0.0)?
        };
        // Written unfolded by rankfuse: the scaling rule comes back if it gives the same scale.
        if let Some(m) = restore.get(&module) {
            let scaling = match m.scaling.as_str() {
                "lora" => Some(Scaling::Lora),
                "rslora" => Some(Scaling::RsLora),
                _ => None,
            };
            if m.scaling == "fixed" {
                lora.fixed_scale = lora.scale_at(ra);
                lora.scaling = Scaling::Fixed;
                lora.alpha = m.alpha;
            } else if let Some(sc) = scaling {
                let before = lora.scale_at(ra);
                let (old_s, old_a) = (lora.scaling, lora.alpha);
                lora.scaling = sc;
                lora.alpha = m.alpha;
                if lora.scale_at(ra).to_bits() != before.to_bits() || !m.alpha.is_finite() {
                    lora.scaling = old_s;
                    lora.alpha = old_a;
                }
            }
        }
        ad.add(lora)?;
    }
    if let Some(MetaValue::Array { items, .. }) = w.meta_get(KEY_RF_PEFT_NAMES) {
        for it in items {
            let s = it.as_bytes().and_then(|b| std::str::from_utf8(b).ok());
            if let Some((g, p)) = s.and_then(|s| s.split_once('\t')) {
                if ad.get(g).is_some() {
                    ad.peft_names.insert(g.to_string(), p.to_string());
                }
            }
        }
    }
    if let Some(s) = meta_str(w, KEY_RF_PEFT_CONFIG)? {
        if let Ok(serde_json::Value::Object(m)) = serde_json::from_str(s) {
            ad.peft_config = Some(m);
        }
    }
    Ok(ad)
}

/// A tensor decoded to an owned f32 matrix (q8_0 as ggml's dequantize_row_q8_0 does).
fn decode_f32(w: &Weights, name: &str) -> Result<TensorData> {
    let v = w.get(name)?;
    Ok(TensorData::Owned(Matrix::from_f32(
        DType::F32,
        v.rows,
        v.cols,
        &v.to_f32_vec(),
    )?))
}

/// Checks an adapter against a base model: every module `m` needs a 2-D base tensor
/// `m.weight` of shape [out, in] (GGUF ne [in, out]), and a GGUF base's
/// `general.architecture` must equal the adapter's when both are known. Errors name the module.
pub fn check_base(ad: &Adapter, base: &Weights) -> Result<()> {
    let file = base.path().display();
    if let (Some(a), Some(MetaValue::Str(b))) = (ad.architecture(), base.meta_get(KEY_ARCH)) {
        if a.as_bytes() != b.as_slice() {
            return Err(Error::invalid(format!(
                "adapter '{}' is for architecture '{a}' but base '{file}' is '{}'",
                ad.name,
                String::from_utf8_lossy(b)
            )));
        }
    }
    for l in ad.modules() {
        let t = format!("{}.weight", l.name);
        let e = base.entry(&t).ok_or_else(|| {
            Error::not_found(format!(
                "adapter '{}': module '{}' has no base tensor '{t}' in '{file}'",
                ad.name, l.name
            ))
        })?;
        if e.shape != [l.out_features, l.in_features] {
            return Err(Error::shape(format!(
                "adapter '{}': module '{}' is {} -> {} (lora_a [r, {}], lora_b [{}, r]) but base \
                 tensor '{t}' has shape {:?} ([out, in] expected)",
                ad.name,
                l.name,
                l.in_features,
                l.out_features,
                l.in_features,
                l.out_features,
                e.shape
            )));
        }
    }
    Ok(())
}

/// The f32 alpha whose llama.cpp scale `alpha / r` (an f32 division) is exactly `s`, if any.
pub fn exact_alpha(s: f32, r: usize) -> Option<f32> {
    if !s.is_finite() || s == 0.0 {
        return None;
    }
    let a0 = (s as f64 * r as f64) as f32;
    let bits = a0.to_bits();
    [a0, f32::from_bits(bits + 1), f32::from_bits(bits - 1)]
        .into_iter()
        .find(|&a| {
            a.is_finite() && a != 0.0 && ((a as f64 / r as f64) as f32).to_bits() == s.to_bits()
        })
}

/// The GGUF module names for `ad`: names already in GGUF form are kept, Hugging Face paths go
/// through the architecture's table; unmapped names are one error listing them.
pub fn gguf_names(ad: &Adapter, arch: &str) -> Result<Vec<String>> {
    let names: Vec<String> = ad.modules().map(|l| l.name.clone()).collect();
    let fam = names::family(arch);
    let looks_gguf = |n: &str| n.starts_with("blk.") || n == "output";
    match fam {
        Ok(f) => names::map_all(&names, &format!("GGUF ({arch})"), |n| {
            if names::is_gguf_name(f, n) {
                Some(n.to_string())
            } else {
                names::to_gguf(f, n)
            }
        }),
        // An architecture without a table is fine when the names are GGUF names already.
        Err(e) if names.iter().all(|n| looks_gguf(n)) => {
            let _ = e;
            Ok(names)
        }
        Err(e) => Err(e),
    }
}

/// Renames a GGUF-named adapter's modules to Hugging Face (PEFT) paths: the names recorded when
/// rankfuse wrote the file, else the table of the adapter's architecture. For llama/mistral the
/// rotary permutation of q/k rows is undone on lora_b (needs the head counts, as for [`save`]).
pub fn to_peft(ad: &mut Adapter, n_head: usize, n_head_kv: usize) -> Result<()> {
    let names: Vec<String> = ad.modules().map(|l| l.name.clone()).collect();
    let arch = ad.architecture().unwrap_or("unknown").to_string();
    let fam: Option<Family> = match ad.architecture() {
        Some(a) => Some(names::family(a)?),
        None => None,
    };
    let recorded = ad.peft_names.clone();
    let out = names::map_all(&names, &format!("PEFT ({arch})"), |n| {
        recorded
            .get(n)
            .cloned()
            .or_else(|| fam.and_then(|f| names::to_hf(f, n)))
    })?;
    if names::permutes_qk(&arch) {
        for l in ad.modules_mut() {
            let Some(q) = names::qk_kind(&l.name) else {
                continue;
            };
            let heads = heads_for(q, n_head, n_head_kv, &l.name, &arch)?;
            let perm = names::qk_permutation(l.out_features, heads, true)
                .map_err(|e| e.context(format!("module '{}'", l.name)))?;
            let b = l.b.view();
            let bytes = super::peft::dense_bytes(b);
            let data = permute_rows(&bytes, b.cols * b.dtype.size(), &perm);
            l.b = TensorData::Owned(Matrix::from_bytes(b.dtype, b.rows, b.cols, data)?);
            l.refresh_device()?;
        }
    }
    ad.rename_modules(&out)?;
    ad.peft_names.clear();
    Ok(())
}

/// Writes `ad` as a GGUF LoRA adapter llama.cpp loads (see the module docs for alpha).
pub fn save(ad: &Adapter, path: &Path, opts: &SaveOptions) -> Result<SaveReport> {
    for l in ad.modules() {
        l.require_lora("llama.cpp's GGUF LoRA format")?;
    }
    if ad.is_empty() {
        return Err(Error::invalid(format!(
            "adapter '{}': no modules to save",
            ad.name
        )));
    }
    let arch = opts
        .architecture
        .clone()
        .filter(|a| !a.is_empty())
        .or_else(|| ad.architecture().map(str::to_string))
        .ok_or_else(|| {
            Error::invalid(format!(
                "adapter '{}': no architecture: GGUF adapters name the base model's \
                 general.architecture (e.g. \"llama\"); pass one in the options",
                ad.name
            ))
        })?;
    let gnames = gguf_names(ad, &arch)?;
    // Per module: rank in use, scale there, and the alpha that reproduces it exactly.
    let mods: Vec<(&Lora, usize, f32)> = ad
        .modules()
        .map(|l| {
            let r = l.rank();
            (l, r, l.scale_at(r))
        })
        .collect();
    let alpha = match opts.alpha {
        AlphaPolicy::Fold => 0.0,
        AlphaPolicy::Auto => {
            let mut counts: HashMap<u32, usize> = HashMap::new();
            for (_, r, s) in &mods {
                if let Some(a) = exact_alpha(*s, *r) {
                    *counts.entry(a.to_bits()).or_default() += 1;
                }
            }
            counts
                .into_iter()
                .max_by_key(|(bits, c)| (*c, std::cmp::Reverse(*bits)))
                .map_or(0.0, |(bits, _)| f32::from_bits(bits))
        }
    };
    let mut tensors: Vec<GgufTensor<'_>> = Vec::with_capacity(2 * mods.len());
    let mut rf_meta: BTreeMap<String, ModuleMeta> = BTreeMap::new();
    let mut report = SaveReport {
        alpha,
        architecture: arch.clone(),
        modules: Vec::new(),
    };
    let mut peft_names = Vec::new();
    for ((l, r, s), g) in mods.iter().zip(&gnames) {
        let (l, r, s) = (*l, *r, *s);
        let dtype = l.dtype();
        if dtype.is_quantized() {
            return Err(Error::unsupported(format!(
                "module '{}': {} A/B cannot be written to a GGUF adapter",
                l.name,
                dtype.name()
            )));
        }
        let gguf_scale = if alpha == 0.0 {
            1.0
        } else {
            (alpha as f64 / r as f64) as f32
        };
        let folded = gguf_scale.to_bits() != s.to_bits();
        let a = l.a_view(r);
        let trained = crate::train::resume::folded_b(l, r);
        let bview = trained.as_ref().map_or(l.b_view(r), |m| m.view());
        let b_bytes = if folded {
            // B' = B * (s / gguf_scale) in f32, then back to B's dtype.
            let c = (s as f64 / gguf_scale as f64) as f32;
            let vals: Vec<f32> = bview.to_f32_vec().iter().map(|v| v * c).collect();
            Matrix::from_f32(dtype, bview.rows, bview.cols, &vals)?
                .bytes()
                .to_vec()
        } else {
            rf_meta.insert(
                g.clone(),
                ModuleMeta {
                    scaling: match l.scaling {
                        Scaling::Lora => "lora",
                        Scaling::RsLora => "rslora",
                        Scaling::Fixed => "fixed",
                    }
                    .into(),
                    alpha: l.alpha,
                },
            );
            super::peft::dense_bytes(bview)
        };
        // Mapped from a Hugging Face q/k projection: follow the converter's row permutation.
        let b_bytes = match names::qk_kind(g) {
            Some(q) if *g != l.name && names::permutes_qk(&arch) => {
                let heads = heads_for(q, opts.n_head, opts.n_head_kv, &l.name, &arch)?;
                let perm = names::qk_permutation(l.out_features, heads, false)
                    .map_err(|e| e.context(format!("module '{}'", l.name)))?;
                permute_rows(&b_bytes, r * dtype.size(), &perm)
            }
            _ => b_bytes,
        };
        tensors.push(GgufTensor {
            name: format!("{g}.weight{SUFFIX_A}"),
            dtype,
            shape: vec![r, l.in_features],
            data: Cow::Owned(super::peft::dense_bytes(a)),
        });
        tensors.push(GgufTensor {
            name: format!("{g}.weight{SUFFIX_B}"),
            dtype,
            shape: vec![l.out_features, r],
            data: Cow::Owned(b_bytes),
        });
        if *g != l.name {
            peft_names.push(MetaValue::Str(format!("{g}\t{}", l.name).into_bytes()));
        } else if let Some(p) = ad.peft_names.get(&l.name) {
            peft_names.push(MetaValue::Str(format!("{g}\t{p}").into_bytes()));
        }
        report.modules.push((l.name.clone(), g.clone(), r, folded));
    }
    let s = |v: &str| MetaValue::Str(v.as_bytes().to_vec());
    let mut meta = vec![
        (KEY_ARCH.to_string(), s(&arch)),
        (KEY_TYPE.to_string(), s("adapter")),
        ("general.name".to_string(), s(&ad.name)),
        (KEY_ADAPTER_TYPE.to_string(), s("lora")),
        (KEY_ALPHA.to_string(), MetaValue::F32(alpha)),
        (
            KEY_RF_MODULES.to_string(),
            s(&serde_json::to_string(&rf_meta).map_err(|e| Error::internal(e.to_string()))?),
        ),
    ];
    if !peft_names.is_empty() {
        meta.push((
            KEY_RF_PEFT_NAMES.to_string(),
            MetaValue::Array {
                elem: 8,
                items: peft_names,
            },
        ));
    }
    if let Some(cfg) = &ad.peft_config {
        let text = serde_json::to_string(cfg).map_err(|e| Error::internal(e.to_string()))?;
        meta.push((KEY_RF_PEFT_CONFIG.to_string(), s(&text)));
    }
    gguf_write::write(path, &meta, &tensors)?;
    Ok(report)
}
