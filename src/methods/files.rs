//! Folder formats for KRAdapter and EigenLoRAx adapters, in the PEFT folder style (docs/formats.md):
//! `adapter_config.json` names the method in `peft_type` with its hyper-parameters and a
//! `rankfuse_format_version`, tensors go to `adapter_model.safetensors` (f32). A folder written
//! by a newer format version is refused, never misread.
//!
//! - KRADAPTER: per module `<name>.kradapter_U` [m, r] and `<name>.kradapter_V` [m, r + d].
//! - EIGENLORAX: per module `<name>.alpha_A` and `<name>.alpha_B` [K, r] (gains folded into
//!   alpha_A's columns, as the forward applies them); the config records each module's basis
//!   fingerprint, so loadings are refused on any other basis.
//! - EIGENLORAX_BASIS: the basis, once for all its adapters: `basis.safetensors` (as
//!   `rankfuse eigen build` writes it) plus a config with the per-module fingerprints.

use crate::adapter::{peft, Adapter, Lora};
use crate::algebra::eigen::Basis;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::weights::{write_safetensors, TensorOut, Weights};
use serde_json::{json, Map, Value};
use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;

/// The folder format version this build writes and reads.
pub(crate) const FORMAT_VERSION: u64 = 1;
const CONFIG_FILE: &str = "adapter_config.json";
const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const BASIS_FILE: &str = "basis.safetensors";

fn f32_tensor(name: String, rows: usize, cols: usize, v: &[f32]) -> TensorOut<'static> {
    TensorOut {
        name,
        dtype: DType::F32,
        shape: vec![rows, cols],
        data: Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
    }
}

fn write_config(dir: &Path, cfg: &Value) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::from_io(dir, &e))?;
    let text = serde_json::to_string_pretty(cfg).map_err(|e| Error::internal(e.to_string()))?;
    let p = dir.join(CONFIG_FILE);
    std::fs::write(&p, text).map_err(|e| Error::from_io(&p, &e))
}

/// The config of a folder, parsed, with its `peft_type` (None when absent: PEFT's LoRA).
fn read_config(dir: &Path) -> Result<(Map<String, Value>, Option<String>)> {
    let (path, text) = peft::read_config(dir)?;
    let v: Value = serde_json::from_slice(&text)
        .map_err(|e| Error::format(format!("config '{}': invalid JSON: {e}", path.display())))?;
    let Value::Object(map) = v else {
        return Err(Error::format(format!(
            "config '{}': not a JSON object",
            path.display()
        )));
    };
    let t = map
        .get("peft_type")
        .and_then(|t| t.as_str())
        .map(String::from);
    Ok((map, t))
}

fn check_version(dir: &Path, cfg: &Map<String, Value>, what: &str) -> Result<()> {
    match cfg.get("rankfuse_format_version").and_then(|v| v.as_u64()) {
        Some(FORMAT_VERSION) => Ok(()),
        Some(v) => Err(Error::unsupported(format!(
            "folder '{}': {what} format version {v}; this rankfuse reads version {FORMAT_VERSION} (written by {})",
            dir.display(),
            if v > FORMAT_VERSION { "a newer rankfuse" } else { "an older rankfuse" }
        ))),
        None => Err(Error::format(format!(
            "folder '{}': {what} config has no 'rankfuse_format_version'",
            dir.display()
        ))),
    }
}

fn field_usize(m: &Map<String, Value>, key: &str, module: &str, dir: &Path) -> Result<usize> {
    m.get(key)
        .and_then(|v| v.as_u64())
        .map(|v| v as usize)
        .ok_or_else(|| {
            Error::format(format!(
                "folder '{}': module '{module}': config field '{key}' is missing or not a number",
                dir.display()
            ))
        })
}

fn field_f32(m: &Map<String, Value>, key: &str, module: &str, dir: &Path) -> Result<f32> {
    m.get(key)
        .and_then(|v| v.as_f64())
        .map(|v| v as f32)
        .ok_or_else(|| {
            Error::format(format!(
                "folder '{}': module '{module}': config field '{key}' is missing or not a number",
                dir.display()
            ))
        })
}

fn modules_of<'a>(cfg: &'a Map<String, Value>, dir: &Path) -> Result<&'a Map<String, Value>> {
    cfg.get("modules")
        .and_then(|m| m.as_object())
        .ok_or_else(|| {
            Error::format(format!(
                "folder '{}': config has no 'modules' object",
                dir.display()
            ))
        })
}

fn tensor_f32(w: &Weights, name: &str, rows: usize, cols: usize) -> Result<Vec<f32>> {
    let v = w.get(name)?;
    if v.rows != rows || v.cols != cols {
        return Err(Error::shape(format!(
            "tensor '{name}' is {} x {}, the config says {rows} x {cols}",
            v.rows, v.cols
        )));
    }
    Ok(v.to_f32_vec())
}

/// Loads any adapter folder rankfuse reads without a basis: PEFT LoRA or KRADAPTER. An
/// EIGENLORAX folder needs its basis (`load_eigenlorax`) and is refused with that advice.
pub fn load_any(dir: &Path) -> Result<Adapter> {
    let (cfg, t) = read_config(dir)?;
    match t.as_deref() {
        Some("KRADAPTER") => load_kradapter(dir, &cfg)
            .map_err(|e| e.context(format!("adapter '{}'", peft::adapter_name(dir)))),
        Some("EIGENLORAX") => Err(Error::invalid(format!(
            "folder '{}' is an EigenLoRAx adapter: load it with its basis (rf_adapter_load_eigenlorax)",
            dir.display()
        ))),
        Some("EIGENLORAX_BASIS") => Err(Error::invalid(format!(
            "folder '{}' is an EigenLoRAx basis, not an adapter (rf_eigen_basis_load)",
            dir.display()
        ))),
        _ => peft::load(dir),
    }
}

fn load_kradapter(dir: &Path, cfg: &Map<String, Value>) -> Result<Adapter> {
    check_version(dir, cfg, "KRADAPTER")?;
    let w = Weights::open(dir.join(WEIGHTS_FILE))?;
    let mut ad = Adapter::new(&peft::adapter_name(dir));
    for (name, m) in modules_of(cfg, dir)? {
        let m = m.as_object().ok_or_else(|| {
            Error::format(format!(
                "folder '{}': module '{name}' is not an object",
                dir.display()
            ))
        })?;
        let out = field_usize(m, "out_features", name, dir)?;
        let inp = field_usize(m, "in_features", name, dir)?;
        let scale = field_f32(m, "scale", name, dir)?;
        let s = crate::adapter::KronShape::new(out, inp);
        if field_usize(m, "r", name, dir)? != s.r || field_usize(m, "d", name, dir)? != s.d {
            return Err(Error::format(format!(
                "folder '{}': module '{name}': r, d in the config differ from KRAdapter's rule for {out} x {inp} (r = {}, d = {})",
                dir.display(),
                s.r,
                s.d
            )));
        }
        let u = tensor_f32(&w, &format!("{name}.kradapter_U"), s.m, s.r)?;
        let v = tensor_f32(&w, &format!("{name}.kradapter_V"), s.m, s.w())?;
        ad.add(Lora::kron_from_parts(name, out, inp, &u, &v, scale)?)?;
    }
    if ad.is_empty() {
        return Err(Error::format(format!(
            "folder '{}': no modules",
            dir.display()
        )));
    }
    Ok(ad)
}

/// Loads an EIGENLORAX folder on `basis`: every module must be in the basis with the
/// fingerprint the folder recorded.
pub fn load_eigenlorax(dir: &Path, basis: &Basis) -> Result<Adapter> {
    let name = peft::adapter_name(dir);
    load_eigen_inner(dir, basis).map_err(|e| e.context(format!("adapter '{name}'")))
}

fn load_eigen_inner(dir: &Path, basis: &Basis) -> Result<Adapter> {
    let (cfg, t) = read_config(dir)?;
    if t.as_deref() != Some("EIGENLORAX") {
        return Err(Error::format(format!(
            "folder '{}': peft_type is {:?}, not EIGENLORAX",
            dir.display(),
            t
        )));
    }
    check_version(dir, &cfg, "EIGENLORAX")?;
    let w = Weights::open(dir.join(WEIGHTS_FILE))?;
    let mut ad = Adapter::new(&peft::adapter_name(dir));
    for (name, m) in modules_of(&cfg, dir)? {
        let m = m.as_object().ok_or_else(|| {
            Error::format(format!(
                "folder '{}': module '{name}' is not an object",
                dir.display()
            ))
        })?;
        let bm = basis.module_arc(name)?;
        let fp = m
            .get("basis_fingerprint")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        if fp != format!("{:016x}", bm.fingerprint) {
            return Err(Error::invalid(format!(
                "module '{name}': the loadings were trained on basis {fp}, the basis given is {:016x}",
                bm.fingerprint
            )));
        }
        let k = field_usize(m, "components", name, dir)?;
        let r = field_usize(m, "rank", name, dir)?;
        if k != bm.k() {
            return Err(Error::shape(format!(
                "module '{name}': {k} components in the folder, {} in the basis",
                bm.k()
            )));
        }
        let scale = field_f32(m, "scale", name, dir)?;
        let a = tensor_f32(&w, &format!("{name}.alpha_A"), k, r)?;
        let b = tensor_f32(&w, &format!("{name}.alpha_B"), k, r)?;
        let l = Lora::eigen_from_loadings(bm.clone(), r, &a, &b, scale)?;
        l.set_rank(field_usize(m, "components_in_use", name, dir)?)?;
        ad.add(l)?;
    }
    if ad.is_empty() {
        return Err(Error::format(format!(
            "folder '{}': no modules",
            dir.display()
        )));
    }
    Ok(ad)
}

/// Saves an adapter in its kind's folder format: PEFT for LoRA modules, KRADAPTER or
/// EIGENLORAX for the others. One adapter holds one kind.
pub fn save_any(adapter: &Adapter, dir: &Path) -> Result<()> {
    let mut kinds: Vec<&'static str> = adapter.modules().map(|l| l.kind.name()).collect();
    kinds.sort();
    kinds.dedup();
    match kinds.as_slice() {
        ["KRAdapter"] => save_kradapter(adapter, dir),
        ["EigenLoRAx"] => save_eigenlorax(adapter, dir),
        [] | ["LoRA"] => peft::save(adapter, dir),
        _ => Err(Error::unsupported(format!(
            "adapter '{}' mixes module kinds ({}): each folder format holds one kind; save them as separate adapters",
            adapter.name,
            kinds.join(", ")
        ))),
    }
}

fn save_kradapter(adapter: &Adapter, dir: &Path) -> Result<()> {
    let mut tensors = Vec::new();
    let mut mods = Map::new();
    for l in adapter.modules() {
        let (s, u, v) = l.kron_parts()?;
        tensors.push(f32_tensor(format!("{}.kradapter_U", l.name), s.m, s.r, &u));
        tensors.push(f32_tensor(
            format!("{}.kradapter_V", l.name),
            s.m,
            s.w(),
            &v,
        ));
        mods.insert(
            l.name.clone(),
            json!({"out_features": s.out, "in_features": s.inp, "r": s.r, "d": s.d, "scale": l.fixed_scale}),
        );
    }
    let cfg = json!({
        "peft_type": "KRADAPTER",
        "rankfuse_format_version": FORMAT_VERSION,
        "target_modules": adapter.modules().map(|l| l.name.clone()).collect::<Vec<_>>(),
        "modules": mods,
    });
    write_config(dir, &cfg)?;
    write_safetensors(&dir.join(WEIGHTS_FILE), &tensors, None)
}

/// α_A with the gains (E ⊙ mask) folded into its columns, exactly as the forward applies them.
fn folded_alpha_a(l: &Lora) -> Result<(Arc<crate::adapter::BasisModule>, Vec<f32>, Vec<f32>)> {
    let (b, mut a, ab) = l.eigen_loadings()?;
    let r = l.capacity;
    if let Some(t) = l.train.as_deref() {
        if t.gains_eff.is_some() {
            for (i, v) in a.iter_mut().enumerate() {
                *v *= t.gain(i % r);
            }
        }
    }
    Ok((b, a, ab))
}

fn save_eigenlorax(adapter: &Adapter, dir: &Path) -> Result<()> {
    let mut tensors = Vec::new();
    let mut mods = Map::new();
    for l in adapter.modules() {
        let (b, a, ab) = folded_alpha_a(l)?;
        let (k, r) = (b.k(), l.capacity);
        tensors.push(f32_tensor(format!("{}.alpha_A", l.name), k, r, &a));
        tensors.push(f32_tensor(format!("{}.alpha_B", l.name), k, r, &ab));
        mods.insert(
            l.name.clone(),
            json!({
                "out_features": b.out_features, "in_features": b.in_features,
                "components": k, "rank": r, "components_in_use": l.rank(),
                "scale": l.fixed_scale,
                "basis_fingerprint": format!("{:016x}", b.fingerprint),
            }),
        );
    }
    let cfg = json!({
        "peft_type": "EIGENLORAX",
        "rankfuse_format_version": FORMAT_VERSION,
        "target_modules": adapter.modules().map(|l| l.name.clone()).collect::<Vec<_>>(),
        "modules": mods,
    });
    write_config(dir, &cfg)?;
    write_safetensors(&dir.join(WEIGHTS_FILE), &tensors, None)
}

/// Writes a basis folder: `basis.safetensors` + a config with each module's fingerprint.
pub fn save_basis(basis: &Basis, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::from_io(dir, &e))?;
    basis.save(&dir.join(BASIS_FILE))?;
    let mods: Map<String, Value> = basis
        .modules
        .values()
        .map(|m| {
            (
                m.name.clone(),
                json!({"in_features": m.in_features, "out_features": m.out_features,
                       "components": m.k(), "fingerprint": format!("{:016x}", m.fingerprint)}),
            )
        })
        .collect();
    write_config(
        dir,
        &json!({
            "peft_type": "EIGENLORAX_BASIS",
            "rankfuse_format_version": FORMAT_VERSION,
            "components": basis.components,
            "augment": basis.augment,
            "adapters": basis.adapters,
            "modules": mods,
        }),
    )
}

/// Loads a basis: a folder from `save_basis` (version and fingerprints checked) or a bare
/// `basis.safetensors` file from `rankfuse eigen build`.
pub fn load_basis(path: &Path) -> Result<Basis> {
    if !path.is_dir() {
        return Basis::load(path);
    }
    let (cfg, t) = read_config(path)?;
    if t.as_deref() != Some("EIGENLORAX_BASIS") {
        return Err(Error::format(format!(
            "folder '{}': peft_type is {:?}, not EIGENLORAX_BASIS",
            path.display(),
            t
        )));
    }
    check_version(path, &cfg, "EIGENLORAX_BASIS")?;
    let b = Basis::load(&path.join(BASIS_FILE))?;
    for (name, m) in modules_of(&cfg, path)? {
        let bm = b.module(name)?;
        let want = m.get("fingerprint").and_then(|v| v.as_str()).unwrap_or("");
        if want != format!("{:016x}", bm.fingerprint) {
            return Err(Error::format(format!(
                "folder '{}': module '{name}': basis data do not match the recorded fingerprint",
                path.display()
            )));
        }
    }
    Ok(b)
}
