//! Weight files, memory-mapped and zero-copy: a single `*.safetensors` file, a sharded model's
//! `*.safetensors.index.json`, or a GGUF file (recognised by its magic; `gguf.rs`). Headers are validated by the `safetensors` crate (header
//! length inside the file, well-formed JSON, contiguous non-overlapping offsets, byte length =
//! product(shape) x dtype size with overflow checks) before any view is handed out.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::matrix::MatRef;
use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub mod gguf;
pub mod gguf_write;
pub use gguf::MetaValue;

/// Largest sharded index JSON we read (real ones are well under 1 MiB).
const MAX_INDEX_BYTES: u64 = 64 << 20;

/// Largest safetensors JSON header accepted, checked from the 8-byte length prefix before the
/// header is parsed. The format (and the `safetensors` crate) allow 100 MB; real headers are
/// kilobytes to a few MiB (one entry of ~100 bytes per tensor), and parsing JSON costs several
/// times its size in memory, so rankfuse refuses more than 16 MiB (~150 000 tensors per file).
const MAX_HEADER_BYTES: u64 = 16 << 20;

/// How a file's bytes are held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OpenMode {
    /// Memory-map (zero-copy). A file truncated by another process while mapped makes later reads
    /// fault with SIGBUS; that is the OS's answer and cannot be turned into an error.
    #[default]
    Map,
    /// Read the whole file into memory: immune to files changing underneath, costs a copy.
    Read,
}

enum Backing {
    Map(Mmap),
    Owned(Vec<u8>),
}

impl OpenMode {
    /// `Read` when the environment variable `RANKFUSE_NO_MMAP` is set to anything but empty or
    /// `0`, else `Map`. [`Weights::open`] (and so adapter loading) uses this.
    pub fn from_env() -> OpenMode {
        match std::env::var_os("RANKFUSE_NO_MMAP") {
            Some(v) if !v.is_empty() && v != "0" => OpenMode::Read,
            _ => OpenMode::Map,
        }
    }
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Map(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

struct Shard {
    path: PathBuf,
    backing: Backing,
    metadata: HashMap<String, String>,
}

/// One tensor of the table.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub name: String,
    /// The dtype as written in the file ("F32", "I64", ...).
    pub dtype_name: String,
    /// The dtype, when rankfuse computes with it.
    pub dtype: Option<DType>,
    pub shape: Vec<usize>,
    shard: usize,
    /// Absolute byte range inside the shard's file.
    start: usize,
    end: usize,
}

impl TensorEntry {
    /// The shard (file) holding the tensor: 0 for a single file, else its index in the sharded
    /// model's files (see [`Weights::shard_path`]).
    pub fn shard(&self) -> usize {
        self.shard
    }
    /// Bytes of the tensor's data.
    pub fn byte_len(&self) -> usize {
        self.end - self.start
    }
}

/// Opened weights. Views returned by [`Weights::get`] borrow from it.
pub struct Weights {
    path: PathBuf,
    shards: Vec<Shard>,
    tensors: Vec<TensorEntry>,
    by_name: HashMap<String, usize>,
    /// Typed metadata: a GGUF file's key-value pairs in file order, or the first safetensors
    /// file's `__metadata__` (strings) sorted by key.
    meta: Vec<(String, MetaValue)>,
    is_gguf: bool,
}

fn st_dtype_name(d: StDtype) -> String {
    format!("{d:?}")
}

fn st_to_dtype(d: StDtype) -> Option<DType> {
    match d {
        StDtype::F32 => Some(DType::F32),
        StDtype::F16 => Some(DType::F16),
        StDtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

fn read_backing(path: &Path, mode: OpenMode) -> Result<Backing> {
    let file = std::fs::File::open(path).map_err(|e| Error::from_io(path, &e))?;
    match mode {
        OpenMode::Map => {
            // SAFETY: the map is read-only; a concurrent truncation by another process is the
            // documented SIGBUS case (use OpenMode::Read to rule it out).
            let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::from_io(path, &e))?;
            Ok(Backing::Map(map))
        }
        OpenMode::Read => {
            use std::io::Read;
            let len = file.metadata().map_err(|e| Error::from_io(path, &e))?.len();
            let mut bytes = Vec::new();
            usize::try_from(len)
                .ok()
                .and_then(|n| bytes.try_reserve_exact(n).ok())
                .ok_or_else(|| {
                    Error::oom(format!(
                        "file '{}': cannot allocate {len} bytes to read it",
                        path.display()
                    ))
                })?;
            (&file)
                .read_to_end(&mut bytes)
                .map_err(|e| Error::from_io(path, &e))?;
            Ok(Backing::Owned(bytes))
        }
    }
}

/// Finds which tensor makes a header invalid, for a message that names it. The crate's own
/// validation is authoritative; this only explains.
fn explain_invalid(bytes: &[u8]) -> Option<String> {
    let n = usize::try_from(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)).ok()?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(bytes.get(8..8usize.checked_add(n)?)?).ok()?;
    let data_len = bytes.len() - 8 - n;
    let mut ranges = Vec::new();
    for (name, v) in &header {
        if name == "__metadata__" {
            continue;
        }
        let offs = v.get("data_offsets")?.as_array()?;
        let (s, e) = (
            offs.first()?.as_u64()? as u128,
            offs.get(1)?.as_u64()? as u128,
        );
        // Only explain what is understood; anything else keeps the crate's own message.
        let shape: Vec<u128> = v
            .get("shape")?
            .as_array()?
            .iter()
            .map(|d| d.as_u64().map(u128::from))
            .collect::<Option<_>>()?;
        let size = match v.get("dtype")?.as_str()? {
            "F64" | "I64" | "U64" => 8u128,
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" | "U16" => 2,
            "I8" | "U8" | "BOOL" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 1,
            _ => return None,
        };
        let elems = shape.iter().try_fold(1u128, |a, &d| a.checked_mul(d));
        let Some(elems) = elems.filter(|&e| e < (1u128 << 64)) else {
            return Some(format!("tensor '{name}': shape {shape:?} overflows"));
        };
        if e < s || e > data_len as u128 {
            return Some(format!(
                "tensor '{name}': data_offsets [{s}, {e}] outside the {data_len}-byte data section"
            ));
        }
        if e - s != elems * size {
            return Some(format!(
                "tensor '{name}': {} bytes for shape {shape:?} ({} expected)",
                e - s,
                elems * size
            ));
        }
        ranges.push((s, e, name.clone()));
    }
    ranges.sort();
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 {
            return Some(format!("tensors '{}' and '{}' overlap", w[0].2, w[1].2));
        }
        if w[1].0 > w[0].1 {
            return Some(format!("gap between tensors '{}' and '{}'", w[0].2, w[1].2));
        }
    }
    None
}

/// The first key that appears twice in one JSON object of `header` (at any depth), if any.
/// JSON parsers disagree on duplicates (first wins, last wins, error); serde_json keeps the last,
/// so such a file could mean one thing to rankfuse and another to a different tool. Invalid JSON
/// gives `None` (the real parse reports it).
fn duplicate_key(header: &[u8]) -> Option<String> {
    use serde::de::{Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
    const TAG: &str = "rankfuse-duplicate-key:";
    struct NoDup;
    impl<'de> serde::Deserialize<'de> for NoDup {
        fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
            d.deserialize_any(NoDupVisitor)
        }
    }
    struct NoDupVisitor;
    impl<'de> Visitor<'de> for NoDupVisitor {
        type Value = NoDup;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> std::result::Result<NoDup, A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(k) = m.next_key::<String>()? {
                m.next_value::<NoDup>()?;
                if seen.contains(&k) {
                    return Err(A::Error::custom(format!("{TAG}{k}")));
                }
                seen.insert(k);
            }
            Ok(NoDup)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> std::result::Result<NoDup, A::Error> {
            while s.next_element::<NoDup>()?.is_some() {}
            Ok(NoDup)
        }
        fn visit_bool<E>(self, _: bool) -> std::result::Result<NoDup, E> {
            Ok(NoDup)
        }
        fn visit_i64<E>(self, _: i64) -> std::result::Result<NoDup, E> {
            Ok(NoDup)
        }
        fn visit_u64<E>(self, _: u64) -> std::result::Result<NoDup, E> {
            Ok(NoDup)
        }
        fn visit_f64<E>(self, _: f64) -> std::result::Result<NoDup, E> {
            Ok(NoDup)
        }
        fn visit_str<E>(self, _: &str) -> std::result::Result<NoDup, E> {
            Ok(NoDup)
        }
        fn visit_unit<E>(self) -> std::result::Result<NoDup, E> {
            Ok(NoDup)
        }
    }
    let e = serde_json::from_slice::<NoDup>(header).err()?;
    let msg = e.to_string();
    let rest = msg.strip_prefix(TAG)?;
    // serde_json appends " at line L column C" to custom messages.
    let key = rest.rsplit_once(" at line ").map_or(rest, |(k, _)| k);
    Some(key.to_string())
}

fn parse_shard(
    path: &Path,
    backing: Backing,
    shard_idx: usize,
    out: &mut Vec<TensorEntry>,
) -> Result<Shard> {
    let bytes = backing.bytes();
    let Some(prefix) = bytes.get(..8) else {
        return Err(Error::format(format!(
            "file '{}': {} bytes is too short for a safetensors file (8-byte header length first)",
            path.display(),
            bytes.len()
        )));
    };
    let n = u64::from_le_bytes(prefix.try_into().expect("8 bytes"));
    if n > MAX_HEADER_BYTES {
        return Err(Error::format(format!(
            "file '{}': header length {n} is over rankfuse's {MAX_HEADER_BYTES}-byte limit",
            path.display()
        )));
    }
    if n > (bytes.len() - 8) as u64 {
        return Err(Error::format(format!(
            "file '{}': header length {n} runs past the end of the {}-byte file",
            path.display(),
            bytes.len()
        )));
    }
    let header = &bytes[8..8 + n as usize];
    if let Some(k) = duplicate_key(header) {
        return Err(Error::format(format!(
            "file '{}': invalid safetensors: key '{}' appears twice in one object of the header",
            path.display(),
            k.escape_debug()
        )));
    }
    let (header_len, meta) = SafeTensors::read_metadata(bytes).map_err(|e| {
        let why = explain_invalid(bytes).unwrap_or_else(|| e.to_string());
        Error::format(format!(
            "file '{}': invalid safetensors: {why}",
            path.display()
        ))
    })?;
    let data_start = 8 + header_len;
    let mut entries: Vec<(String, &safetensors::tensor::TensorInfo)> =
        meta.tensors().into_iter().collect();
    entries.sort_by_key(|(_, info)| info.data_offsets);
    for (name, info) in entries {
        let (s, e) = info.data_offsets;
        // read_metadata checked s <= e and that the last offset ends the file; recheck cheaply.
        let (start, end) = (data_start.checked_add(s), data_start.checked_add(e));
        let (Some(start), Some(end)) = (start, end) else {
            return Err(Error::format(format!(
                "file '{}': tensor '{name}': offsets overflow",
                path.display()
            )));
        };
        if end > bytes.len() || start > end {
            return Err(Error::format(format!(
                "file '{}': tensor '{name}': data outside the file",
                path.display()
            )));
        }
        out.push(TensorEntry {
            name,
            dtype_name: st_dtype_name(info.dtype),
            dtype: st_to_dtype(info.dtype),
            shape: info.shape.clone(),
            shard: shard_idx,
            start,
            end,
        });
    }
    let metadata = meta.metadata().clone().unwrap_or_default();
    Ok(Shard {
        path: path.to_path_buf(),
        backing,
        metadata,
    })
}

/// The `weight_map` of a sharded model's index JSON: (tensor, shard file name) pairs, each file
/// name checked to be a plain name beside the index (no directories, no `..`). `index` names the
/// file in messages.
pub fn parse_index(index: &Path, text: &[u8]) -> Result<Vec<(String, String)>> {
    let shown = index.display();
    let json: serde_json::Value = serde_json::from_slice(text)
        .map_err(|e| Error::format(format!("index '{shown}': invalid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::format(format!("index '{shown}': no \"weight_map\" object")))?;
    let mut out = Vec::with_capacity(map.len());
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| {
            Error::format(format!(
                "index '{shown}': weight_map['{name}'] is not a string"
            ))
        })?;
        if file.is_empty() || file.contains(['/', '\\', '\0']) || file == ".." || file == "." {
            return Err(Error::format(format!(
                "index '{shown}': weight_map['{name}'] = '{}' is not a file name beside the index",
                file.escape_debug()
            )));
        }
        out.push((name.clone(), file.to_string()));
    }
    Ok(out)
}

/// Opens each shard the index names once (through `load`: file name -> (path, bytes)) and picks
/// the tensors the index assigns to it.
fn assemble_index(
    index: &Path,
    text: &[u8],
    shards: &mut Vec<Shard>,
    tensors: &mut Vec<TensorEntry>,
    mut load: impl FnMut(&str) -> Result<(PathBuf, Backing)>,
) -> Result<()> {
    let shown = index.display();
    let map = parse_index(index, text)?;
    let mut shard_of: HashMap<&str, usize> = HashMap::new();
    let mut wanted: Vec<(&str, usize)> = Vec::with_capacity(map.len());
    let mut all: Vec<TensorEntry> = Vec::new();
    for (name, file) in &map {
        let idx = match shard_of.get(file.as_str()) {
            Some(&i) => i,
            None => {
                let (p, backing) = load(file).map_err(|e| e.context(format!("index '{shown}'")))?;
                let i = shards.len();
                shards.push(parse_shard(&p, backing, i, &mut all)?);
                shard_of.insert(file, i);
                i
            }
        };
        wanted.push((name, idx));
    }
    let mut found: HashMap<(&str, usize), &TensorEntry> = HashMap::new();
    for t in &all {
        found.insert((t.name.as_str(), t.shard), t);
    }
    for (name, idx) in wanted {
        let t = found.get(&(name, idx)).ok_or_else(|| {
            Error::not_found(format!(
                "index '{shown}': tensor '{name}' is not in shard '{}'",
                shards[idx].path.display()
            ))
        })?;
        tensors.push((*t).clone());
    }
    Ok(())
}

impl Weights {
    /// Opens a `.safetensors` file, or a sharded model through its `.safetensors.index.json`;
    /// memory-mapped unless `RANKFUSE_NO_MMAP` is set (see [`OpenMode::from_env`]).
    pub fn open(path: impl AsRef<Path>) -> Result<Weights> {
        Self::open_with(path, OpenMode::from_env())
    }

    /// Whether the tensors live in a memory map (`OpenMode::Map`) rather than owned memory.
    pub fn is_mapped(&self) -> bool {
        self.shards
            .iter()
            .any(|s| matches!(s.backing, Backing::Map(_)))
    }

    pub fn open_with(path: impl AsRef<Path>, mode: OpenMode) -> Result<Weights> {
        let path = path.as_ref();
        let is_index = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(".index.json"));
        let mut tensors = Vec::new();
        let mut shards = Vec::new();
        if is_index {
            Self::open_index(path, mode, &mut shards, &mut tensors)?;
        } else {
            let backing = read_backing(path, mode)?;
            return Self::open_single(path.to_path_buf(), backing);
        }
        Self::finish(path.to_path_buf(), shards, tensors, None)
    }

    /// One file: GGUF when it starts with the magic "GGUF", else safetensors.
    fn open_single(path: PathBuf, backing: Backing) -> Result<Weights> {
        let mut tensors = Vec::new();
        if gguf::is_gguf(backing.bytes()) {
            let (shard, meta) = gguf::parse(&path, backing, &mut tensors)?;
            return Self::finish(path, vec![shard], tensors, Some(meta));
        }
        let shard = parse_shard(&path, backing, 0, &mut tensors)?;
        Self::finish(path, vec![shard], tensors, None)
    }

    fn open_index(
        path: &Path,
        mode: OpenMode,
        shards: &mut Vec<Shard>,
        tensors: &mut Vec<TensorEntry>,
    ) -> Result<()> {
        let meta = std::fs::metadata(path).map_err(|e| Error::from_io(path, &e))?;
        if meta.len() > MAX_INDEX_BYTES {
            return Err(Error::format(format!(
                "index '{}': {} bytes is over the {MAX_INDEX_BYTES}-byte limit",
                path.display(),
                meta.len()
            )));
        }
        let text = std::fs::read(path).map_err(|e| Error::from_io(path, &e))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        assemble_index(path, &text, shards, tensors, |file| {
            let p = dir.join(file);
            let backing = read_backing(&p, mode)?;
            Ok((p, backing))
        })
    }

    /// A sharded model from memory: the index JSON and its shards by file name (the names the
    /// index's `weight_map` uses). Same checks as [`Weights::open`] on an index; a shard the
    /// index names but `shards` lacks is NOT_FOUND. `name` stands for the index file in messages.
    pub fn from_index_bytes(name: &str, index: &[u8], shards: &[(&str, &[u8])]) -> Result<Weights> {
        let path = PathBuf::from(name);
        if index.len() as u64 > MAX_INDEX_BYTES {
            return Err(Error::format(format!(
                "index '{name}': {} bytes is over the {MAX_INDEX_BYTES}-byte limit",
                index.len()
            )));
        }
        let mut out_shards = Vec::new();
        let mut tensors = Vec::new();
        assemble_index(&path, index, &mut out_shards, &mut tensors, |file| {
            let (_, bytes) = shards
                .iter()
                .find(|(n, _)| *n == file)
                .ok_or_else(|| Error::not_found(format!("file '{file}': no such shard")))?;
            Ok((PathBuf::from(file), Backing::Owned(bytes.to_vec())))
        })?;
        Self::finish(path, out_shards, tensors, None)
    }

    /// `gguf_meta`: the typed metadata of a GGUF file (None: safetensors, whose string map
    /// becomes the typed metadata).
    fn finish(
        path: PathBuf,
        shards: Vec<Shard>,
        tensors: Vec<TensorEntry>,
        gguf_meta: Option<Vec<(String, MetaValue)>>,
    ) -> Result<Weights> {
        let mut by_name = HashMap::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            if by_name.insert(t.name.clone(), i).is_some() {
                return Err(Error::format(format!(
                    "file '{}': tensor '{}' appears twice",
                    path.display(),
                    t.name
                )));
            }
        }
        let is_gguf = gguf_meta.is_some();
        let meta = gguf_meta.unwrap_or_else(|| {
            let mut m: Vec<(String, MetaValue)> = shards
                .first()
                .map(|s| s.metadata.iter())
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), MetaValue::Str(v.as_bytes().to_vec())))
                .collect();
            m.sort_by(|a, b| a.0.cmp(&b.0));
            m
        });
        Ok(Weights {
            path,
            shards,
            tensors,
            by_name,
            meta,
            is_gguf,
        })
    }

    /// Weights from bytes already in memory (e.g. data embedded in a binary); `name` stands for
    /// the file in messages.
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<Weights> {
        Self::open_single(PathBuf::from(name), Backing::Owned(bytes))
    }

    /// Whether the file is GGUF (else safetensors).
    pub fn is_gguf(&self) -> bool {
        self.is_gguf
    }
    /// Typed metadata (see the field): GGUF key-value pairs in file order, or safetensors'
    /// `__metadata__` strings sorted by key.
    pub fn meta(&self) -> &[(String, MetaValue)] {
        &self.meta
    }
    /// A metadata value by key.
    pub fn meta_get(&self, key: &str) -> Option<&MetaValue> {
        self.meta.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn len(&self) -> usize {
        self.tensors.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
    pub fn entries(&self) -> &[TensorEntry] {
        &self.tensors
    }
    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }
    /// The position of a tensor in [`Weights::entries`].
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }
    /// Number of files (1 unless opened through a sharded model's index).
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }
    /// The path of shard `i` (as opened; for messages).
    pub fn shard_path(&self, i: usize) -> Option<&Path> {
        self.shards.get(i).map(|s| s.path.as_path())
    }
    /// The `__metadata__` of the (first) file.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.shards[0].metadata
    }

    /// The raw bytes of a tensor (any dtype), inside the mapping.
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self.entry(name).ok_or_else(|| self.missing(name))?;
        Ok(&self.shards[t.shard].backing.bytes()[t.start..t.end])
    }

    fn missing(&self, name: &str) -> Error {
        Error::not_found(format!(
            "file '{}': no tensor '{name}'",
            self.path.display()
        ))
    }

    /// A zero-copy 2-D view of a tensor: 2-D as is, 1-D as 1 x n, 0-D as 1 x 1; more dims or a
    /// dtype other than F32/F16/BF16 is an error naming the tensor.
    pub fn get(&self, name: &str) -> Result<MatRef<'_>> {
        let t = self.entry(name).ok_or_else(|| self.missing(name))?;
        let dtype = t.dtype.ok_or_else(|| {
            Error::unsupported(format!(
                "file '{}': tensor '{name}' has dtype {}; rankfuse computes with F32, F16, BF16, \
                 Q8_0, Q4_0, Q4_K and Q6_K",
                self.path.display(),
                t.dtype_name
            ))
        })?;
        let (rows, cols) = match t.shape.as_slice() {
            [] => (1, 1),
            [n] => (1, *n),
            [r, c] => (*r, *c),
            s => {
                return Err(Error::format(format!(
                "file '{}': tensor '{name}' has shape {s:?}; only 1-D and 2-D tensors are matrices",
                self.path.display()
            )))
            }
        };
        let bytes = &self.shards[t.shard].backing.bytes()[t.start..t.end];
        MatRef::from_bytes(bytes, dtype, rows, cols, cols.max(1))
    }
}

/// One tensor to write.
pub struct TensorOut<'a> {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: std::borrow::Cow<'a, [u8]>,
}

impl safetensors::View for &TensorOut<'_> {
    fn dtype(&self) -> StDtype {
        match self.dtype {
            DType::F32 => StDtype::F32,
            DType::F16 => StDtype::F16,
            DType::BF16 => StDtype::BF16,
            // write_safetensors refuses these before serializing (safetensors has no block
            // types); raw bytes are the honest fallback.
            DType::Q8_0 | DType::Q4_0 | DType::Q4_K | DType::Q6_K => StDtype::U8,
        }
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Writes tensors to a safetensors file (the crate's serializer: sorted by dtype then name,
/// 8-byte aligned header), with optional `__metadata__`.
pub fn write_safetensors(
    path: &Path,
    tensors: &[TensorOut<'_>],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    for t in tensors {
        if t.dtype.is_quantized() {
            return Err(Error::dtype(format!(
                "tensor '{}': safetensors has no {} dtype (block-quantized data stays in GGUF)",
                t.name,
                t.dtype.name()
            )));
        }
        let n: usize = t.shape.iter().product();
        if n * t.dtype.size() != t.data.len() {
            return Err(Error::internal(format!(
                "tensor '{}': {} bytes for shape {:?}",
                t.name,
                t.data.len(),
                t.shape
            )));
        }
    }
    let items: Vec<(&str, &TensorOut<'_>)> = tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    safetensors::serialize_to_file(items, metadata, path).map_err(|e| {
        Error::io(format!(
            "file '{}': cannot write safetensors: {e}",
            path.display()
        ))
    })
}
