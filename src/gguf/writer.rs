use super::{Value, DEFAULT_ALIGNMENT, MAGIC};
use anyhow::{ensure, Context, Result};
use qwen_run_kernels::QuantType;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;

/// Writes one tensor's bytes when the file is written, for files too large to hold in memory
/// (`models/synth_gguf.rs`). It must write exactly the tensor's size in bytes.
pub type TensorSource = Arc<dyn Fn(&mut dyn Write) -> Result<()> + Send + Sync>;

#[derive(Clone)]
enum TensorData {
    Bytes(Vec<u8>),
    Streamed(usize, TensorSource),
}

impl TensorData {
    fn len(&self) -> usize {
        match self {
            TensorData::Bytes(b) => b.len(),
            TensorData::Streamed(n, _) => *n,
        }
    }
}

/// Writes GGUF v3 files: tests use it for tiny models with random weights, and `models/` for a
/// synthetic file with the exact layout of a large model.
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<usize>, QuantType, TensorData)>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn meta(&mut self, key: &str, value: Value) -> &mut Self {
        self.metadata.retain(|(k, _)| k != key);
        self.metadata.push((key.to_string(), value));
        self
    }

    /// Leaves the key out of the file.
    pub fn remove_meta(&mut self, key: &str) -> &mut Self {
        self.metadata.retain(|(k, _)| k != key);
        self
    }

    /// `dims` in ggml order (innermost first); `data` is the raw block bytes.
    pub fn tensor(
        &mut self,
        name: &str,
        dims: &[usize],
        ty: QuantType,
        data: Vec<u8>,
    ) -> Result<&mut Self> {
        let expected = Self::size_of(name, dims, ty)?;
        let n: usize = dims.iter().product();
        ensure!(
            data.len() == expected,
            "tensor {name}: {} bytes given, {} expected for {n} x {}",
            data.len(),
            expected,
            ty.name()
        );
        self.tensors
            .push((name.to_string(), dims.to_vec(), ty, TensorData::Bytes(data)));
        Ok(self)
    }

    /// Like [`GgufWriter::tensor`], but the bytes come from `source` while the file is written.
    pub fn tensor_streamed(
        &mut self,
        name: &str,
        dims: &[usize],
        ty: QuantType,
        source: TensorSource,
    ) -> Result<&mut Self> {
        let size = Self::size_of(name, dims, ty)?;
        self.tensors.push((
            name.to_string(),
            dims.to_vec(),
            ty,
            TensorData::Streamed(size, source),
        ));
        Ok(self)
    }

    fn size_of(name: &str, dims: &[usize], ty: QuantType) -> Result<usize> {
        let n: usize = dims.iter().product();
        ty.row_bytes(n).with_context(|| {
            format!(
                "tensor {name}: {n} elements is not a whole number of {} blocks",
                ty.name()
            )
        })
    }

    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let file = std::fs::File::create(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let mut w = BufWriter::new(file);
        self.write_to(&mut w)?;
        w.flush()?;
        Ok(())
    }

    /// Writes the model as `n` files named `{stem}-0000i-of-0000n.gguf` in `dir`, the way
    /// llama.cpp's gguf-split does (metadata in the first part, tensors spread over all); returns
    /// the paths.
    pub fn write_split(&self, dir: &Path, stem: &str, n: usize) -> Result<Vec<std::path::PathBuf>> {
        ensure!(
            n >= 1 && n <= self.tensors.len().max(1),
            "cannot split {} tensors into {n} parts",
            self.tensors.len()
        );
        let per = self.tensors.len().div_ceil(n);
        let mut paths = Vec::new();
        for i in 0..n {
            let mut part = GgufWriter::new();
            if i == 0 {
                part.metadata = self.metadata.clone();
            }
            part.meta("split.no", Value::U16(i as u16));
            part.meta("split.count", Value::U16(n as u16));
            part.meta("split.tensors.count", Value::I32(self.tensors.len() as i32));
            part.tensors = self
                .tensors
                .iter()
                .skip(i * per)
                .take(per)
                .cloned()
                .collect();
            let path = dir.join(format!("{stem}-{:05}-of-{n:05}.gguf", i + 1));
            part.write(&path)?;
            paths.push(path);
        }
        Ok(paths)
    }

    pub fn write_to(&self, w: &mut impl Write) -> Result<()> {
        let align = DEFAULT_ALIGNMENT;
        let mut header = Vec::new();
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&3u32.to_le_bytes());
        header.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        header.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            write_string(&mut header, k);
            header.extend_from_slice(&v.type_id().to_le_bytes());
            write_value(&mut header, v);
        }
        let mut offset = 0usize;
        for (name, dims, ty, data) in &self.tensors {
            write_string(&mut header, name);
            header.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                header.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            header.extend_from_slice(&ty.ggml_id().to_le_bytes());
            header.extend_from_slice(&(offset as u64).to_le_bytes());
            offset = (offset + data.len()).div_ceil(align) * align;
        }
        header.resize(header.len().div_ceil(align) * align, 0);
        w.write_all(&header)?;
        for (name, _, _, data) in &self.tensors {
            match data {
                TensorData::Bytes(b) => w.write_all(b)?,
                TensorData::Streamed(size, source) => {
                    let mut counted = Counted { inner: w, n: 0 };
                    source(&mut counted)?;
                    ensure!(
                        counted.n == *size,
                        "tensor {name}: its source wrote {} bytes, {size} expected",
                        counted.n
                    );
                }
            }
            w.write_all(&vec![0u8; data.len().div_ceil(align) * align - data.len()])?;
        }
        Ok(())
    }
}

struct Counted<'a, W: Write> {
    inner: &'a mut W,
    n: usize,
}

impl<W: Write> Write for Counted<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k;
        Ok(k)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn write_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            let elem = items.first().map_or(4, Value::type_id);
            out.extend_from_slice(&elem.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                write_value(out, item);
            }
        }
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}
