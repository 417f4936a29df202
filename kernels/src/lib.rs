//! Quantized GGML block formats and matrix-multiply kernels for qwen-run.
//!
//! The public entry point is [`matmul`]: `rows x cols` quantized weights (raw GGUF
//! bytes) times `n_tokens` f32 activation vectors. Activations are quantized once
//! per call (Q8 blocks of 32 for the 32-element formats, Q8_K blocks of 256 for
//! the K-quants) and then combined with the weights using integer dot products.
//! The feature level is chosen at run time ([`Backend`]: AVX-512 VNNI, AVX2+FMA, or the
//! portable scalar path that computes the same thing and serves as the test reference);
//! [`KERNELS_ENV`] forces one. The two x86 levels run the same kernels and give the same bits.

pub mod attention;
mod dequant;
mod driver;
pub mod elementwise;
mod f32_gemm;
mod iquant_grids;
mod layout;
pub mod pool;
mod repack;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use driver::{repack_rows4, repack_rows4_into, MatMulJob};
pub use layout::{
    has_rows4, rows4_row_bytes, set_iquant_d, stored_row_bytes, BlockQ8, BlockQ8K, Packing,
    QuantType, IQ4NL_VALUES,
};

/// Scalar reference dequantization of `out.len()` elements.
///
/// `data.len()` must equal `ty.row_bytes(out.len())`; panics otherwise.
pub fn dequantize(ty: QuantType, data: &[u8], out: &mut [f32]) {
    let rb = ty.row_bytes(out.len()).unwrap_or_else(|| {
        panic!(
            "dequantize {}: {} elements not a multiple of the block size",
            ty,
            out.len()
        )
    });
    assert_eq!(data.len(), rb, "dequantize {}: data length mismatch", ty);
    dequant::dequantize(ty, data, out);
}

/// Which implementation [`matmul_with`] should use: a feature level of the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// Portable scalar code (the reference).
    Scalar,
    /// AVX2 + FMA + F16C (x86_64 only; requires those features at run time).
    Avx2,
    /// The AVX2 kernels with AVX-VNNI integer products (the VEX-encoded 256-bit `vpdpbusd`,
    /// `vpdpwssd` of Intel's Alder Lake and later and AMD's Zen 5): requires AVX-VNNI besides
    /// AVX2 + FMA + F16C. Same results as [`Backend::Avx2`], bit for bit.
    AvxVnni,
    /// The AVX2 kernels with AVX-512 VNNI integer products (`vpdpbusd`, `vpdpwssd`):
    /// requires AVX-512 F, BW, VL and VNNI besides AVX2 + FMA + F16C. Same results as
    /// [`Backend::Avx2`], bit for bit.
    Avx512,
}

/// The environment variable that forces a [`Backend`] (`scalar`, `avx2`, `avxvnni`, `avx512`), for tests
/// and A/B runs.
pub const KERNELS_ENV: &str = "QWEN_RUN_KERNELS";

impl Backend {
    /// Every backend, slowest first.
    pub const ALL: [Backend; 4] = [
        Backend::Scalar,
        Backend::Avx2,
        Backend::AvxVnni,
        Backend::Avx512,
    ];

    /// The name [`KERNELS_ENV`] takes.
    pub fn env_name(self) -> &'static str {
        match self {
            Backend::Scalar => "scalar",
            Backend::Avx2 => "avx2",
            Backend::AvxVnni => "avxvnni",
            Backend::Avx512 => "avx512",
        }
    }

    /// The fastest backend this machine runs.
    pub fn best() -> Backend {
        *Backend::ALL
            .iter()
            .rev()
            .find(|b| b.is_available())
            .expect("the scalar backend always runs")
    }

    /// The backend [`KERNELS_ENV`] asks for, or [`Backend::best`] when it is unset or empty;
    /// an error names the value and what this machine offers when the value is unknown or
    /// the CPU lacks that level. Front ends check this once at start-up.
    pub fn configured() -> Result<Backend, String> {
        let Ok(v) = std::env::var(KERNELS_ENV) else {
            return Ok(Backend::best());
        };
        let v = v.trim().to_ascii_lowercase();
        if v.is_empty() {
            return Ok(Backend::best());
        }
        let offered = || {
            Backend::ALL
                .iter()
                .filter(|b| b.is_available())
                .map(|b| b.env_name())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match Backend::ALL.iter().find(|b| b.env_name() == v) {
            Some(b) if b.is_available() => Ok(*b),
            Some(b) => Err(format!(
                "{KERNELS_ENV}={v}: this CPU lacks {}; it runs: {}",
                b.requirements(),
                offered()
            )),
            None => Err(format!(
                "{KERNELS_ENV}={v} is not a kernel level; use one of: {} (this CPU runs: {})",
                Backend::ALL.map(|b| b.env_name()).join(", "),
                offered()
            )),
        }
    }

    /// The backend the kernels use: [`Backend::configured`], or [`Backend::best`] when that
    /// is an error (detected once, cached).
    pub fn detect() -> Backend {
        use std::sync::OnceLock;
        static B: OnceLock<Backend> = OnceLock::new();
        *B.get_or_init(|| Backend::configured().unwrap_or_else(|_| Backend::best()))
    }

    /// The CPU features this backend needs, as /proc/cpuinfo names them.
    pub fn requirements(self) -> &'static str {
        match self {
            Backend::Scalar => "nothing",
            Backend::Avx2 => "avx2, fma, f16c",
            Backend::AvxVnni => "avx2, fma, f16c, avx_vnni",
            Backend::Avx512 => "avx2, fma, f16c, avx512f, avx512bw, avx512vl, avx512_vnni",
        }
    }

    /// Whether this backend can run on the current machine.
    pub fn is_available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = || {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            };
            match self {
                Backend::Scalar => true,
                Backend::Avx2 => avx2(),
                Backend::AvxVnni => avx2() && is_x86_feature_detected!("avxvnni"),
                Backend::Avx512 => {
                    avx2()
                        && is_x86_feature_detected!("avx512f")
                        && is_x86_feature_detected!("avx512bw")
                        && is_x86_feature_detected!("avx512vl")
                        && is_x86_feature_detected!("avx512vnni")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Backend::Scalar
        }
    }

    /// Whether this backend runs the x86 SIMD kernels (AVX2 and above).
    pub fn is_simd(self) -> bool {
        self != Backend::Scalar
    }

    /// The name reports print ("AVX2+FMA", "AVX-512 VNNI", "scalar").
    pub fn name(self) -> &'static str {
        match self {
            Backend::Scalar => "scalar",
            Backend::Avx2 => "AVX2+FMA",
            Backend::AvxVnni => "AVX-VNNI",
            Backend::Avx512 => "AVX-512 VNNI",
        }
    }
}

/// The weight layout the kernels read fastest, on this machine, for `rows` rows of `ty`:
/// [`Packing::Rows4`] where the type has it and the SIMD kernels run, otherwise the GGUF one.
pub fn best_packing(ty: QuantType, rows: usize) -> Packing {
    if Backend::detect().is_simd() && has_rows4(ty) && rows.is_multiple_of(4) {
        Packing::Rows4
    } else {
        Packing::Gguf
    }
}

/// Tokens per call up to which [`matmul_many`] gives each token of a `ty` matrix in `packing`
/// the bits a call with that token alone gives (`usize::MAX`: any number): the rows4 kernels
/// (IQ4_NL and IQ4_XS included), the Q2_K and Q3_K kernels, the grid i-quants' kernel and the
/// scalar reference (which IQ4 matrices outside the rows4 layout run) do the same operations for
/// every token count; the K-quants in the
/// GGUF layout switch from direct tiles to panels at 4 tokens, the 32-element types from the
/// decode kernel at 2; the float and Q8_K tiles are not checked for it, so no more than 1 is
/// promised. Speculative decoding checks drafts only in steps within it.
pub fn batch_invariant_tokens(ty: QuantType, packing: Packing) -> usize {
    if !Backend::detect().is_simd() || packing == Packing::Rows4 {
        return usize::MAX;
    }
    match ty {
        QuantType::Q4K | QuantType::Q5K | QuantType::Q6K => layout::K_PANEL_MIN_TOKENS - 1,
        QuantType::Q4_0
        | QuantType::Q4_1
        | QuantType::Q5_0
        | QuantType::Q5_1
        | QuantType::Q8_0
        | QuantType::Q8K
        | QuantType::F32
        | QuantType::F16
        | QuantType::BF16 => 1,
        // IQ4 in the GGUF layout (rows not a multiple of 4) runs the scalar reference
        QuantType::Q2K | QuantType::Q3K | QuantType::IQ4NL | QuantType::IQ4XS => usize::MAX,
        // the grid i-quants' kernel computes the scalar reference's bits
        QuantType::IQ2XXS
        | QuantType::IQ2XS
        | QuantType::IQ2S
        | QuantType::IQ3XXS
        | QuantType::IQ3S
        | QuantType::IQ1S
        | QuantType::IQ1M => usize::MAX,
    }
}

/// Which kernels [`matmul`] uses, as reports name them: "AVX-512 VNNI", "AVX-VNNI",
/// "AVX2+FMA" or "scalar" (detected at run time, or forced by [`KERNELS_ENV`]).
pub fn simd_name() -> &'static str {
    Backend::detect().name()
}

/// 8-bit multiply-adds per second that every thread of the current rayon pool computes at once
/// with the product instructions of the kernels' level (`None` for the scalar kernels): the
/// compute ceiling that prefill and batched decode are measured against. Takes about `seconds`.
pub fn int8_product_rate(seconds: f64) -> Option<f64> {
    driver::int8_product_rate(Backend::detect(), seconds)
}

/// `y[t*rows + r] = dot(W row r, x[t*cols .. (t+1)*cols])` for `t in 0..n_tokens`.
///
/// `w` holds `rows` rows of `cols` elements of type `ty`, row-major, raw GGUF bytes
/// (no alignment requirement). Runs on the current rayon pool.
///
/// Panics if the slice lengths do not match the shapes or `cols` is not a
/// multiple of the block size.
pub fn matmul(
    ty: QuantType,
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
) {
    driver::matmul_many(
        Backend::detect(),
        cols,
        x,
        n_tokens,
        &mut [MatMulJob {
            ty,
            packing: Packing::Gguf,
            w,
            rows,
            y,
        }],
    )
}

/// Several matrices applied to the same input in one call (see [`MatMulJob`]): the input is
/// quantized once and all row chunks share one parallel region. Same results as one
/// [`matmul`] per job.
pub fn matmul_many(cols: usize, x: &[f32], n_tokens: usize, jobs: &mut [MatMulJob<'_>]) {
    driver::matmul_many(Backend::detect(), cols, x, n_tokens, jobs)
}

/// [`matmul_many`] with an explicit backend. Panics if the backend is not available.
pub fn matmul_many_with(
    backend: Backend,
    cols: usize,
    x: &[f32],
    n_tokens: usize,
    jobs: &mut [MatMulJob<'_>],
) {
    assert!(backend.is_available(), "backend {backend:?} not available");
    driver::matmul_many(backend, cols, x, n_tokens, jobs)
}

/// [`matmul`] with the portable scalar implementation (reference for tests).
pub fn matmul_scalar(
    ty: QuantType,
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
) {
    driver::matmul_many(
        Backend::Scalar,
        cols,
        x,
        n_tokens,
        &mut [MatMulJob {
            ty,
            packing: Packing::Gguf,
            w,
            rows,
            y,
        }],
    )
}

/// [`matmul`] with an explicit backend. Panics if the backend is not available.
#[allow(clippy::too_many_arguments)]
pub fn matmul_with(
    backend: Backend,
    ty: QuantType,
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
) {
    assert!(backend.is_available(), "backend {backend:?} not available");
    driver::matmul_many(
        backend,
        cols,
        x,
        n_tokens,
        &mut [MatMulJob {
            ty,
            packing: Packing::Gguf,
            w,
            rows,
            y,
        }],
    )
}
