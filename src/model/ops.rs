//! Small ops of the forward pass that have a CPU kernel of ours; other devices use Candle's.

use anyhow::Result;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

/// RMSNorm of each row of `x` (`[n, d]`), scaled by `weight` (`[d]`). On the CPU our kernel:
/// Candle's op goes through a parallel iterator even for the one row of a decode step, which
/// cost several microseconds a call, twice per layer.
pub(super) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    if x.device().is_cpu() {
        Ok(x.contiguous()?
            .apply_op2_no_bwd(&weight.contiguous()?, &RmsNorm { eps })?)
    } else {
        Ok(candle_nn::ops::rms_norm(x, weight, eps)?)
    }
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "qwen-run-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = two_f32(self.name(), s1, l1, s2, l2)?;
        let d = w.len();
        if d == 0 || l1.dims().last() != Some(&d) {
            candle_core::bail!("rms-norm: input {:?}, weight of {d} elements", l1.shape());
        }
        let mut out = vec![0f32; x.len()];
        qwen_run_kernels::elementwise::rms_norm(x, w, self.eps, &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `silu(gate) * up`, the SwiGLU gate of the MLP.
pub(super) fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.device().is_cpu() {
        Ok(gate
            .contiguous()?
            .apply_op2_no_bwd(&up.contiguous()?, &SiluMul)?)
    } else {
        Ok((candle_nn::ops::silu(gate)? * up)?)
    }
}

struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "qwen-run-silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, u) = two_f32(self.name(), s1, l1, s2, l2)?;
        if l1.shape() != l2.shape() {
            candle_core::bail!(
                "silu-mul: shapes {:?} and {:?} differ",
                l1.shape(),
                l2.shape()
            );
        }
        let mut out = vec![0f32; g.len()];
        qwen_run_kernels::elementwise::silu_mul(g, u, &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// The two inputs of an op as contiguous f32 slices.
fn two_f32<'a>(
    op: &str,
    s1: &'a CpuStorage,
    l1: &Layout,
    s2: &'a CpuStorage,
    l2: &Layout,
) -> candle_core::Result<(&'a [f32], &'a [f32])> {
    let (CpuStorage::F32(a), CpuStorage::F32(b)) = (s1, s2) else {
        candle_core::bail!("{op} expects f32 tensors");
    };
    let (Some((a0, a1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
    else {
        candle_core::bail!("{op} expects contiguous tensors");
    };
    Ok((&a[a0..a1], &b[b0..b1]))
}
