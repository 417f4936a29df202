//! Quantized GGML block formats and matrix-multiply kernels for qwen-run.
//!
//! The public entry point is [`matmul`]: `rows x cols` quantized weights (raw GGUF
//! bytes) times `n_tokens` f32 activation vectors. Activations are quantized once
//! per call (Q8 blocks of 32 for the 32-element formats, Q8_K blocks of 256 for
//! the K-quants) and then combined with the weights using integer dot products.
//! The feature level is chosen at run time ([`Backend`]: AVX-512 VNNI, AVX2+FMA, or the
//! portable scalar path that computes the same thing and serves as the test reference);
//! [`KERNELS_ENV`] forces one. The two x86 levels run the same kernels and give the same bits.

mod act;
pub mod attention;
mod dequant;
mod driver;
pub mod elementwise;
mod f32_gemm;
pub mod pool;
mod repack;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use act::{BlockQ8, BlockQ8K};
pub use driver::{stored_row_bytes, MatMulJob};
pub use repack::{has_rows4, repack_rows4, repack_rows4_into, rows4_row_bytes, Packing};

/// Tensor element types of GGUF files that these kernels understand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
}

impl QuantType {
    /// All supported types.
    pub const ALL: [QuantType; 14] = [
        QuantType::F32,
        QuantType::F16,
        QuantType::BF16,
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q5_0,
        QuantType::Q5_1,
        QuantType::Q8_0,
        QuantType::Q2K,
        QuantType::Q3K,
        QuantType::Q4K,
        QuantType::Q5K,
        QuantType::Q6K,
        QuantType::Q8K,
    ];

    /// Maps a ggml type id (as stored in GGUF tensor infos) to a [`QuantType`].
    pub fn from_ggml_id(id: u32) -> Option<QuantType> {
        Some(match id {
            0 => QuantType::F32,
            1 => QuantType::F16,
            2 => QuantType::Q4_0,
            3 => QuantType::Q4_1,
            6 => QuantType::Q5_0,
            7 => QuantType::Q5_1,
            8 => QuantType::Q8_0,
            10 => QuantType::Q2K,
            11 => QuantType::Q3K,
            12 => QuantType::Q4K,
            13 => QuantType::Q5K,
            14 => QuantType::Q6K,
            15 => QuantType::Q8K,
            30 => QuantType::BF16,
            _ => return None,
        })
    }

    /// The ggml type id.
    pub fn ggml_id(self) -> u32 {
        match self {
            QuantType::F32 => 0,
            QuantType::F16 => 1,
            QuantType::Q4_0 => 2,
            QuantType::Q4_1 => 3,
            QuantType::Q5_0 => 6,
            QuantType::Q5_1 => 7,
            QuantType::Q8_0 => 8,
            QuantType::Q2K => 10,
            QuantType::Q3K => 11,
            QuantType::Q4K => 12,
            QuantType::Q5K => 13,
            QuantType::Q6K => 14,
            QuantType::Q8K => 15,
            QuantType::BF16 => 30,
        }
    }

    /// ggml-style name ("Q4_K", "F16", ...).
    pub fn name(self) -> &'static str {
        match self {
            QuantType::F32 => "F32",
            QuantType::F16 => "F16",
            QuantType::BF16 => "BF16",
            QuantType::Q4_0 => "Q4_0",
            QuantType::Q4_1 => "Q4_1",
            QuantType::Q5_0 => "Q5_0",
            QuantType::Q5_1 => "Q5_1",
            QuantType::Q8_0 => "Q8_0",
            QuantType::Q2K => "Q2_K",
            QuantType::Q3K => "Q3_K",
            QuantType::Q4K => "Q4_K",
            QuantType::Q5K => "Q5_K",
            QuantType::Q6K => "Q6_K",
            QuantType::Q8K => "Q8_K",
        }
    }

    /// Elements per block (1 for the float types).
    pub fn block_size(self) -> usize {
        match self {
            QuantType::F32 | QuantType::F16 | QuantType::BF16 => 1,
            QuantType::Q4_0
            | QuantType::Q4_1
            | QuantType::Q5_0
            | QuantType::Q5_1
            | QuantType::Q8_0 => 32,
            QuantType::Q2K
            | QuantType::Q3K
            | QuantType::Q4K
            | QuantType::Q5K
            | QuantType::Q6K
            | QuantType::Q8K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            QuantType::F32 => 4,
            QuantType::F16 | QuantType::BF16 => 2,
            QuantType::Q4_0 => 18,
            QuantType::Q4_1 => 20,
            QuantType::Q5_0 => 22,
            QuantType::Q5_1 => 24,
            QuantType::Q8_0 => 34,
            QuantType::Q2K => 84,
            QuantType::Q3K => 110,
            QuantType::Q4K => 144,
            QuantType::Q5K => 176,
            QuantType::Q6K => 210,
            QuantType::Q8K => 292,
        }
    }

    /// Bytes of a row of `n` elements, `None` if `n` is not a multiple of the block size.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        let bs = self.block_size();
        if !n.is_multiple_of(bs) {
            None
        } else {
            Some(n / bs * self.block_bytes())
        }
    }

    /// True for the float (non block-quantized) types.
    pub fn is_float(self) -> bool {
        matches!(self, QuantType::F32 | QuantType::F16 | QuantType::BF16)
    }
}

impl std::fmt::Display for QuantType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

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
    /// The AVX2 kernels with AVX-512 VNNI integer products (`vpdpbusd`, `vpdpwssd`):
    /// requires AVX-512 F, BW, VL and VNNI besides AVX2 + FMA + F16C. Same results as
    /// [`Backend::Avx2`], bit for bit.
    Avx512,
}

/// The environment variable that forces a [`Backend`] (`scalar`, `avx2`, `avx512`), for tests
/// and A/B runs.
pub const KERNELS_ENV: &str = "QWEN_RUN_KERNELS";

impl Backend {
    /// Every backend, slowest first.
    pub const ALL: [Backend; 3] = [Backend::Scalar, Backend::Avx2, Backend::Avx512];

    /// The name [`KERNELS_ENV`] takes.
    pub fn env_name(self) -> &'static str {
        match self {
            Backend::Scalar => "scalar",
            Backend::Avx2 => "avx2",
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

/// Which kernels [`matmul`] uses, as reports name them: "AVX-512 VNNI", "AVX2+FMA" or
/// "scalar" (detected at run time, or forced by [`KERNELS_ENV`]).
pub fn simd_name() -> &'static str {
    Backend::detect().name()
}

/// 8-bit multiply-adds per second that every thread of the current rayon pool computes at once
/// with the product instructions of the kernels' level (`None` for the scalar kernels): the
/// compute ceiling that prefill and batched decode are measured against. Takes about `seconds`.
pub fn int8_product_rate(seconds: f64) -> Option<f64> {
    let backend = Backend::detect();
    #[cfg(target_arch = "x86_64")]
    if backend.is_simd() {
        // SAFETY: `detect` returns only levels this CPU runs
        let rates = rayon::broadcast(|_| unsafe { x86::product_rate(backend, seconds) });
        return Some(rates.iter().sum());
    }
    let _ = (backend, seconds);
    None
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
