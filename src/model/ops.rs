//! Small ops of the forward pass that have a CPU kernel of ours; other devices use Candle's.

use anyhow::Result;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

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
        let (CpuStorage::F32(g), CpuStorage::F32(u)) = (s1, s2) else {
            candle_core::bail!("silu-mul expects f32 tensors");
        };
        let (Some((g0, g1)), Some((u0, u1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("silu-mul expects contiguous tensors");
        };
        if l1.shape() != l2.shape() {
            candle_core::bail!(
                "silu-mul: shapes {:?} and {:?} differ",
                l1.shape(),
                l2.shape()
            );
        }
        let mut out = vec![0f32; g1 - g0];
        qwen_run_kernels::elementwise::silu_mul(&g[g0..g1], &u[u0..u1], &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}
