//! The attention KV cache: one preallocated buffer per layer for the whole context, written in
//! place as tokens arrive. Nothing is concatenated per token.
//!
//! Keys and values each have their own storage type (llama.cpp's `--cache-type-k/-v`): f32 on
//! the CPU lives in host memory, read and written in place by the host pass; f32 on a GPU and f16
//! live in Candle tensors; q8_0 (blocks of 32 values as i8 with one f16 scale, 34 bytes per
//! 32 values) lives in host memory and is dequantized to f32 when attention reads it.
//!
//! A token range can be exported as host bytes ([`KvBlock`]) and imported again, which is what
//! the prefix cache (in memory and on disk) is built on.

mod session;

pub use session::Session;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use half::f16;

/// Storage type of cached keys and values, named as llama.cpp names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CacheType {
    F32,
    F16,
    Q8_0,
}

/// Values per q8_0 block and bytes per block (an f16 scale and 32 i8).
pub const Q8_0_BLOCK: usize = 32;
const Q8_0_BYTES: usize = 34;

impl CacheType {
    pub fn parse(s: &str) -> Result<CacheType> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => CacheType::F32,
            "f16" => CacheType::F16,
            "q8_0" => CacheType::Q8_0,
            other @ ("bf16" | "q4_0" | "q4_1" | "iq4_nl" | "q5_0" | "q5_1") => bail!(
                "KV cache type '{other}' is one of llama.cpp's that qwen-run does not store: use f32, f16 or q8_0"
            ),
            other => bail!("unknown KV cache type '{other}': expected f32, f16 or q8_0"),
        })
    }

    /// The element type of the storage (q8_0 is stored as bytes).
    pub fn dtype(self) -> DType {
        match self {
            CacheType::F32 => DType::F32,
            CacheType::F16 => DType::F16,
            CacheType::Q8_0 => DType::U8,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CacheType::F32 => "f32",
            CacheType::F16 => "f16",
            CacheType::Q8_0 => "q8_0",
        }
    }

    /// A stable number for file formats and hashes.
    pub fn id(self) -> u8 {
        match self {
            CacheType::F32 => 0,
            CacheType::F16 => 1,
            CacheType::Q8_0 => 2,
        }
    }

    pub fn from_id(id: u8) -> Option<CacheType> {
        Some(match id {
            0 => CacheType::F32,
            1 => CacheType::F16,
            2 => CacheType::Q8_0,
            _ => return None,
        })
    }

    /// Bytes that one head's `head_dim` values take.
    pub fn row_bytes(self, head_dim: usize) -> usize {
        match self {
            CacheType::F32 => head_dim * 4,
            CacheType::F16 => head_dim * 2,
            CacheType::Q8_0 => head_dim / Q8_0_BLOCK * Q8_0_BYTES,
        }
    }
}

/// One of a layer's two buffers (keys or values), `[kv_heads, capacity, head_dim]`.
enum Store {
    /// f32 in host memory, read and written in place by the host pass.
    Host(Vec<f32>),
    Tensor(Tensor),
    /// q8_0 rows, head-major: row `(h, pos)` starts at `(h * capacity + pos) * row_bytes`.
    Q8(Vec<u8>),
}

/// The KV of a token range, as host bytes: per layer the keys then the values, each laid out
/// `[kv_heads][tokens][row]` in the cache's storage types (little-endian).
#[derive(Clone, Debug, PartialEq)]
pub struct KvBlock {
    pub tokens: usize,
    pub type_k: CacheType,
    pub type_v: CacheType,
    pub layers: Vec<(Vec<u8>, Vec<u8>)>,
}

impl KvBlock {
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|(k, v)| k.len() + v.len()).sum()
    }
}

pub struct KvCache {
    layers: Vec<(Store, Store)>,
    len: usize,
    capacity: usize,
    kv_heads: usize,
    head_dim: usize,
    ty_k: CacheType,
    ty_v: CacheType,
}

impl KvCache {
    /// One layer per entry of `layer_devices`, each layer's buffers on its device (a model split
    /// between the CPU and a GPU keeps each layer's KV next to its weights).
    pub fn new(
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        ty_k: CacheType,
        ty_v: CacheType,
        layer_devices: &[Device],
    ) -> Result<KvCache> {
        let store = |ty: CacheType, device: &Device| -> Result<Store> {
            Ok(match ty {
                CacheType::Q8_0 => {
                    if !head_dim.is_multiple_of(Q8_0_BLOCK) {
                        bail!("a q8_0 KV cache needs a head size that is a multiple of {Q8_0_BLOCK}; this model's is {head_dim}: use f16 or f32");
                    }
                    Store::Q8(vec![0u8; kv_heads * capacity * ty.row_bytes(head_dim)])
                }
                CacheType::F32 if device.is_cpu() => {
                    Store::Host(vec![0f32; kv_heads * capacity * head_dim])
                }
                _ => Store::Tensor(Tensor::zeros(
                    (kv_heads, capacity, head_dim),
                    ty.dtype(),
                    device,
                )?),
            })
        };
        let layers = layer_devices
            .iter()
            .map(|d| Ok((store(ty_k, d)?, store(ty_v, d)?)))
            .collect::<Result<_>>()?;
        Ok(KvCache {
            layers,
            len: 0,
            capacity,
            kv_heads,
            head_dim,
            ty_k,
            ty_v,
        })
    }

    /// Tokens cached so far (the position the next token takes).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The storage type of the keys.
    pub fn cache_type(&self) -> CacheType {
        self.ty_k
    }

    pub fn cache_type_k(&self) -> CacheType {
        self.ty_k
    }

    pub fn cache_type_v(&self) -> CacheType {
        self.ty_v
    }

    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Bytes of KV storage per cached token, all layers.
    pub fn bytes_per_token(&self) -> usize {
        self.layers.len()
            * self.kv_heads
            * (self.ty_k.row_bytes(self.head_dim) + self.ty_v.row_bytes(self.head_dim))
    }

    /// Bytes allocated for the whole context.
    pub fn bytes(&self) -> usize {
        self.bytes_per_token() * self.capacity
    }

    /// Bytes holding the tokens cached now.
    pub fn used_bytes(&self) -> usize {
        self.bytes_per_token() * self.len
    }

    /// Forgets everything after the first `len` tokens (the rest is overwritten later).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Writes `k`, `v` (`[kv_heads, n, head_dim]`) of `layer` at position `len()` and returns
    /// views of all cached keys and values of that layer, the new ones included, as f32.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = k.dim(1)?;
        self.check_room(n)?;
        let (g, len) = (self.geometry(), self.len);
        let (ck, cv) = &mut self.layers[layer];
        Ok((
            ck.write_and_read(g, self.ty_k, len, k, n)?,
            cv.write_and_read(g, self.ty_v, len, v, n)?,
        ))
    }

    fn geometry(&self) -> Geometry {
        Geometry {
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            capacity: self.capacity,
        }
    }

    /// A layer's key and value buffers (`[kv_heads, capacity, head_dim]`), when both are f32 in
    /// host memory: the host pass reads and writes them in place.
    pub fn host_layer(&self, layer: usize) -> Option<(&[f32], &[f32])> {
        match &self.layers[layer] {
            (Store::Host(k), Store::Host(v)) => Some((k, v)),
            _ => None,
        }
    }

    /// Writes `k` and `v` (`[n, kv_heads, head_dim]`, the layout the projections produce) at
    /// positions `len()..len() + n` of a [`host_layer`](Self::host_layer).
    pub fn write_host(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<()> {
        let (heads, d, capacity, pos) = (self.kv_heads, self.head_dim, self.capacity, self.len);
        if k.len() != v.len() || !k.len().is_multiple_of(heads * d) {
            bail!(
                "KV cache write of {} keys and {} values, not whole rows of {}",
                k.len(),
                v.len(),
                heads * d
            );
        }
        self.check_room(k.len() / (heads * d))?;
        let (Store::Host(ck), Store::Host(cv)) = &mut self.layers[layer] else {
            bail!("layer {layer} of the KV cache is not f32 in host memory");
        };
        for (cache, src) in [(ck, k), (cv, v)] {
            for (i, token) in src.chunks_exact(heads * d).enumerate() {
                for (h, row) in token.chunks_exact(d).enumerate() {
                    let to = (h * capacity + pos + i) * d;
                    cache[to..to + d].copy_from_slice(row);
                }
            }
        }
        Ok(())
    }

    fn check_room(&self, n: usize) -> Result<()> {
        if self.len + n > self.capacity {
            bail!(
                "the context is full: {} tokens cached + {n} new > context size {}",
                self.len,
                self.capacity
            );
        }
        Ok(())
    }

    /// Marks `n` more tokens as cached, once every layer has appended them.
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Copies the KV of positions `start..start + n` out as host bytes.
    pub fn export(&self, start: usize, n: usize) -> Result<KvBlock> {
        if start + n > self.len {
            bail!(
                "cannot export positions {start}..{} of a cache holding {}",
                start + n,
                self.len
            );
        }
        let layers = self
            .layers
            .iter()
            .map(|(k, v)| {
                Ok((
                    k.export(self.geometry(), self.ty_k, start, n)?,
                    v.export(self.geometry(), self.ty_v, start, n)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(KvBlock {
            tokens: n,
            type_k: self.ty_k,
            type_v: self.ty_v,
            layers,
        })
    }

    /// Writes `block` at positions `start..start + block.tokens`; the cache then holds
    /// `start + block.tokens` tokens. Positions before `start` must already be valid.
    pub fn import(&mut self, start: usize, block: &KvBlock) -> Result<()> {
        let n = block.tokens;
        if start > self.len {
            bail!(
                "cannot import at position {start}: the cache holds only {}",
                self.len
            );
        }
        if start + n > self.capacity {
            bail!(
                "cannot import {n} tokens at position {start}: the context holds {}",
                self.capacity
            );
        }
        if block.type_k != self.ty_k || block.type_v != self.ty_v {
            bail!(
                "cached KV of type {}/{} does not fit a {}/{} cache",
                block.type_k.name(),
                block.type_v.name(),
                self.ty_k.name(),
                self.ty_v.name()
            );
        }
        if block.layers.len() != self.layers.len() {
            bail!(
                "cached KV has {} layers, the model {}",
                block.layers.len(),
                self.layers.len()
            );
        }
        let g = self.geometry();
        for ((k, v), (bk, bv)) in self.layers.iter_mut().zip(&block.layers) {
            k.import(g, self.ty_k, start, n, bk)?;
            v.import(g, self.ty_v, start, n, bv)?;
        }
        self.len = start + n;
        Ok(())
    }
}

/// Where the rows of a [`Store`] sit: row `(h, pos)` is row `h * capacity + pos`.
#[derive(Clone, Copy)]
struct Geometry {
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
}

impl Store {
    /// Writes `x` (`[kv_heads, n, head_dim]`) at position `len` and returns the first `len + n`
    /// positions as f32.
    fn write_and_read(
        &mut self,
        g: Geometry,
        ty: CacheType,
        len: usize,
        x: &Tensor,
        n: usize,
    ) -> Result<Tensor> {
        let total = len + n;
        let (heads, hd) = (g.kv_heads, g.head_dim);
        match self {
            Store::Host(data) => {
                // The tensor pass attends over a copy of the rows it needs. It meets host
                // caches in the CPU layers of a model split with a GPU, with an f32 cache
                // beside an f16/q8_0 one, and in the tests that check the host pass against it.
                let values = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let mut out = Vec::with_capacity(heads * total * hd);
                for h in 0..heads {
                    let rows = &mut data[h * g.capacity * hd..][..total * hd];
                    rows[len * hd..].copy_from_slice(&values[h * n * hd..][..n * hd]);
                    out.extend_from_slice(rows);
                }
                Ok(Tensor::from_vec(out, (heads, total, hd), x.device())?)
            }
            Store::Tensor(t) => {
                t.slice_set(&x.to_dtype(ty.dtype())?, 1, len)?;
                Ok(t.narrow(1, 0, total)?.to_dtype(DType::F32)?)
            }
            Store::Q8(data) => {
                let (hd, rb) = (g.head_dim, ty.row_bytes(g.head_dim));
                let values = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let mut out = vec![0f32; g.kv_heads * total * hd];
                for h in 0..g.kv_heads {
                    for i in 0..n {
                        let at = (h * g.capacity + len + i) * rb;
                        let src = &values[(h * n + i) * hd..][..hd];
                        quantize_q8_0(src, &mut data[at..at + rb]);
                    }
                    let rows = &data[h * g.capacity * rb..][..total * rb];
                    dequantize_q8_0(rows, &mut out[h * total * hd..][..total * hd]);
                }
                Ok(Tensor::from_vec(out, (g.kv_heads, total, hd), x.device())?)
            }
        }
    }

    fn export(&self, g: Geometry, ty: CacheType, start: usize, n: usize) -> Result<Vec<u8>> {
        Ok(match self {
            Store::Host(data) => {
                let d = g.head_dim;
                let mut out = Vec::with_capacity(g.kv_heads * n * d * 4);
                for h in 0..g.kv_heads {
                    out.extend(f32_to_bytes(&data[(h * g.capacity + start) * d..][..n * d]));
                }
                out
            }
            Store::Tensor(t) => {
                let flat = t.narrow(1, start, n)?.contiguous()?.flatten_all()?;
                match ty {
                    CacheType::F32 => f32_to_bytes(&flat.to_vec1::<f32>()?),
                    _ => f16_to_bytes(&flat.to_vec1::<f16>()?),
                }
            }
            Store::Q8(data) => {
                let rb = ty.row_bytes(g.head_dim);
                let mut out = Vec::with_capacity(g.kv_heads * n * rb);
                for h in 0..g.kv_heads {
                    out.extend_from_slice(&data[(h * g.capacity + start) * rb..][..n * rb]);
                }
                out
            }
        })
    }

    fn import(
        &mut self,
        g: Geometry,
        ty: CacheType,
        start: usize,
        n: usize,
        bytes: &[u8],
    ) -> Result<()> {
        let rb = ty.row_bytes(g.head_dim);
        if bytes.len() != g.kv_heads * n * rb {
            bail!(
                "cached KV holds {} bytes per layer, expected {}",
                bytes.len(),
                g.kv_heads * n * rb
            );
        }
        let shape = (g.kv_heads, n, g.head_dim);
        match self {
            Store::Host(data) => {
                let d = g.head_dim;
                for h in 0..g.kv_heads {
                    data[(h * g.capacity + start) * d..][..n * d]
                        .copy_from_slice(&bytes_to_f32(&bytes[h * n * d * 4..][..n * d * 4]));
                }
            }
            Store::Tensor(t) => {
                let src = match ty {
                    CacheType::F32 => Tensor::from_vec(bytes_to_f32(bytes), shape, t.device())?,
                    _ => Tensor::from_vec(bytes_to_f16(bytes), shape, t.device())?,
                };
                t.slice_set(&src, 1, start)?;
            }
            Store::Q8(data) => {
                for h in 0..g.kv_heads {
                    data[(h * g.capacity + start) * rb..][..n * rb]
                        .copy_from_slice(&bytes[h * n * rb..][..n * rb]);
                }
            }
        }
        Ok(())
    }
}

/// Quantizes `x` (a multiple of 32 values) into q8_0 blocks, as llama.cpp's reference does.
pub fn quantize_q8_0(x: &[f32], out: &mut [u8]) {
    for (src, dst) in x
        .chunks_exact(Q8_0_BLOCK)
        .zip(out.chunks_exact_mut(Q8_0_BYTES))
    {
        let amax = src.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        dst[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        for (q, &v) in dst[2..].iter_mut().zip(src) {
            *q = ((v * id).round() as i8) as u8;
        }
    }
}

pub fn dequantize_q8_0(blocks: &[u8], out: &mut [f32]) {
    for (src, dst) in blocks
        .chunks_exact(Q8_0_BYTES)
        .zip(out.chunks_exact_mut(Q8_0_BLOCK))
    {
        let d = f16::from_le_bytes([src[0], src[1]]).to_f32();
        for (o, &q) in dst.iter_mut().zip(&src[2..]) {
            *o = d * (q as i8) as f32;
        }
    }
}

fn f32_to_bytes(v: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; v.len() * 4];
    for (o, x) in out.chunks_exact_mut(4).zip(v) {
        o.copy_from_slice(&x.to_le_bytes());
    }
    out
}

fn f16_to_bytes(v: &[f16]) -> Vec<u8> {
    let mut out = vec![0u8; v.len() * 2];
    for (o, x) in out.chunks_exact_mut(2).zip(v) {
        o.copy_from_slice(&x.to_le_bytes());
    }
    out
}

fn bytes_to_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn bytes_to_f16(b: &[u8]) -> Vec<f16> {
    b.chunks_exact(2)
        .map(|c| f16::from_le_bytes([c[0], c[1]]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_round_trip_is_close() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let mut q = vec![0u8; 2 * Q8_0_BYTES];
        quantize_q8_0(&x, &mut q);
        let mut y = vec![0f32; 64];
        dequantize_q8_0(&q, &mut y);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 3.0 / 127.0, "{a} vs {b}");
        }
    }

    #[test]
    fn export_import_round_trips_every_type() {
        for (tk, tv) in [
            (CacheType::F32, CacheType::F32),
            (CacheType::F16, CacheType::Q8_0),
            (CacheType::Q8_0, CacheType::F32),
        ] {
            let mut a = KvCache::new(2, 64, 16, tk, tv, &[Device::Cpu, Device::Cpu]).unwrap();
            let k = Tensor::randn(0f32, 1.0, (2, 5, 64), &Device::Cpu).unwrap();
            let v = Tensor::randn(0f32, 1.0, (2, 5, 64), &Device::Cpu).unwrap();
            let mut want = Vec::new();
            for l in 0..2 {
                want.push(a.append(l, &k, &v).unwrap());
            }
            a.advance(5);
            let head = a.export(0, 2).unwrap();
            let tail = a.export(2, 3).unwrap();
            assert_eq!(head.bytes(), 2 * a.bytes_per_token());
            let mut b = KvCache::new(2, 64, 16, tk, tv, &[Device::Cpu, Device::Cpu]).unwrap();
            b.import(0, &head).unwrap();
            b.import(2, &tail).unwrap();
            assert_eq!(b.len(), 5);
            assert_eq!(b.export(0, 5).unwrap(), a.export(0, 5).unwrap());
        }
    }
}
