//! PEFT's `rank_pattern` / `alpha_pattern` rule: a key matches a module when
//! `re.match(rf"(.*\.)?({key})$", module)` succeeds; the first matching key in the file's order
//! wins; otherwise the module keeps the global value.

use crate::error::{Error, Result};
use regex::{Regex, RegexBuilder};

/// Compiled regexes are capped so a hostile pattern cannot take unbounded memory or time
/// (the `regex` crate is linear-time; this bounds the automaton's size).
const REGEX_SIZE_LIMIT: usize = 1 << 20;
const MAX_KEY_LEN: usize = 4096;

pub struct PatternMap<T> {
    entries: Vec<(String, Regex, T)>,
}

impl<T: Copy> PatternMap<T> {
    pub fn empty() -> Self {
        PatternMap {
            entries: Vec::new(),
        }
    }

    /// Compiles keys in order. `field` names the config field for messages.
    pub fn new(field: &str, items: Vec<(String, T)>) -> Result<Self> {
        let mut entries = Vec::with_capacity(items.len());
        for (key, v) in items {
            if key.len() > MAX_KEY_LEN {
                return Err(Error::format(format!(
                    "{field}: key of {} bytes is too long",
                    key.len()
                )));
            }
            let re = RegexBuilder::new(&format!(r"^(?:.*\.)?(?:{key})$"))
                .size_limit(REGEX_SIZE_LIMIT)
                .dfa_size_limit(REGEX_SIZE_LIMIT)
                .build()
                .map_err(|e| {
                    Error::format(format!(
                        "{field}: key '{key}' is not a supported regex: {e}"
                    ))
                })?;
            entries.push((key, re, v));
        }
        Ok(PatternMap { entries })
    }

    /// The value of the first key matching `module`, if any.
    pub fn resolve(&self, module: &str) -> Option<T> {
        self.entries
            .iter()
            .find(|(_, re, _)| re.is_match(module))
            .map(|(_, _, v)| *v)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_rule() {
        let p = PatternMap::new(
            "rank_pattern",
            vec![
                ("layers.0.self_attn.q_proj".into(), 4),
                ("mlp.down_proj".into(), 16),
            ],
        )
        .unwrap();
        assert_eq!(p.resolve("layers.0.self_attn.q_proj"), Some(4));
        assert_eq!(p.resolve("model.layers.0.self_attn.q_proj"), Some(4));
        assert_eq!(p.resolve("layers.10.self_attn.q_proj"), None);
        assert_eq!(p.resolve("layers.1.mlp.down_proj"), Some(16));
        assert_eq!(p.resolve("layers.1.xmlp.down_proj"), None);
        let first = PatternMap::new(
            "p",
            vec![
                ("q_proj".into(), 1),
                (r"layers\.0\.self_attn\.q_proj".into(), 2),
            ],
        )
        .unwrap();
        assert_eq!(first.resolve("layers.0.self_attn.q_proj"), Some(1));
        assert!(PatternMap::<u32>::new("p", vec![("(".into(), 1)]).is_err());
        assert!(PatternMap::<u32>::new("p", vec![("(?=x)".into(), 1)]).is_err());
    }
}
