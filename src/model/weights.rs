//! Weights as the model uses them: quantized matrices that stay quantized, and small float tensors.

use super::weight_arena::{WeightArena, WeightBuf};
use super::weight_cache::MappedWeights;
use crate::gguf::{GgufFile, TensorInfo};
use anyhow::{bail, Context, Result};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use qwen_run_kernels::{Packing, QuantType};
use rayon::prelude::*;
use smallvec::SmallVec;
use std::sync::Arc;

/// A `rows x cols` weight matrix in its GGUF block format, read in place from the mapping, or,
/// for the CPU kernels, copied once into the layout they read fastest
/// ([`QMatrix::repack_for_cpu`]).
pub struct QMatrix {
    file: Arc<GgufFile>,
    info: TensorInfo,
    pub rows: usize,
    pub cols: usize,
    /// The rows4 copy ([`Packing::Rows4`]), when the CPU kernels read that layout faster.
    repacked: Option<Repacked>,
}

/// Where a matrix's rows4 copy lives.
enum Repacked {
    /// Made by this load.
    Copied(WeightBuf),
    /// Made by an earlier one, in a mapped weight cache file.
    Mapped(MappedWeights),
}

impl std::ops::Deref for Repacked {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Repacked::Copied(b) => b,
            Repacked::Mapped(m) => m,
        }
    }
}

impl QMatrix {
    pub fn load(file: &Arc<GgufFile>, name: &str) -> Result<QMatrix> {
        let info = file.require_tensor(name)?.clone();
        let (cols, rows) = match info.dims[..] {
            [c] => (c, 1),
            [c, r] => (c, r),
            _ => bail!(
                "tensor '{name}' has dimensions {:?}, expected a matrix",
                info.dims
            ),
        };
        Ok(QMatrix {
            file: file.clone(),
            info,
            rows,
            cols,
            repacked: None,
        })
    }

    /// Copies the weights into the layout the CPU kernels read fastest on this machine, if that
    /// is not the GGUF one, in 1 MiB parts over the worker threads, giving each part of the
    /// mapping back to the system once copied: the process holds one copy of the weights, not
    /// two, even at its peak. The copy lives in `arena`, or is the one `arena`'s weight cache
    /// file holds.
    pub fn repack_for_cpu(&mut self, arena: &WeightArena) -> Result<()> {
        let (ty, rows, cols) = (self.ty(), self.rows, self.cols);
        if qwen_run_kernels::best_packing(ty, rows) != Packing::Rows4 {
            return Ok(());
        }
        if let Some(mapped) = arena.cached(self.name(), ty, rows, cols) {
            self.repacked = Some(Repacked::Mapped(mapped));
            return Ok(());
        }
        let rb = self.row_bytes();
        let prb = qwen_run_kernels::rows4_row_bytes(ty, cols).context("rows4 row size")?;
        let data = self.file.tensor_data(&self.info);
        let mut out = arena.alloc(rows * prb)?;
        // 1 MiB parts, spread over the worker threads (a layer's smaller matrices are a few MiB).
        let groups = (1usize << 20).div_ceil(4 * rb);
        let (step, out_step) = (groups * 4 * rb, groups * 4 * prb);
        data.par_chunks(step)
            .zip(out.par_chunks_mut(out_step))
            .enumerate()
            .try_for_each(|(i, (src, dst))| {
                qwen_run_kernels::repack_rows4_into(ty, src.len() / rb, cols, src, dst)
                    .context("rows4 repacking refused a supported shape")?;
                self.file.release(&self.info, i * step..(i + 1) * step);
                anyhow::Ok(())
            })?;
        self.repacked = Some(Repacked::Copied(out));
        Ok(())
    }

    /// The rows4 copy, if the kernels read one, and whether this load made it (rather than
    /// finding it in the weight cache).
    pub fn rows4_copy(&self) -> Option<(&[u8], bool)> {
        let made_here = matches!(self.repacked, Some(Repacked::Copied(_)));
        self.repacked.as_deref().map(|b| (b, made_here))
    }

    /// The weights as the kernels get them: their layout and bytes.
    fn kernel_weights(&self) -> (Packing, &[u8]) {
        match &self.repacked {
            Some(w) => (Packing::Rows4, &w[..]),
            None => (Packing::Gguf, self.data()),
        }
    }

    pub fn ty(&self) -> QuantType {
        self.info.ty
    }

    pub fn name(&self) -> &str {
        &self.info.name
    }

    pub fn data(&self) -> &[u8] {
        self.file.tensor_data(&self.info)
    }

    pub fn row_bytes(&self) -> usize {
        self.info.size / self.rows
    }

    /// Row `r` as f32 (embedding lookups).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let rb = self.row_bytes();
        qwen_run_kernels::dequantize(self.ty(), &self.data()[r * rb..(r + 1) * rb], out);
    }

    pub fn dequantize_all(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        qwen_run_kernels::dequantize(self.ty(), self.data(), &mut out);
        out
    }

    fn to_candle(&self, device: &Device) -> Result<candle_core::quantized::QMatMul> {
        use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QMatMul};
        let dtype = match self.ty() {
            QuantType::F32 => GgmlDType::F32,
            QuantType::F16 => GgmlDType::F16,
            QuantType::BF16 => GgmlDType::BF16,
            QuantType::Q4_0 => GgmlDType::Q4_0,
            QuantType::Q4_1 => GgmlDType::Q4_1,
            QuantType::Q5_0 => GgmlDType::Q5_0,
            QuantType::Q5_1 => GgmlDType::Q5_1,
            QuantType::Q8_0 => GgmlDType::Q8_0,
            QuantType::Q2K => GgmlDType::Q2K,
            QuantType::Q3K => GgmlDType::Q3K,
            QuantType::Q4K => GgmlDType::Q4K,
            QuantType::Q5K => GgmlDType::Q5K,
            QuantType::Q6K => GgmlDType::Q6K,
            QuantType::Q8K => GgmlDType::Q8K,
            // Candle has no i-quants: the device holds the values, as f16 (exact for IQ4_NL,
            // within an f16 rounding of each value for the others)
            QuantType::IQ4NL
            | QuantType::IQ4XS
            | QuantType::IQ2XXS
            | QuantType::IQ2XS
            | QuantType::IQ2S
            | QuantType::IQ3XXS
            | QuantType::IQ3S
            | QuantType::IQ1S
            | QuantType::IQ1M => {
                let f16: Vec<u8> = self
                    .dequantize_all()
                    .into_iter()
                    .flat_map(|v| half::f16::from_f32(v).to_le_bytes())
                    .collect();
                let q =
                    qtensor_from_ggml(GgmlDType::F16, &f16, vec![self.rows, self.cols], device)?;
                return Ok(QMatMul::from_qtensor(q)?);
            }
        };
        let q = qtensor_from_ggml(dtype, self.data(), vec![self.rows, self.cols], device)?;
        Ok(QMatMul::from_qtensor(q)?)
    }
}

/// A bias in host memory, for the CPU kernels to add.
type HostBias = Option<Arc<Vec<f32>>>;

/// `y = x W^T + b`, with W quantized. On the CPU our own kernels read W straight from the
/// mapping (or from their repacked copy) and add the bias as they write `y`; on other devices
/// Candle's quantized matmul holds a device copy.
pub enum Linear {
    Native {
        w: Arc<QMatrix>,
        bias: HostBias,
    },
    Candle {
        w: candle_core::quantized::QMatMul,
        bias: Option<Tensor>,
    },
}

impl Linear {
    /// Tokens per step up to which this matrix gives each token the bits a one-token step
    /// gives (see [`qwen_run_kernels::batch_invariant_tokens`]); 1 on other devices, where that
    /// is not checked.
    pub fn batch_invariant_tokens(&self) -> usize {
        match self {
            Linear::Native { w, .. } => {
                let (packing, _) = w.kernel_weights();
                qwen_run_kernels::batch_invariant_tokens(w.ty(), packing)
            }
            Linear::Candle { .. } => 1,
        }
    }

    pub fn load(
        file: &Arc<GgufFile>,
        name: &str,
        bias: Option<&str>,
        device: &Device,
        arena: &WeightArena,
    ) -> Result<Linear> {
        let w = QMatrix::load(file, name)?;
        let bias = bias.map(|b| load_vector(file, b, device)).transpose()?;
        if let Some(b) = &bias {
            if b.dims1()? != w.rows {
                bail!(
                    "bias of '{name}' has {} elements, expected {}",
                    b.dims1()?,
                    w.rows
                );
            }
        }
        Ok(match device {
            Device::Cpu => {
                let mut w = w;
                w.repack_for_cpu(arena)?;
                Linear::Native {
                    w: Arc::new(w),
                    bias: bias.map(|b| b.to_vec1::<f32>().map(Arc::new)).transpose()?,
                }
            }
            _ => Linear::Candle {
                w: w.to_candle(device)?,
                bias,
            },
        })
    }

    /// The matrix and bias our CPU kernels read, when this projection runs on them.
    pub(super) fn native(&self) -> Option<(&QMatrix, Option<&[f32]>)> {
        match self {
            Linear::Native { w, bias } => Some((w, bias.as_ref().map(|b| b.as_slice()))),
            Linear::Candle { .. } => None,
        }
    }

    /// `x`: `[n, cols]` f32 -> `[n, rows]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [y] = Linear::forward_many([self], x)?;
        Ok(y)
    }

    /// Several projections of the same input (q, k and v; gate and up). On the CPU they run as
    /// one kernel call ([`qwen_run_kernels::matmul_many`]): one activation quantization and one
    /// parallel region for all of them.
    pub fn forward_many<const N: usize>(linears: [&Linear; N], x: &Tensor) -> Result<[Tensor; N]> {
        let native: Option<Vec<_>> = linears
            .iter()
            .map(|l| match l {
                Linear::Native { w, bias } => Some((w.clone(), bias.clone())),
                Linear::Candle { .. } => None,
            })
            .collect();
        let ys: Vec<Tensor> = match native {
            Some(ws) => {
                let n = x.dim(0)?;
                let rows: Vec<usize> = ws.iter().map(|(w, _)| w.rows).collect();
                // One flat output, matrix after matrix: each part is a contiguous view.
                let flat = x.contiguous()?.apply_op1_no_bwd(&NativeMatMul(ws))?;
                let mut at = 0;
                rows.iter()
                    .map(|&r| {
                        let y = flat.narrow(0, at, n * r)?.reshape((n, r))?;
                        at += n * r;
                        Ok(y)
                    })
                    .collect::<Result<_>>()?
            }
            None => linears
                .iter()
                .map(|l| match l {
                    Linear::Native { .. } => bail!("mixed CPU and GPU projections"),
                    Linear::Candle { w, bias: None } => Ok(x.apply(w)?),
                    Linear::Candle { w, bias: Some(b) } => Ok(x.apply(w)?.broadcast_add(b)?),
                })
                .collect::<Result<_>>()?,
        };
        ys.try_into()
            .map_err(|_| anyhow::anyhow!("forward_many: wrong number of outputs"))
    }
}

/// Our CPU kernels over weight matrices (and their biases) that share the input; the output is
/// flat, each matrix's `[n, rows]` block after the previous one's.
struct NativeMatMul(Vec<(Arc<QMatrix>, HostBias)>);

impl CustomOp1 for NativeMatMul {
    fn name(&self) -> &'static str {
        "qwen-run-qmatmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = match storage {
            CpuStorage::F32(x) => x,
            _ => candle_core::bail!("qmatmul expects f32 activations"),
        };
        let (n, k) = layout.shape().dims2()?;
        for (w, _) in &self.0 {
            if k != w.cols {
                candle_core::bail!(
                    "qmatmul: input has {k} columns, weight '{}' has {}",
                    w.name(),
                    w.cols
                );
            }
        }
        let x = match layout.contiguous_offsets() {
            Some((a, b)) => &x[a..b],
            None => candle_core::bail!("qmatmul expects a contiguous input"),
        };
        let total: usize = self.0.iter().map(|(w, _)| n * w.rows).sum();
        let mut y = vec![0f32; total];
        let mut rest = y.as_mut_slice();
        let parts = self.0.iter().map(|(w, bias)| {
            let (part, tail) = std::mem::take(&mut rest).split_at_mut(n * w.rows);
            rest = tail;
            (&**w, bias.as_ref().map(|b| b.as_slice()), part)
        });
        native_matmul(parts, x, n);
        Ok((CpuStorage::F32(y), Shape::from(total)))
    }
}

/// A weight matrix, its bias and the output they are written to.
pub(super) type MatMulPart<'a> = (&'a QMatrix, Option<&'a [f32]>, &'a mut [f32]);

/// `y = x W^T + b` (`[n, rows]`) for each `(W, b, y)` of `parts`, all sharing the input `x`
/// (`[n, cols]`, checked by the caller), on our CPU kernels: the input is quantized once and
/// all matrices share one parallel region; the bias is added as `y` is written. Allocates
/// nothing (a call has a few matrices).
pub(super) fn native_matmul<'a>(
    parts: impl IntoIterator<Item = MatMulPart<'a>>,
    x: &[f32],
    n: usize,
) {
    let mut jobs: SmallVec<[qwen_run_kernels::MatMulJob; 4]> = SmallVec::new();
    let mut biases: SmallVec<[Option<&[f32]>; 4]> = SmallVec::new();
    let mut cols = 0;
    for (w, bias, y) in parts {
        let (packing, data) = w.kernel_weights();
        cols = w.cols;
        jobs.push(qwen_run_kernels::MatMulJob {
            ty: w.ty(),
            packing,
            w: data,
            rows: w.rows,
            y,
        });
        biases.push(bias);
    }
    qwen_run_kernels::matmul_many(cols, x, n, &mut jobs);
    for (job, bias) in jobs.iter_mut().zip(biases) {
        if let Some(b) = bias {
            for row in job.y.chunks_exact_mut(b.len()) {
                row.iter_mut().zip(b).for_each(|(y, b)| *y += b);
            }
        }
    }
}

/// A 1-D float tensor (norm weights, biases) as f32 on the device.
pub fn load_vector(file: &Arc<GgufFile>, name: &str, device: &Device) -> Result<Tensor> {
    let m = QMatrix::load(file, name)?;
    let v = m.dequantize_all();
    Ok(Tensor::from_vec(v, m.rows * m.cols, device)?.to_dtype(DType::F32)?)
}

/// The token embedding table: rows are dequantized on lookup, so the table stays quantized.
pub struct Embedding {
    table: QMatrix,
}

impl Embedding {
    pub fn load(file: &Arc<GgufFile>, name: &str) -> Result<Embedding> {
        Ok(Embedding {
            table: QMatrix::load(file, name)?,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.table.rows
    }

    pub fn forward(&self, tokens: &[u32], device: &Device) -> Result<Tensor> {
        let mut out = vec![0f32; tokens.len() * self.table.cols];
        self.lookup_into(tokens, &mut out)?;
        Ok(Tensor::from_vec(
            out,
            (tokens.len(), self.table.cols),
            device,
        )?)
    }

    /// The rows of `tokens`, as f32, into `out` (`[tokens, dim]`).
    pub fn lookup_into(&self, tokens: &[u32], out: &mut [f32]) -> Result<()> {
        for (row, &t) in out.chunks_exact_mut(self.table.cols).zip(tokens) {
            if t as usize >= self.table.rows {
                bail!(
                    "token id {t} is outside the vocabulary of {} tokens",
                    self.table.rows
                );
            }
            self.table.dequantize_row(t as usize, row);
        }
        Ok(())
    }

    /// Tied output heads reuse the embedding table as a matrix.
    pub fn as_linear(&self, device: &Device, arena: &WeightArena) -> Result<Linear> {
        let file = self.table.file.clone();
        Linear::load(&file, &self.table.info.name, None, device, arena)
    }
}
