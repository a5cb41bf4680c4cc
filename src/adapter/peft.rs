//! Hugging Face PEFT adapter folders: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! Key mapping: `base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight`
//! [out, r]; `<module>` is the base model's module path. Per-module r / alpha follow PEFT's
//! `rank_pattern` / `alpha_pattern` rule (see `pattern.rs`). Options that change the math and
//! that rankfuse does not implement are refused with UNSUPPORTED naming the field, never ignored.

use super::pattern::PatternMap;
use super::{Adapter, Lora, Scaling, TensorData};
use crate::error::{Error, Result};
use crate::weights::{write_safetensors, TensorOut, Weights};
use serde_json::{json, Map, Value};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const KEY_PREFIX: &str = "base_model.model.";
/// Metadata key under which rankfuse keeps what PEFT's format cannot say (scaling kind, capacity).
pub const RANKFUSE_META_KEY: &str = "rankfuse";
const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// The parts of adapter_config.json that decide the math.
#[derive(Debug)]
pub struct PeftConfig {
    pub r: u32,
    pub lora_alpha: f32,
    pub use_rslora: bool,
    pub fan_in_fan_out: bool,
    pub rank_pattern: Vec<(String, u32)>,
    pub alpha_pattern: Vec<(String, f32)>,
    pub raw: Map<String, Value>,
}

fn field_err(file: &Path, field: &str, why: &str) -> Error {
    Error::format(format!(
        "config '{}': field '{field}' {why}",
        file.display()
    ))
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        Value::String(s) => !s.is_empty(),
        Value::Number(n) => n.as_f64() != Some(0.0),
    }
}

fn positive_int(v: &Value, file: &Path, field: &str) -> Result<u32> {
    let n = v.as_u64().ok_or_else(|| {
        field_err(
            file,
            field,
            &format!("must be a positive integer, found {v}"),
        )
    })?;
    if n == 0 || n > (1 << 20) {
        return Err(field_err(
            file,
            field,
            &format!("= {n} is out of range 1..=1048576"),
        ));
    }
    Ok(n as u32)
}

fn finite_number(v: &Value, file: &Path, field: &str) -> Result<f32> {
    let x = v
        .as_f64()
        .ok_or_else(|| field_err(file, field, &format!("must be a number, found {v}")))?;
    if !x.is_finite() || x.abs() > 1e30 {
        return Err(field_err(
            file,
            field,
            &format!("= {x} is not a usable number"),
        ));
    }
    Ok(x as f32)
}

impl PeftConfig {
    /// Parses and checks a config; refuses options that would make the result wrong.
    pub fn parse(file: &Path, text: &[u8]) -> Result<PeftConfig> {
        let v: Value = serde_json::from_slice(text).map_err(|e| {
            Error::format(format!("config '{}': invalid JSON: {e}", file.display()))
        })?;
        let Value::Object(raw) = v else {
            return Err(Error::format(format!(
                "config '{}': not a JSON object",
                file.display()
            )));
        };
        match raw.get("peft_type") {
            None => {}
            Some(Value::String(t)) if t == "LORA" => {}
            Some(other) => {
                return Err(Error::unsupported(format!(
                    "config '{}': field 'peft_type' = {other}: only LORA adapters are supported",
                    file.display()
                )))
            }
        }
        // Options that change the forward pass and that rankfuse does not implement.
        for field in [
            "use_dora",
            "use_qalora",
            "use_bdlora",
            "lora_bias",
            "layer_replication",
            "alora_invocation_tokens",
            "target_parameters",
            "trainable_token_indices",
            "megatron_config",
            "arrow_config",
        ] {
            if raw.get(field).is_some_and(truthy) {
                return Err(Error::unsupported(format!(
                    "config '{}': field '{field}' = {} is not supported by rankfuse",
                    file.display(),
                    raw[field]
                )));
            }
        }
        if let Some(Value::String(init)) = raw.get("init_lora_weights") {
            // These inits rewrite the base weights: the adapter is only right on the modified base.
            let l = init.to_ascii_lowercase();
            if l.starts_with("pissa")
                || l.starts_with("olora")
                || l.starts_with("corda")
                || l.starts_with("loftq")
            {
                return Err(Error::unsupported(format!(
                    "config '{}': field 'init_lora_weights' = \"{init}\" modifies the base weights; convert the adapter to plain LoRA first",
                    file.display()
                )));
            }
        }
        let r = positive_int(raw.get("r").unwrap_or(&json!(8)), file, "r")?;
        let lora_alpha = finite_number(
            raw.get("lora_alpha").unwrap_or(&json!(8)),
            file,
            "lora_alpha",
        )?;
        let bool_field = |f: &str| -> Result<bool> {
            match raw.get(f) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(other) => Err(field_err(
                    file,
                    f,
                    &format!("must be true or false, found {other}"),
                )),
            }
        };
        let use_rslora = bool_field("use_rslora")?;
        let fan_in_fan_out = bool_field("fan_in_fan_out")?;
        let mut rank_pattern = Vec::new();
        let mut alpha_pattern = Vec::new();
        for (field, is_rank) in [("rank_pattern", true), ("alpha_pattern", false)] {
            match raw.get(field) {
                None | Some(Value::Null) => {}
                Some(Value::Object(m)) => {
                    for (k, v) in m {
                        let f = format!("{field}['{k}']");
                        if is_rank {
                            rank_pattern.push((k.clone(), positive_int(v, file, &f)?));
                        } else {
                            alpha_pattern.push((k.clone(), finite_number(v, file, &f)?));
                        }
                    }
                }
                Some(other) => {
                    return Err(field_err(
                        file,
                        field,
                        &format!("must be an object, found {other}"),
                    ))
                }
            }
        }
        match raw.get("target_modules") {
            None | Some(Value::Null) | Some(Value::String(_)) => {}
            Some(Value::Array(a)) if a.iter().all(|x| x.is_string()) => {}
            Some(other) => {
                return Err(field_err(
                    file,
                    "target_modules",
                    &format!("must be a string or a list of strings, found {other}"),
                ))
            }
        }
        Ok(PeftConfig {
            r,
            lora_alpha,
            use_rslora,
            fan_in_fan_out,
            rank_pattern,
            alpha_pattern,
            raw,
        })
    }
}

/// rankfuse's own per-module record kept in the weights file's metadata.
#[derive(serde::Serialize, serde::Deserialize)]
struct ModuleMeta {
    scaling: String,
    scale: f32,
    alpha: f32,
}

pub fn read_config(dir: &Path) -> Result<(std::path::PathBuf, Vec<u8>)> {
    let path = dir.join(CONFIG_FILE);
    let meta = std::fs::metadata(&path).map_err(|e| Error::from_io(&path, &e))?;
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(Error::format(format!(
            "config '{}': {} bytes is over the limit",
            path.display(),
            meta.len()
        )));
    }
    let text = std::fs::read(&path).map_err(|e| Error::from_io(&path, &e))?;
    Ok((path, text))
}

/// Splits a PEFT weight key into (module, "A" | "B"), or explains why rankfuse cannot use it.
pub fn split_key(key: &str) -> Result<(String, char)> {
    let k = key.strip_prefix(KEY_PREFIX).unwrap_or(key);
    for (suffix, which) in [(".lora_A.weight", 'A'), (".lora_B.weight", 'B')] {
        if let Some(m) = k.strip_suffix(suffix) {
            if m.is_empty() {
                break;
            }
            return Ok((m.to_string(), which));
        }
    }
    let what = if k.contains("lora_magnitude_vector") {
        "a DoRA magnitude vector"
    } else if k.contains("lora_embedding_") {
        "an embedding LoRA"
    } else if k.contains(".lora_B.bias") {
        "a lora_B bias (lora_bias)"
    } else if k.contains("modules_to_save") || !k.contains("lora_") {
        "a full weight (modules_to_save or bias training)"
    } else {
        "not a lora_A/lora_B weight"
    };
    Err(Error::unsupported(format!(
        "tensor '{key}' is {what}; rankfuse loads plain LoRA modules only"
    )))
}

/// An adapter's name: its folder's name (canonical path), else the path as given.
pub fn adapter_name(dir: &Path) -> String {
    dir.canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| dir.display().to_string())
}

/// Loads a PEFT LoRA folder. Tensors stay in the file's mapping (no copies).
pub fn load(dir: &Path) -> Result<Adapter> {
    let name = adapter_name(dir);
    load_named(dir, &name).map_err(|e| e.context(format!("adapter '{name}'")))
}

fn load_named(dir: &Path, name: &str) -> Result<Adapter> {
    let (cfg_path, text) = read_config(dir)?;
    let cfg = PeftConfig::parse(&cfg_path, &text)?;
    let wpath = dir.join(WEIGHTS_FILE);
    if !wpath.exists() {
        let bin = dir.join("adapter_model.bin");
        if bin.exists() {
            return Err(Error::unsupported(format!(
                "file '{}': pickled PyTorch weights are not read (unsafe to load); save with safe_serialization=True",
                bin.display()
            )));
        }
        return Err(Error::not_found(format!(
            "file '{}' does not exist",
            wpath.display()
        )));
    }
    let weights = Arc::new(Weights::open(&wpath)?);
    from_parts(name, cfg, weights)
}

/// Builds an adapter from a parsed config and opened weights (also used for embedded data).
pub fn from_parts(name: &str, cfg: PeftConfig, weights: Arc<Weights>) -> Result<Adapter> {
    let wpath = weights.path().to_path_buf();
    let ranks = PatternMap::new("rank_pattern", cfg.rank_pattern.clone())?;
    let alphas = PatternMap::new("alpha_pattern", cfg.alpha_pattern.clone())?;
    let stored: HashMap<String, ModuleMeta> = weights
        .metadata()
        .get(RANKFUSE_META_KEY)
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default();

    // Pair up lora_A / lora_B per module, in file order.
    let mut order: Vec<String> = Vec::new();
    let mut pairs: HashMap<String, (Option<String>, Option<String>)> = HashMap::new();
    for t in weights.entries() {
        let (module, which) = split_key(&t.name)?;
        let e = pairs.entry(module.clone()).or_insert_with(|| {
            order.push(module.clone());
            (None, None)
        });
        let slot = if which == 'A' { &mut e.0 } else { &mut e.1 };
        if slot.is_some() {
            return Err(Error::format(format!(
                "module '{module}': lora_{which} appears twice"
            )));
        }
        *slot = Some(t.name.clone());
    }
    if order.is_empty() {
        return Err(Error::format(format!(
            "file '{}': no lora_A/lora_B tensors",
            wpath.display()
        )));
    }
    order.sort();
    let mut adapter = Adapter::new(name);
    for module in order {
        let (Some(ka), Some(kb)) = pairs.remove(&module).expect("paired") else {
            return Err(Error::format(format!(
                "module '{module}': lora_A and lora_B must both be present"
            )));
        };
        for k in [&ka, &kb] {
            let e = weights.entry(k).expect("listed");
            if e.shape.len() != 2 {
                return Err(Error::unsupported(format!(
                    "tensor '{k}' has shape {:?}; only linear (2-D) LoRA modules are supported",
                    e.shape
                )));
            }
        }
        let a = TensorData::mapped(&weights, &ka)?;
        let b = TensorData::mapped(&weights, &kb)?;
        let r = ranks.resolve(&module).unwrap_or(cfg.r) as usize;
        let alpha = alphas.resolve(&module).unwrap_or(cfg.lora_alpha);
        let (ar, bc) = (a.view().rows, b.view().cols);
        if ar != r || bc != r {
            return Err(Error::shape(format!(
                "module '{module}': lora_A has {ar} rows and lora_B has {bc} columns, config gives r = {r}"
            )));
        }
        let mut scaling = if cfg.use_rslora {
            Scaling::RsLora
        } else {
            Scaling::Lora
        };
        let mut fixed = 0.0;
        let mut alpha_used = alpha;
        if let Some(m) = stored.get(&module) {
            // Written by rankfuse: restore the scaling rule PEFT's format cannot express.
            if m.scaling == "fixed" {
                scaling = Scaling::Fixed;
                fixed = m.scale;
                alpha_used = m.alpha;
            }
        }
        adapter.add(Lora::new(&module, a, b, alpha_used, scaling, fixed)?)?;
    }
    adapter.peft_config = Some(cfg.raw);
    Ok(adapter)
}

/// The PEFT config fields rankfuse writes for an adapter it did not load from a config.
fn default_config(adapter: &Adapter) -> Map<String, Value> {
    let mut targets: Vec<String> = adapter
        .modules()
        .map(|l| l.name.rsplit('.').next().unwrap_or(&l.name).to_string())
        .collect();
    targets.sort();
    targets.dedup();
    let v = json!({
        "alpha_pattern": {}, "auto_mapping": null, "base_model_name_or_path": null, "bias": "none",
        "exclude_modules": null, "fan_in_fan_out": false, "inference_mode": true,
        "init_lora_weights": true, "layer_replication": null, "layers_pattern": null,
        "layers_to_transform": null, "loftq_config": {}, "lora_alpha": 8, "lora_bias": false,
        "lora_dropout": 0.0, "megatron_config": null, "megatron_core": "megatron.core",
        "modules_to_save": null, "peft_type": "LORA", "r": 8, "rank_pattern": {}, "revision": null,
        "target_modules": targets, "task_type": null, "use_dora": false, "use_rslora": false
    });
    match v {
        Value::Object(m) => m,
        _ => unreachable!(),
    }
}

fn f32_json(x: f32) -> Value {
    // Integral alphas stay integers (as PEFT writes them); others keep f32 precision.
    if x.fract() == 0.0 && x.abs() < 1e9 {
        json!(x as i64)
    } else {
        json!(x as f64)
    }
}

/// Writes `adapter` as a PEFT folder: the rank in use of every module becomes its `r`
/// (`rank_pattern` where it differs from the most common one), alpha is chosen so PEFT computes
/// the same scale, and rankfuse's own scaling rule goes into the weights' metadata.
pub fn save(adapter: &Adapter, dir: &Path) -> Result<()> {
    for l in adapter.modules() {
        l.require_lora("the PEFT LoRA format (methods::files::save_any picks each kind's format)")?;
    }
    if adapter.is_empty() {
        return Err(Error::invalid(format!(
            "adapter '{}': no modules to save",
            adapter.name
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::from_io(dir, &e))?;
    let mut cfg = adapter
        .peft_config
        .clone()
        .unwrap_or_else(|| default_config(adapter));
    let use_rslora = {
        let rs = adapter
            .modules()
            .filter(|l| l.scaling == Scaling::RsLora)
            .count();
        rs * 2 > adapter.len()
    };
    // Per module: the r written and the alpha that reproduces the scale at that r.
    let mut per: Vec<(String, u32, f32)> = Vec::new();
    let mut meta: BTreeMap<String, ModuleMeta> = BTreeMap::new();
    let mut tensors: Vec<TensorOut<'_>> = Vec::new();
    for l in adapter.modules() {
        let r = l.rank();
        let alpha = match (l.scaling, use_rslora) {
            (Scaling::Lora, false) | (Scaling::RsLora, true) => l.alpha,
            _ => {
                let s = l.scale_at(r) as f64;
                (if use_rslora {
                    s * (r as f64).sqrt()
                } else {
                    s * r as f64
                }) as f32
            }
        };
        per.push((l.name.clone(), r as u32, alpha));
        let scaling = match l.scaling {
            Scaling::Lora => "lora",
            Scaling::RsLora => "rslora",
            Scaling::Fixed => "fixed",
        };
        meta.insert(
            l.name.clone(),
            ModuleMeta {
                scaling: scaling.into(),
                scale: l.scale_at(r),
                alpha: l.alpha,
            },
        );
        // Gains / masks (training) are folded into B: PEFT loads a plain LoRA.
        let folded = crate::train::resume::folded_b(l, r);
        let (a, b) = (
            l.a_view(r),
            folded.as_ref().map_or(l.b_view(r), |m| m.view()),
        );
        tensors.push(TensorOut {
            name: format!("{KEY_PREFIX}{}.lora_A.weight", l.name),
            dtype: a.dtype,
            shape: vec![a.rows, a.cols],
            data: Cow::Owned(dense_bytes(a)),
        });
        tensors.push(TensorOut {
            name: format!("{KEY_PREFIX}{}.lora_B.weight", l.name),
            dtype: b.dtype,
            shape: vec![b.rows, b.cols],
            data: Cow::Owned(dense_bytes(b)),
        });
    }
    // The most common (r, alpha) is the global value; the rest go into the patterns.
    let mut counts: HashMap<(u32, u32), usize> = HashMap::new();
    for (_, r, a) in &per {
        *counts.entry((*r, a.to_bits())).or_default() += 1;
    }
    let (&(gr, ga_bits), _) = counts
        .iter()
        .max_by_key(|(k, c)| (**c, std::cmp::Reverse(**k)))
        .expect("non-empty");
    let ga = f32::from_bits(ga_bits);
    let mut rank_pattern = Map::new();
    let mut alpha_pattern = Map::new();
    for (name, r, a) in &per {
        if *r != gr {
            rank_pattern.insert(regex::escape(name), json!(r));
        }
        if a.to_bits() != ga_bits {
            alpha_pattern.insert(regex::escape(name), f32_json(*a));
        }
    }
    cfg.insert("r".into(), json!(gr));
    cfg.insert("lora_alpha".into(), f32_json(ga));
    cfg.insert("use_rslora".into(), json!(use_rslora));
    cfg.insert("rank_pattern".into(), Value::Object(rank_pattern));
    cfg.insert("alpha_pattern".into(), Value::Object(alpha_pattern));
    cfg.insert("peft_type".into(), json!("LORA"));
    cfg.insert("inference_mode".into(), json!(true));
    // PEFT writes its config with sort_keys=True, indent=2.
    let sorted: BTreeMap<&String, &Value> = cfg.iter().collect();
    let text = serde_json::to_string_pretty(&sorted).map_err(|e| Error::internal(e.to_string()))?;
    let cpath = dir.join(CONFIG_FILE);
    std::fs::write(&cpath, text).map_err(|e| Error::from_io(&cpath, &e))?;
    let mut md = HashMap::new();
    md.insert("format".to_string(), "pt".to_string());
    md.insert(
        RANKFUSE_META_KEY.to_string(),
        serde_json::to_string(&meta).map_err(|e| Error::internal(e.to_string()))?,
    );
    if let Some(t) = crate::train::resume::save_meta(adapter)? {
        md.insert(crate::train::resume::TRAIN_META_KEY.to_string(), t);
    }
    write_safetensors(&dir.join(WEIGHTS_FILE), &tensors, Some(md))
}

/// A dense copy (ld = cols) of a view's bytes.
pub fn dense_bytes(m: crate::matrix::MatRef<'_>) -> Vec<u8> {
    let es = m.dtype.size();
    let mut out = Vec::with_capacity(m.rows * m.cols * es);
    for i in 0..m.rows {
        // SAFETY: row i spans cols elements inside the view.
        let row = unsafe { std::slice::from_raw_parts(m.row_ptr(i), m.cols * es) };
        out.extend_from_slice(row);
    }
    out
}

/// Whether the adapter was saved with `fan_in_fan_out` (GPT-2 Conv1D bases store W as [in, out]).
pub fn fan_in_fan_out(adapter: &Adapter) -> bool {
    adapter
        .peft_config
        .as_ref()
        .and_then(|c| c.get("fan_in_fan_out"))
        .and_then(|v| v.as_bool())
        .unwrap_or(false)
}
