//! The types and layouts every kernel level shares: the GGUF element types, the weight layouts
//! and their byte sizes, the quantized activation blocks, and the plan of a row chunk that the
//! driver hands to a kernel level. It imports nothing from the rest of the crate, so that the
//! driver, the scalar reference, the rows4 packer and the x86 kernels all depend on it and not
//! on each other.
//!
//! # The rows4 weight layout
//!
//! Q4_0, Q5_0, Q8_0, Q4_K, Q6_K, IQ4_NL and IQ4_XS rearranged once at load so that the SIMD kernels read four
//! rows' blocks as ready-made vectors ([`Packing::Rows4`], from [`crate::repack_rows4`]).
//!
//! Why: in the GGUF layout every block of every row must be unpacked and then transposed
//! into the kernels' "step" form (each 32-byte vector holds 8 consecutive values of each of
//! four rows, so one broadcast 8-byte activation chunk meets all four rows in one `maddubs`).
//! For decode that work, not the memory traffic, bounded these formats. Rows4 stores the
//! blocks already transposed, with the same number of bytes.
//!
//! Rows are taken in groups of four (the matrix must have a multiple of four rows); a group
//! holds, for each block index `b` of the rows, one group-block:
//!
//! * Q8_0 (136 bytes): four steps of 32 signed values, then the four rows' f16 scales.
//! * Q4_0 (72 bytes), Q5_0 (88 bytes): two 32-byte vectors of nibbles (low nibbles: steps 0
//!   and 2, high nibbles: steps 1 and 3), for Q5_0 the 128 fifth bits as 16 bytes (see
//!   [`Q5_HIGH_BIT`]), then the four rows' f16 scales.
//!
//! * Q4_K (592 bytes, 16 more than four GGUF blocks): for each sub-block `j` of 32 values,
//!   two 32-byte vectors of nibbles as above (its four steps); then the 6-bit scales as bytes,
//!   row `r`'s eight at `8r` (so one in-lane byte shuffle spreads a sub-block's four scales);
//!   then the mins as bytes, those of sub-blocks `2q, 2q + 1` of row `r` at `8q + 2r`; then the
//!   four d and the four dmin as f16. The scales and mins cost the extra bytes: unpacked once
//!   at load rather than from their 12-byte packing for every block of every row at run time.
//!
//! * IQ4_NL (72 bytes): Q4_0's, the nibbles being indices into [`IQ4NL_VALUES`].
//!
//! * IQ4_XS (552 bytes, 8 more than four GGUF blocks): per sub-block `j` of 32 values, 68
//!   bytes: IQ4_NL's nibbles, then the four rows' scales of sub-block `j` as i8 (the stored
//!   6-bit value minus 32); after the eight sub-blocks the four rows' d as f16. The kernels
//!   take a sub-block's scale as `d * scale` in f32 (exact: 11 by 6 significant bits), which
//!   an f16 could not always hold.
//!
//! * Q6_K (840 bytes): for each sub-block of 32 values three 32-byte vectors: steps 0, 1 and 2
//!   as 6-bit values, the top two bits of each byte holding two of step 3's six (low, middle,
//!   high); then the 16 group scales (i8) of each row, groups `8h..8h + 8` of row `r` at
//!   `32h + 8r`; then the four d as f16.
//!
//! Step `k`, byte `s` (0..32) is element `8k + s % 8` (of the block or sub-block) of row `s / 8`.

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
    /// 32 values: f16 d and 16 bytes of 4-bit indices into [`IQ4NL_VALUES`].
    IQ4NL,
    /// 256 values: f16 d, eight 6-bit sub-block scales (stored plus 32: the low 4 bits in 4
    /// bytes, the top 2 in a u16) and 128 bytes of 4-bit indices into [`IQ4NL_VALUES`], each
    /// sub-block's 16 bytes laid out as an IQ4_NL block's.
    IQ4XS,
    /// 256 values (66 bytes): f16 d, then per 32 values four 8-bit indices into
    /// [`crate::iquant_grids`]' IQ2_XXS grid of eight magnitudes and a u32 of four 7-bit sign
    /// indices and a 4-bit scale.
    IQ2XXS,
    /// 256 values (74 bytes): f16 d, 32 u16 (a 9-bit grid index and a 7-bit sign index per 8
    /// values), a 4-bit scale per 16 values.
    IQ2XS,
    /// 256 values (82 bytes): f16 d, the low 8 bits of 32 10-bit grid indices, 32 sign bytes,
    /// the indices' top 2 bits, a 4-bit scale per 16 values.
    IQ2S,
    /// 256 values (98 bytes): f16 d, 64 8-bit indices of groups of four magnitudes, then per 32
    /// values a u32 of four 7-bit sign indices and a 4-bit scale.
    IQ3XXS,
    /// 256 values (110 bytes): f16 d, the low 8 bits of 64 9-bit indices of groups of four
    /// magnitudes, their top bits, 32 sign bytes, a 4-bit scale per 32 values.
    IQ3S,
    /// 256 values (50 bytes): f16 d, the low 8 bits of 32 11-bit indices of groups of eight
    /// values -1, 0, 1, then per 32 values a u16 of their top 3 bits, a 3-bit scale and the sign
    /// of an offset of 1/8 added to every value.
    IQ1S,
    /// 256 values (56 bytes): IQ1_S's indices, their top 3 bits and the offset's sign per 8
    /// values, a 3-bit scale per 16 values, and d as an f16 spread over the top nibbles of the
    /// four u16 that hold the scales.
    IQ1M,
}

/// The 16 values the 4-bit indices of IQ4_NL and IQ4_XS stand for (ggml's non-linear grid).
pub const IQ4NL_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

impl QuantType {
    /// All supported types.
    pub const ALL: [QuantType; 23] = [
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
        QuantType::IQ4NL,
        QuantType::IQ4XS,
        QuantType::IQ2XXS,
        QuantType::IQ2XS,
        QuantType::IQ2S,
        QuantType::IQ3XXS,
        QuantType::IQ3S,
        QuantType::IQ1S,
        QuantType::IQ1M,
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
            16 => QuantType::IQ2XXS,
            17 => QuantType::IQ2XS,
            18 => QuantType::IQ3XXS,
            19 => QuantType::IQ1S,
            20 => QuantType::IQ4NL,
            21 => QuantType::IQ3S,
            22 => QuantType::IQ2S,
            23 => QuantType::IQ4XS,
            29 => QuantType::IQ1M,
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
            QuantType::IQ4NL => 20,
            QuantType::IQ4XS => 23,
            QuantType::IQ2XXS => 16,
            QuantType::IQ2XS => 17,
            QuantType::IQ3XXS => 18,
            QuantType::IQ1S => 19,
            QuantType::IQ3S => 21,
            QuantType::IQ2S => 22,
            QuantType::IQ1M => 29,
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
            QuantType::IQ4NL => "IQ4_NL",
            QuantType::IQ4XS => "IQ4_XS",
            QuantType::IQ2XXS => "IQ2_XXS",
            QuantType::IQ2XS => "IQ2_XS",
            QuantType::IQ2S => "IQ2_S",
            QuantType::IQ3XXS => "IQ3_XXS",
            QuantType::IQ3S => "IQ3_S",
            QuantType::IQ1S => "IQ1_S",
            QuantType::IQ1M => "IQ1_M",
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
            | QuantType::Q8_0
            | QuantType::IQ4NL => 32,
            QuantType::Q2K
            | QuantType::Q3K
            | QuantType::Q4K
            | QuantType::Q5K
            | QuantType::Q6K
            | QuantType::Q8K
            | QuantType::IQ4XS
            | QuantType::IQ2XXS
            | QuantType::IQ2XS
            | QuantType::IQ2S
            | QuantType::IQ3XXS
            | QuantType::IQ3S
            | QuantType::IQ1S
            | QuantType::IQ1M => 256,
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
            QuantType::IQ4NL => 18,
            QuantType::IQ4XS => 136,
            QuantType::IQ2XXS => 66,
            QuantType::IQ2XS => 74,
            QuantType::IQ2S => 82,
            QuantType::IQ3XXS => 98,
            QuantType::IQ3S => 110,
            QuantType::IQ1S => 50,
            QuantType::IQ1M => 56,
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

    /// Whether this is one of the i-quants whose indices stand for groups of grid values
    /// (IQ1_S to IQ3_S: not IQ4_NL and IQ4_XS, which index single values).
    pub fn is_grid_iquant(self) -> bool {
        matches!(
            self,
            QuantType::IQ2XXS
                | QuantType::IQ2XS
                | QuantType::IQ2S
                | QuantType::IQ3XXS
                | QuantType::IQ3S
                | QuantType::IQ1S
                | QuantType::IQ1M
        )
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

/// Weight layouts the kernels read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Packing {
    /// Raw GGUF blocks, row after row.
    #[default]
    Gguf,
    /// Groups of four rows, blocks transposed (see the module docs; from
    /// [`crate::repack_rows4`]).
    Rows4,
}

/// Bytes per weight row of `cols` columns as stored in `packing` (`None`: `cols` is not a
/// multiple of the block size).
pub fn stored_row_bytes(ty: QuantType, packing: Packing, cols: usize) -> Option<usize> {
    match packing {
        Packing::Gguf => ty.row_bytes(cols),
        Packing::Rows4 => rows4_row_bytes(ty, cols),
    }
}

/// Whether `ty` has a rows4 form.
pub fn has_rows4(ty: QuantType) -> bool {
    matches!(
        ty,
        QuantType::Q4_0
            | QuantType::Q5_0
            | QuantType::Q8_0
            | QuantType::Q4K
            | QuantType::Q6K
            | QuantType::IQ4NL
            | QuantType::IQ4XS
    )
}

/// Bytes per row of a `cols`-column matrix of `ty` in the rows4 layout (a quarter of a group).
pub fn rows4_row_bytes(ty: QuantType, cols: usize) -> Option<usize> {
    Some(ty.row_bytes(cols)? / ty.block_bytes() * group_block_bytes(ty) / 4)
}

/// Bytes of one rows4 group-block (four rows' blocks of index `b`): the same as four GGUF
/// blocks, but for Q4_K's unpacked scales and mins.
pub(crate) fn group_block_bytes(ty: QuantType) -> usize {
    match ty {
        QuantType::Q4K => Q4K_GROUP_BYTES,
        QuantType::IQ4XS => IQ4XS_GROUP_BYTES,
        _ => 4 * ty.block_bytes(),
    }
}

/// Where the fifth bit of step `k`, byte `s` of a Q5_0 group-block sits: byte `s % 16` of the
/// 16 high-bit bytes, at bit `Q5_HIGH_BIT[k][s / 16]`. Chosen so that one 64-bit shift per
/// step (left for steps 0 and 1, right for 2 and 3, a different count in each 128-bit half)
/// brings every byte's bit to position 4 without a neighbour's bit landing there.
pub(crate) const Q5_HIGH_BIT: [[u32; 2]; 4] = [[0, 1], [2, 3], [4, 7], [5, 6]];

/// Bytes of a Q4_K group-block, and where its scales, mins, d and dmin start.
pub(crate) const Q4K_GROUP_BYTES: usize = 592;
pub(crate) const Q4K_SCALES: usize = 512;
pub(crate) const Q4K_MINS: usize = 544;
pub(crate) const Q4K_D: usize = 576;
pub(crate) const Q4K_DMIN: usize = 584;

/// Bytes of an IQ4_XS group-block, of each of its eight sub-blocks, where a sub-block's four
/// scales start in it, and where the four d start in the group-block.
pub(crate) const IQ4XS_GROUP_BYTES: usize = 552;
pub(crate) const IQ4XS_SUB_BYTES: usize = 68;
pub(crate) const IQ4XS_SCALES: usize = 64;
pub(crate) const IQ4XS_D: usize = 544;

/// Where a Q6_K group-block's scales and d start.
pub(crate) const Q6K_SCALES: usize = 768;
pub(crate) const Q6K_D: usize = 832;

/// 32 activations quantized to i8: `x ~= d * qs`, `s = d * sum(qs)`.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(8))]
pub struct BlockQ8 {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; 32],
}

impl Default for BlockQ8 {
    fn default() -> Self {
        BlockQ8 {
            d: 0.0,
            s: 0.0,
            qs: [0; 32],
        }
    }
}

/// 256 activations quantized to i8: `x ~= d * qs`; `bsums[g]` = sum of `qs[16g..16g+16]`.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(8))]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; 256],
    pub bsums: [i16; 16],
}

impl Default for BlockQ8K {
    fn default() -> Self {
        BlockQ8K {
            d: 0.0,
            qs: [0; 256],
            bsums: [0; 16],
        }
    }
}

/// The scale `d = amax / 127` of an activation block whose largest magnitude is `amax`, and
/// the factor `1 / d` its values are multiplied by before rounding (0 for an all-zero block).
/// One definition for every level, so that their blocks are bit-identical.
#[inline(always)]
pub(crate) fn q8_scale(amax: f32) -> (f32, f32) {
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    (d, id)
}

/// Activations of all tokens, in the form the weight type wants.
#[derive(Clone, Copy)]
pub(crate) enum Act<'a> {
    F32(&'a [f32]),
    Q8(&'a [BlockQ8]),
    Q8K(&'a [BlockQ8K]),
}

/// Raw output pointer shared by the row-chunk tasks (which write disjoint rows).
#[derive(Clone, Copy)]
pub(crate) struct YPtr(pub *mut f32);
unsafe impl Send for YPtr {}
unsafe impl Sync for YPtr {}

/// One weight matrix of a matmul call and everything a kernel level needs to compute any range
/// of its rows: built once per call by the driver, then shared by the tasks, each of which
/// passes it with its own row range.
#[derive(Clone, Copy)]
pub(crate) struct RowsPlan<'a> {
    pub ty: QuantType,
    pub packing: Packing,
    /// All `rows` rows, as stored in `packing`.
    pub w: &'a [u8],
    /// Bytes per row of `w` ([`stored_row_bytes`]).
    pub row_bytes: usize,
    pub rows: usize,
    pub cols: usize,
    /// All `n_tokens` tokens' activations.
    pub act: Act<'a>,
    pub n_tokens: usize,
    /// `[n_tokens, rows]` outputs.
    pub y: YPtr,
}

/// From this many tokens on, the K-quants (Q4_K, Q5_K, Q6_K) use the panel
/// kernels (panel.rs); fewer: the direct R x T tiles (decode.rs: `tile_q45k`,
/// `tile_q6k`), whose results for a token do not depend on the other tokens.
pub(crate) const K_PANEL_MIN_TOKENS: usize = 4;

/// Sets the f16 scale `d` of an i-quant block, for code that writes such blocks (tests, tools):
/// its first two bytes, but for IQ1_M, whose d is spread over the top nibbles of the four u16 at
/// bytes 48..56.
pub fn set_iquant_d(ty: QuantType, block: &mut [u8], d: f32) {
    let bits = half::f16::from_f32(d).to_bits();
    if ty == QuantType::IQ1M {
        for k in 0..4 {
            let o = 48 + 2 * k;
            let w = u16::from_le_bytes([block[o], block[o + 1]]) & 0x0fff;
            let w = w | ((bits >> (4 * k)) & 0xf) << 12;
            block[o..o + 2].copy_from_slice(&w.to_le_bytes());
        }
    } else {
        block[..2].copy_from_slice(&bits.to_le_bytes());
    }
}
