use super::{ggml_type_name, Value, DEFAULT_ALIGNMENT, MAGIC};
use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use qwen_run_kernels::QuantType;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

/// One tensor as the file describes it. `dims` are in ggml order: `dims[0]` is the innermost
/// (contiguous) dimension, so a weight matrix of `rows x cols` has `dims == [cols, rows]`.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<usize>,
    pub ty: QuantType,
    /// Which file of a split model holds the data.
    pub part: usize,
    /// Absolute byte offset of the data inside that file.
    pub offset: usize,
    pub size: usize,
}

impl TensorInfo {
    pub fn elements(&self) -> usize {
        self.dims.iter().product()
    }
}

/// A GGUF model, possibly split over several files, memory-mapped.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
    maps: Vec<Mmap>,
    paths: Vec<PathBuf>,
}

impl GgufFile {
    /// Opens a GGUF file. Given the first part of a split model (`name-00001-of-0000N.gguf`), it
    /// opens every part and presents them as one model.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let first = Part::open(path, 0)?;
        let split_count = first.split_count()?;
        let mut parts = vec![first];
        if split_count > 1 {
            let paths = split_paths(path, split_count)?;
            for (i, p) in paths.iter().enumerate().skip(1) {
                let part = Part::open(p, i)?;
                part.check_split_part(&parts[0], i, split_count)?;
                parts.push(part);
            }
        }
        let mut metadata = BTreeMap::new();
        let mut tensors = Vec::new();
        let mut paths = Vec::new();
        let mut maps = Vec::new();
        let version = parts[0].version;
        for (i, part) in parts.into_iter().enumerate() {
            if i == 0 {
                metadata = part.metadata;
            }
            tensors.extend(part.tensors);
            paths.push(part.path);
            maps.push(part.map);
        }
        let mut index = HashMap::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            if index.insert(t.name.clone(), i).is_some() {
                bail!(
                    "GGUF file {} holds the tensor '{}' twice; the file is malformed",
                    path.display(),
                    t.name
                );
            }
        }
        if let Some(expected) = metadata.get("split.tensors.count").and_then(Value::as_u64) {
            if expected as usize != tensors.len() {
                bail!(
                    "split GGUF model {} should hold {expected} tensors across {split_count} files but holds {}; a part is missing or from another model",
                    path.display(),
                    tensors.len()
                );
            }
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            index,
            maps,
            paths,
        })
    }

    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Total bytes of all parts.
    pub fn file_size(&self) -> u64 {
        self.maps.iter().map(|m| m.len() as u64).sum()
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.require(key)?
            .as_str()
            .with_context(|| self.wrong_type(key, "a string"))
    }

    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.require(key)?
            .as_u64()
            .with_context(|| self.wrong_type(key, "an unsigned integer"))
    }

    pub fn get_f64(&self, key: &str) -> Result<f64> {
        self.require(key)?
            .as_f64()
            .with_context(|| self.wrong_type(key, "a number"))
    }

    pub fn get_array(&self, key: &str) -> Result<&[Value]> {
        self.require(key)?
            .as_array()
            .with_context(|| self.wrong_type(key, "an array"))
    }

    fn require(&self, key: &str) -> Result<&Value> {
        self.metadata.get(key).with_context(|| {
            format!(
                "GGUF file {} has no metadata key '{key}'; it is not a complete model file of a supported kind",
                self.path.display()
            )
        })
    }

    fn wrong_type(&self, key: &str, expected: &str) -> String {
        format!(
            "GGUF metadata key '{key}' in {} is a {}, expected {expected}",
            self.path.display(),
            self.metadata[key].type_name()
        )
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    pub fn require_tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor(name).with_context(|| {
            format!(
                "GGUF file {} has no tensor '{name}'; the model is incomplete or not a Qwen2 model",
                self.path.display()
            )
        })
    }

    /// The raw bytes of a tensor, straight from the mapping.
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        &self.maps[t.part][t.offset..t.offset + t.size]
    }

    /// Gives the pages under bytes `range` of tensor `t` back to the system (for tensors that
    /// were copied into another layout): they leave this process's resident memory, stay in the
    /// page cache, and are read back from it if touched again. Only advice: a failure changes
    /// nothing but the memory use.
    pub fn release(&self, t: &TensorInfo, range: std::ops::Range<usize>) {
        let len = range.end.min(t.size).saturating_sub(range.start);
        if len > 0 {
            // SAFETY: the mapping is a read-only shared file mapping: MADV_DONTNEED drops page
            // table entries, and a later read faults the same file bytes back in.
            let _ = unsafe {
                self.maps[t.part].unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    t.offset + range.start,
                    len,
                )
            };
        }
    }
}

struct Part {
    path: PathBuf,
    version: u32,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    map: Mmap,
}

impl Part {
    fn open(path: &Path, part: usize) -> Result<Part> {
        let file = File::open(path)
            .with_context(|| format!("cannot open model file {}", path.display()))?;
        if file.metadata().map(|m| m.is_dir()).unwrap_or(false) {
            bail!(
                "{} is a directory, expected a .gguf model file",
                path.display()
            );
        }
        // SAFETY: the mapping is read-only; a model file changed under a running process is the
        // same hazard every mmap-based engine accepts (llama.cpp does the same).
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot memory-map {}", path.display()))?;
        let mut r = Cursor {
            data: &map,
            pos: 0,
            path,
            array_elements: 0,
        };
        let magic = r.bytes(4).map_err(|_| {
            anyhow::anyhow!(
                "{} is not a GGUF file: it is only {} bytes long",
                path.display(),
                map.len()
            )
        })?;
        if magic != MAGIC {
            bail!(
                "{} is not a GGUF file: it starts with {:02x?}, expected the magic bytes \"GGUF\". Give the path of a .gguf model file",
                path.display(),
                magic
            );
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            bail!(
                "{} is GGUF version {version}; qwen-run reads versions 2 and 3. Convert it with a current llama.cpp",
                path.display()
            );
        }
        let n_tensors = r.u64()?;
        let n_kv = r.u64()?;
        // Real models have hundreds of tensors and dozens of keys; counts beyond this are garbage
        // (and must not size an allocation). Smaller wrong counts surface as truncation below.
        const MAX_COUNT: u64 = 1 << 24;
        if n_tensors > MAX_COUNT || n_kv > MAX_COUNT {
            bail!(
                "{} is corrupt: its header claims {n_tensors} tensors and {n_kv} metadata entries",
                path.display()
            );
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let value = r.value(ty, &key)?;
            if metadata.contains_key(&key) {
                bail!(
                    "{} is corrupt: its metadata holds the key '{key}' twice, so which value counts is ambiguous. Use a file written by a current llama.cpp",
                    path.display()
                );
            }
            metadata.insert(key, value);
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a as usize,
                _ => bail!(
                    "{} is corrupt: general.alignment is {v}, expected a power of two",
                    path.display()
                ),
            },
        };
        let mut infos = Vec::with_capacity(n_tensors.min(4096) as usize);
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()?;
            if n_dims == 0 || n_dims > 4 {
                bail!(
                    "{} is corrupt: tensor '{name}' has {n_dims} dimensions, expected 1 to 4",
                    path.display()
                );
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64()?);
            }
            let ty = r.u32()?;
            let offset = r.u64()?;
            infos.push((name, dims, ty, offset));
        }
        let data_start = r.pos.div_ceil(alignment) * alignment;
        let mut tensors = Vec::with_capacity(infos.len());
        for (name, dims, ty_id, offset) in infos {
            let ty = QuantType::from_ggml_id(ty_id).with_context(|| {
                let what = ggml_type_name(ty_id)
                    .map(|n| format!("ggml type {ty_id} ({n})"))
                    .unwrap_or_else(|| format!("unknown ggml type {ty_id}"));
                format!(
                    "tensor '{name}' in {} is of {what}, which qwen-run does not support. Supported types: {}. Use a GGUF quantized to one of them (for example Q4_K_M or Q5_K_M)",
                    path.display(),
                    super::supported_type_names()
                )
            })?;
            let elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .filter(|&n| n <= map.len() as u64 * 8)
                .with_context(|| {
                    format!(
                        "{} is corrupt: tensor '{name}' has dimensions {dims:?}",
                        path.display()
                    )
                })? as usize;
            let size = if !(dims[0] as usize).is_multiple_of(ty.block_size()) {
                bail!(
                    "{} is corrupt: tensor '{name}' of type {} has rows of {} elements, not a multiple of its block size {}",
                    path.display(),
                    ty.name(),
                    dims[0],
                    ty.block_size()
                );
            } else {
                elements / ty.block_size() * ty.block_bytes()
            };
            // Offsets come from the file: a huge one must not wrap around to a small start.
            let start = (data_start as u64)
                .checked_add(offset)
                .filter(|&s| s <= map.len() as u64);
            let Some(start) = start else {
                bail!(
                    "{} is corrupt: tensor '{name}' has the data offset {offset}, which overflows or lies past the end of the file ({} bytes)",
                    path.display(),
                    map.len()
                );
            };
            if start % alignment as u64 != 0 {
                bail!(
                    "{} is corrupt: tensor '{name}' starts at offset {offset}, not aligned to {alignment} bytes",
                    path.display()
                );
            }
            let end = start.saturating_add(size as u64);
            if end > map.len() as u64 {
                bail!(
                    "{} is truncated: tensor '{name}' needs bytes {start}..{end} but the file has only {} bytes. Download the file again (or re-join its parts)",
                    path.display(),
                    map.len()
                );
            }
            tensors.push(TensorInfo {
                name,
                dims: dims.into_iter().map(|d| d as usize).collect(),
                ty,
                part,
                offset: start as usize,
                size,
            });
        }
        Ok(Part {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            map,
        })
    }

    /// A part found by its name must say it is that part of this model: a part left over from
    /// another download of the same name would otherwise mix two models' tensors.
    fn check_split_part(&self, first: &Part, i: usize, count: usize) -> Result<()> {
        let get = |key: &str| self.metadata.get(key).and_then(Value::as_u64);
        let what = |key: &str| {
            self.metadata
                .get(key)
                .map_or_else(|| "missing".to_string(), |v| v.to_string())
        };
        if get("split.no") != Some(i as u64) {
            bail!(
                "{} should be part {} of {count} of the split model {} but its split.no is {} (expected {i}); the part is from another model or damaged. Download the parts again",
                self.path.display(),
                i + 1,
                first.path.display(),
                what("split.no")
            );
        }
        if get("split.count") != Some(count as u64) {
            bail!(
                "{} should be part {} of {count} of the split model {} but its split.count is {}; the part is from another model or damaged. Download the parts again",
                self.path.display(),
                i + 1,
                first.path.display(),
                what("split.count")
            );
        }
        let arch = |p: &Part| {
            p.metadata
                .get("general.architecture")
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        if let (Some(a), Some(b)) = (arch(first), arch(self)) {
            if a != b {
                bail!(
                    "{} is a '{b}' model but the first part {} is a '{a}' model; the parts are from different models. Download the parts again",
                    self.path.display(),
                    first.path.display()
                );
            }
        }
        Ok(())
    }

    fn split_count(&self) -> Result<usize> {
        match self.metadata.get("split.count").and_then(Value::as_u64) {
            None | Some(0) | Some(1) => Ok(1),
            Some(n) => {
                let no = self
                    .metadata
                    .get("split.no")
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                if no != 0 {
                    bail!(
                        "{} is part {} of a split model; give the first part (…-00001-of-{n:05}.gguf)",
                        self.path.display(),
                        no + 1
                    );
                }
                Ok(n as usize)
            }
        }
    }
}

/// `model-00001-of-00003.gguf` -> the paths of all three parts, each of which must exist.
fn split_paths(first: &Path, count: usize) -> Result<Vec<PathBuf>> {
    let name = first
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let suffix = format!("-00001-of-{count:05}.gguf");
    let Some(stem) = name.strip_suffix(&suffix) else {
        bail!(
            "{} says it is the first of {count} split parts, but its name does not end in '{suffix}', so the other parts cannot be found",
            first.display()
        );
    };
    let dir = first.parent().unwrap_or(Path::new("."));
    (1..=count)
        .map(|i| {
            let p = dir.join(format!("{stem}-{i:05}-of-{count:05}.gguf"));
            if p.exists() {
                Ok(p)
            } else {
                bail!(
                    "part {i} of {count} of the split model is missing: expected {}",
                    p.display()
                )
            }
        })
        .collect()
}

/// Bound on the elements of all metadata arrays of one file together.
const MAX_ARRAY_ELEMENTS: u64 = 1 << 22;

struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
    path: &'a Path,
    array_elements: u64,
}

impl<'a> Cursor<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let Some(end) = end else {
            bail!(
                "{} is truncated: its header needs {n} bytes at offset {} but the file ends at {}. Download the file again",
                self.path.display(),
                self.pos,
                self.data.len()
            );
        };
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.bytes(N)?.try_into().expect("length checked"))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String> {
        let at = self.pos;
        let len = self.u64()?;
        let bytes = self.bytes(usize::try_from(len).unwrap_or(usize::MAX))?;
        String::from_utf8(bytes.to_vec()).map_err(|_| {
            anyhow::anyhow!(
                "{} is corrupt: the string at offset {at} is not valid UTF-8",
                self.path.display()
            )
        })
    }

    fn value(&mut self, ty: u32, key: &str) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(self.array::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => Value::Bool(self.array::<1>()?[0] != 0),
            8 => Value::String(self.string()?),
            9 => {
                let elem_ty = self.u32()?;
                let n = self.u64()?;
                if elem_ty == 9 {
                    bail!(
                        "{}: metadata '{key}' is an array of arrays, which GGUF models do not use",
                        self.path.display()
                    );
                }
                if n > (self.data.len() - self.pos) as u64 {
                    bail!(
                        "{} is truncated (or its header is corrupt): metadata '{key}' claims {n} elements, more than the rest of the file holds. Download the file again",
                        self.path.display()
                    );
                }
                // Each element becomes a 32-byte `Value` whatever its size in the file, so a
                // file of a few GiB of u8 arrays would cost tens of GiB to parse. The largest
                // real vocabularies need well under a million elements (tokens, types, merges).
                self.array_elements = self.array_elements.saturating_add(n);
                if self.array_elements > MAX_ARRAY_ELEMENTS {
                    bail!(
                        "{} is corrupt or not a model file: metadata '{key}' brings its arrays to {} elements in all, more than the {MAX_ARRAY_ELEMENTS} that any model's vocabulary needs",
                        self.path.display(),
                        self.array_elements
                    );
                }
                let mut items = Vec::with_capacity(n.min(1 << 20) as usize);
                for _ in 0..n {
                    items.push(self.value(elem_ty, key)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => bail!(
                "{} is corrupt: metadata '{key}' has value type {other}, expected 0 to 12",
                self.path.display()
            ),
        })
    }
}
