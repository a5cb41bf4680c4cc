//! Module names between Hugging Face (PEFT) and GGUF (llama.cpp), table-driven, as llama.cpp's
//! `convert_lora_to_gguf.py` does through gguf-py's `tensor_mapping.py` for the base model's
//! architecture. Each row is (HF module path with `{N}` for the block, GGUF tensor name without
//! `.weight`). HF paths are matched after an optional model prefix (`model.` for llama-family
//! causal LMs, `bert.` / `model.` for BERT) and the reverse mapping writes the first form
//! listed. docs/formats.md shows the same tables.

use crate::error::{Error, Result};

/// A family of architectures sharing one table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// llama, mistral, qwen2 (the same projection names in HF and in GGUF).
    Llama,
    /// BERT-style encoders (bert, nomic-bert, jina-bert-v2 use the same HF names here).
    Bert,
}

/// `general.architecture` values and their family.
const ARCHES: &[(&str, Family)] = &[
    ("llama", Family::Llama),
    ("mistral", Family::Llama),
    ("qwen2", Family::Llama),
    ("bert", Family::Bert),
];

const LLAMA: &[(&str, &str)] = &[
    ("model.layers.{N}.self_attn.q_proj", "blk.{N}.attn_q"),
    ("model.layers.{N}.self_attn.k_proj", "blk.{N}.attn_k"),
    ("model.layers.{N}.self_attn.v_proj", "blk.{N}.attn_v"),
    ("model.layers.{N}.self_attn.o_proj", "blk.{N}.attn_output"),
    ("model.layers.{N}.mlp.gate_proj", "blk.{N}.ffn_gate"),
    ("model.layers.{N}.mlp.up_proj", "blk.{N}.ffn_up"),
    ("model.layers.{N}.mlp.down_proj", "blk.{N}.ffn_down"),
    ("lm_head", "output"),
    ("model.embed_tokens", "token_embd"),
];

const BERT: &[(&str, &str)] = &[
    ("encoder.layer.{N}.attention.self.query", "blk.{N}.attn_q"),
    ("encoder.layer.{N}.attention.self.key", "blk.{N}.attn_k"),
    ("encoder.layer.{N}.attention.self.value", "blk.{N}.attn_v"),
    (
        "encoder.layer.{N}.attention.output.dense",
        "blk.{N}.attn_output",
    ),
    ("encoder.layer.{N}.intermediate.dense", "blk.{N}.ffn_up"),
    ("encoder.layer.{N}.output.dense", "blk.{N}.ffn_down"),
    ("embeddings.word_embeddings", "token_embd"),
];

/// Whether llama.cpp's converter permutes the rows of q/k projections for this architecture
/// (`LlamaModel.permute` in convert_hf_to_gguf.py: rotary pairs interleaved per head), which a
/// LoRA's lora_b must follow. llama and mistral do; qwen2 and bert do not.
pub fn permutes_qk(arch: &str) -> bool {
    matches!(arch, "llama" | "mistral")
}

/// For a GGUF module name `blk.N.attn_q` / `blk.N.attn_k`: whether it is q (true) or k (false).
pub fn qk_kind(gguf: &str) -> Option<bool> {
    let rest = gguf.strip_prefix("blk.")?;
    let (_, m) = rest.split_once('.')?;
    match m {
        "attn_q" => Some(true),
        "attn_k" => Some(false),
        _ => None,
    }
}

/// The row order convert_hf_to_gguf.py gives a q/k projection with `rows` outputs and `heads`
/// heads: GGUF row `h*dh + 2j + i` is Hugging Face row `h*dh + i*dh/2 + j` (i in 0..2).
/// `inverse` gives the opposite direction. Errors if rows do not split into heads x 2.
pub fn qk_permutation(rows: usize, heads: usize, inverse: bool) -> Result<Vec<usize>> {
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        return Err(Error::shape(format!(
            "{rows} rows do not split into {heads} heads of an even size (rotary q/k permutation)"
        )));
    }
    let dh = rows / heads;
    let half = dh / 2;
    let mut p = vec![0; rows];
    for h in 0..heads {
        for i in 0..2 {
            for j in 0..half {
                let (g, hf) = (h * dh + 2 * j + i, h * dh + i * half + j);
                if inverse {
                    p[hf] = g;
                } else {
                    p[g] = hf;
                }
            }
        }
    }
    Ok(p)
}

/// Prefixes an HF path may carry before the table's own form (stripped when matching).
fn prefixes(f: Family) -> &'static [&'static str] {
    match f {
        // `layers.N...`: a bare LlamaModel (or the tests' TinyPruned fixture).
        Family::Llama => &["", "model."],
        Family::Bert => &["", "bert.", "model."],
    }
}

fn table(f: Family) -> &'static [(&'static str, &'static str)] {
    match f {
        Family::Llama => LLAMA,
        Family::Bert => BERT,
    }
}

/// The family of an architecture name, or UNSUPPORTED listing the known ones.
pub fn family(arch: &str) -> Result<Family> {
    ARCHES
        .iter()
        .find(|(a, _)| *a == arch)
        .map(|(_, f)| *f)
        .ok_or_else(|| {
            let known: Vec<&str> = ARCHES.iter().map(|(a, _)| *a).collect();
            Error::unsupported(format!(
                "architecture '{arch}' has no PEFT <-> GGUF name table (known: {})",
                known.join(", ")
            ))
        })
}

/// Matches `name` against a pattern with at most one `{N}` (a decimal block number).
fn match_pattern(pat: &str, name: &str) -> Option<Option<u64>> {
    match pat.split_once("{N}") {
        None => (pat == name).then_some(None),
        Some((pre, post)) => {
            let mid = name.strip_prefix(pre)?.strip_suffix(post)?;
            let ok = !mid.is_empty()
                && mid.bytes().all(|b| b.is_ascii_digit())
                && (mid == "0" || !mid.starts_with('0'));
            ok.then(|| mid.parse().ok()).flatten().map(Some)
        }
    }
}

fn fill(pat: &str, n: Option<u64>) -> String {
    match n {
        Some(n) => pat.replace("{N}", &n.to_string()),
        None => pat.to_string(),
    }
}

/// Whether `name` already is a GGUF module name of the family (`blk.0.attn_q`, `output`).
pub fn is_gguf_name(f: Family, name: &str) -> bool {
    table(f)
        .iter()
        .any(|(_, g)| match_pattern(g, name).is_some())
}

/// The GGUF name of an HF module path, if the table has it.
pub fn to_gguf(f: Family, hf: &str) -> Option<String> {
    for p in prefixes(f) {
        let Some(rest) = hf.strip_prefix(p) else {
            continue;
        };
        for (h, g) in table(f) {
            // Table rows carry their usual prefix; try both with and without it.
            let bare = h.strip_prefix("model.").unwrap_or(h);
            for form in [*h, bare] {
                if let Some(n) = match_pattern(form, rest) {
                    return Some(fill(g, n));
                }
            }
        }
    }
    None
}

/// The HF module path of a GGUF name (the table's form), if the table has it.
pub fn to_hf(f: Family, gguf: &str) -> Option<String> {
    table(f)
        .iter()
        .find_map(|(h, g)| match_pattern(g, gguf).map(|n| fill(h, n)))
}

/// Maps every name with `map`; names it cannot map are one error listing them all.
pub fn map_all(
    names: &[String],
    what: &str,
    map: impl Fn(&str) -> Option<String>,
) -> Result<Vec<String>> {
    let mut out = Vec::with_capacity(names.len());
    let mut bad = Vec::new();
    for n in names {
        match map(n) {
            Some(m) => out.push(m),
            None => bad.push(format!("'{n}'")),
        }
    }
    if !bad.is_empty() {
        return Err(Error::unsupported(format!(
            "{} module name(s) have no {what} mapping: {}",
            bad.len(),
            bad.join(", ")
        )));
    }
    let mut seen = std::collections::HashSet::new();
    for (src, m) in names.iter().zip(&out) {
        if !seen.insert(m.as_str()) {
            return Err(Error::invalid(format!(
                "module '{src}' maps to '{m}', which another module also maps to"
            )));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_both_ways() {
        let f = Family::Llama;
        for hf in [
            "model.layers.12.self_attn.o_proj",
            "layers.12.self_attn.o_proj",
        ] {
            assert_eq!(to_gguf(f, hf).as_deref(), Some("blk.12.attn_output"));
        }
        assert_eq!(to_gguf(f, "lm_head").as_deref(), Some("output"));
        assert_eq!(to_gguf(f, "model.layers.01.mlp.up_proj"), None);
        assert_eq!(to_gguf(f, "model.layers.1.mlp.fc1"), None);
        assert_eq!(
            to_hf(f, "blk.3.ffn_down").as_deref(),
            Some("model.layers.3.mlp.down_proj")
        );
        assert!(is_gguf_name(f, "blk.0.attn_q") && !is_gguf_name(f, "layers.0.q"));
    }

    #[test]
    fn bert_prefixes() {
        let f = family("bert").unwrap();
        assert_eq!(
            to_gguf(f, "bert.encoder.layer.2.attention.self.query").as_deref(),
            Some("blk.2.attn_q")
        );
        assert_eq!(
            to_hf(f, "blk.0.ffn_up").as_deref(),
            Some("encoder.layer.0.intermediate.dense")
        );
        assert!(family("gpt2").is_err());
    }

    #[test]
    fn qk_permutation_is_convert_hf_to_gguf() {
        // numpy: arange(8).reshape(2, 2, 2, 1).swapaxes(1, 2).reshape(8) = [0 2 1 3 4 6 5 7]
        assert_eq!(
            qk_permutation(8, 2, false).unwrap(),
            vec![0, 2, 1, 3, 4, 6, 5, 7]
        );
        let f = qk_permutation(24, 3, false).unwrap();
        let b = qk_permutation(24, 3, true).unwrap();
        for g in 0..24 {
            assert_eq!(b[f[g]], g);
        }
        assert!(qk_permutation(10, 2, false).is_err());
    }

    #[test]
    fn unmapped_listed() {
        let names = vec!["lm_head".to_string(), "x.y".into(), "z".into()];
        let e = map_all(&names, "GGUF", |n| to_gguf(Family::Llama, n)).unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("'x.y'") && m.contains("'z'") && m.contains("2 module"),
            "{m}"
        );
    }
}
