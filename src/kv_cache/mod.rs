//! The attention KV cache: one preallocated buffer per layer for the whole context, written in
//! place as tokens arrive. Nothing is concatenated per token.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

/// Storage type of cached keys and values, named as llama.cpp names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheType {
    F32,
    F16,
}

impl CacheType {
    pub fn parse(s: &str) -> Result<CacheType> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => CacheType::F32,
            "f16" => CacheType::F16,
            other => bail!("unknown KV cache type '{other}': expected f32 or f16"),
        })
    }

    pub fn dtype(self) -> DType {
        match self {
            CacheType::F32 => DType::F32,
            CacheType::F16 => DType::F16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CacheType::F32 => "f32",
            CacheType::F16 => "f16",
        }
    }
}

pub struct KvCache {
    /// Per layer: keys and values, each `[kv_heads, capacity, head_dim]`.
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
    capacity: usize,
    ty: CacheType,
}

impl KvCache {
    pub fn new(
        n_layers: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        ty: CacheType,
        device: &Device,
    ) -> Result<KvCache> {
        let layers = (0..n_layers)
            .map(|_| {
                let k = Tensor::zeros((kv_heads, capacity, head_dim), ty.dtype(), device)?;
                let v = Tensor::zeros((kv_heads, capacity, head_dim), ty.dtype(), device)?;
                Ok((k, v))
            })
            .collect::<Result<_>>()?;
        Ok(KvCache {
            layers,
            len: 0,
            capacity,
            ty,
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

    pub fn cache_type(&self) -> CacheType {
        self.ty
    }

    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * self.ty.dtype().size_in_bytes())
            .sum()
    }

    /// Forgets everything after the first `len` tokens (the rest is overwritten later).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Writes `k`, `v` (`[kv_heads, n, head_dim]`) of `layer` at position `len()` and returns
    /// views of all cached keys and values of that layer, the new ones included, as f32.
    pub fn append(&self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = k.dim(1)?;
        if self.len + n > self.capacity {
            bail!(
                "the context is full: {} tokens cached + {n} new > context size {}",
                self.len,
                self.capacity
            );
        }
        let (ck, cv) = &self.layers[layer];
        ck.slice_set(&k.to_dtype(self.ty.dtype())?, 1, self.len)?;
        cv.slice_set(&v.to_dtype(self.ty.dtype())?, 1, self.len)?;
        let total = self.len + n;
        let k = ck.narrow(1, 0, total)?.to_dtype(DType::F32)?;
        let v = cv.narrow(1, 0, total)?.to_dtype(DType::F32)?;
        Ok((k, v))
    }

    /// Marks `n` more tokens as cached, once every layer has appended them.
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }
}
