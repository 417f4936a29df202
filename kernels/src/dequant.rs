//! Scalar reference dequantization of every block format.

use crate::iquant_grids::{IQ1S_GRID, IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, IQ3S_GRID, IQ3XXS_GRID};
use crate::layout::{QuantType, IQ4NL_VALUES};

#[inline(always)]
pub(crate) fn f16_at(b: &[u8], o: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[o], b[o + 1]])).to_f32()
}

#[inline(always)]
pub(crate) fn bf16_at(b: &[u8], o: usize) -> f32 {
    f32::from_bits((u16::from_le_bytes([b[o], b[o + 1]]) as u32) << 16)
}

#[inline(always)]
pub(crate) fn f32_at(b: &[u8], o: usize) -> f32 {
    f32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

#[inline(always)]
pub(crate) fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// Unpacks the 8 (scale, min) 6-bit pairs of a Q4_K / Q5_K block.
#[inline(always)]
pub(crate) fn scale_min_k4(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..8 {
        if j < 4 {
            sc[j] = s[j] & 63;
            mn[j] = s[j + 4] & 63;
        } else {
            sc[j] = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
            mn[j] = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        }
    }
    (sc, mn)
}

/// Unpacks the 16 signed 6-bit scales of a Q3_K block (already minus 32).
#[inline(always)]
pub(crate) fn scales_q3k(s: &[u8]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let lo = if i < 8 { s[i] & 0x0f } else { s[i - 8] >> 4 };
        let hi = (s[8 + (i % 4)] >> (2 * (i / 4))) & 3;
        *o = ((lo | (hi << 4)) as i8) - 32;
    }
    out
}

/// The eight 6-bit scales of an IQ4_XS block, minus 32.
#[inline(always)]
pub(crate) fn scales_iq4xs(b: &[u8]) -> [i8; 8] {
    let high = u16::from_le_bytes([b[2], b[3]]);
    let mut out = [0i8; 8];
    for (j, o) in out.iter_mut().enumerate() {
        let low = (b[4 + j / 2] >> (4 * (j % 2))) & 0x0f;
        *o = (low | (((high >> (2 * j)) & 3) as u8) << 4) as i8 - 32;
    }
    out
}

/// The 32 values of 16 bytes of IQ4_NL indices (low nibbles first).
#[inline(always)]
pub(crate) fn iq4nl_values(qs: &[u8]) -> [i8; 32] {
    let mut q = [0i8; 32];
    for j in 0..16 {
        q[j] = IQ4NL_VALUES[(qs[j] & 0x0f) as usize];
        q[j + 16] = IQ4NL_VALUES[(qs[j] >> 4) as usize];
    }
    q
}

/// The sign byte of 7-bit sign index `i` of IQ2_XXS, IQ2_XS and IQ3_XXS: bit `j` set makes
/// value `j` of a group of eight negative, and the eighth bit makes the number of negative
/// values even.
pub(crate) const KSIGNS: [u8; 128] = {
    let mut t = [0u8; 128];
    let mut i = 0;
    while i < 128 {
        t[i] = i as u8 | (((i as u32).count_ones() & 1) << 7) as u8;
        i += 1;
    }
    t
};

/// A block of a grid i-quant ([`QuantType::is_grid_iquant`]) as its 32 groups of eight values:
/// the grid entries its indices select, what sets their signs, and the scales. The scalar
/// reference ([`grid_block`]) and the SIMD kernels both start from it.
pub(crate) struct GridGroups {
    pub d: f32,
    /// Group `i`'s eight grid bytes (IQ2: magnitudes; IQ3: two entries of four; IQ1: -1, 0, 1).
    pub grid: [u64; 32],
    /// IQ2, IQ3: group `i`'s sign byte (bit `j` set: value `j` negative). IQ1: 1 where the
    /// group's offset is -1/8, 0 where it is +1/8.
    pub signs: [u8; 32],
    /// The scale of each 16 values (of each 32 duplicated).
    pub ls: [u8; 16],
}

/// A block of a grid i-quant as integers: value `i` is `d * f * (2 ls[i / 16] + 1) * q[i]`,
/// with `f` the type's factor ([`grid_iquant_factor`]).
pub(crate) struct GridBlock {
    pub d: f32,
    /// The signed grid values (IQ1_S, IQ1_M: eight times the grid value plus the offset's sign,
    /// as the offset is 1/8).
    pub q: [i8; 256],
    pub ls: [u8; 16],
}

/// The power of two each grid i-quant's integers are multiplied by (see [`GridBlock`]): its
/// scales are `(2 ls + 1) / 8` (IQ2), `/ 4` (IQ3_XXS), `/ 1` (IQ3_S), and IQ1's values eighths.
pub(crate) fn grid_iquant_factor(ty: QuantType) -> f32 {
    match ty {
        QuantType::IQ3XXS => 0.25,
        QuantType::IQ3S => 1.0,
        _ => 0.125,
    }
}

/// Reads a block of a grid i-quant (see [`GridGroups`]).
#[inline(always)]
pub(crate) fn grid_groups(ty: QuantType, b: &[u8]) -> GridGroups {
    let mut grid = [0u64; 32];
    let mut signs = [0u8; 32];
    let mut ls = [0u8; 16];
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let d = match ty {
        QuantType::IQ1M => {
            let sc = |k: usize| u16_at(48 + 2 * k);
            let bits =
                (sc(0) >> 12) | ((sc(1) >> 8) & 0xf0) | ((sc(2) >> 4) & 0xf00) | (sc(3) & 0xf000);
            half::f16::from_bits(bits).to_f32()
        }
        _ => f16_at(b, 0),
    };
    // IQ2_XXS, IQ3_XXS: per 32 values a u32 of four 7-bit sign indices and the scale
    let sign_words = |first: usize, stride: usize, ls: &mut [u8; 16], signs: &mut [u8; 32]| {
        for ib in 0..8 {
            let aux = u32_at(b, first + stride * ib);
            ls[2 * ib] = (aux >> 28) as u8;
            ls[2 * ib + 1] = ls[2 * ib];
            for l in 0..4 {
                signs[4 * ib + l] = KSIGNS[(aux >> (7 * l) & 127) as usize];
            }
        }
    };
    let nibble_scales = |first: usize, per: usize, ls: &mut [u8; 16]| {
        for (g, l) in ls.iter_mut().enumerate() {
            let k = g / per;
            *l = b[first + k / 2] >> (4 * (k % 2)) & 15;
        }
    };
    match ty {
        QuantType::IQ2XXS => {
            for ib in 0..8 {
                for l in 0..4 {
                    grid[4 * ib + l] = IQ2XXS_GRID[b[2 + 8 * ib + l] as usize];
                }
            }
            // each after its four grid indices
            sign_words(6, 8, &mut ls, &mut signs);
        }
        QuantType::IQ2XS => {
            for i in 0..32 {
                let v = u16_at(2 + 2 * i);
                grid[i] = IQ2XS_GRID[(v & 511) as usize];
                signs[i] = KSIGNS[(v >> 9) as usize];
            }
            nibble_scales(66, 1, &mut ls);
        }
        QuantType::IQ2S => {
            for i in 0..32 {
                let high = (b[66 + i / 4] >> (2 * (i % 4)) & 3) as usize;
                grid[i] = IQ2S_GRID[b[2 + i] as usize | high << 8];
                signs[i] = b[34 + i];
            }
            nibble_scales(74, 1, &mut ls);
        }
        QuantType::IQ3XXS => {
            for i in 0..32 {
                let (lo, hi) = (b[2 + 2 * i] as usize, b[3 + 2 * i] as usize);
                grid[i] = IQ3XXS_GRID[lo] as u64 | (IQ3XXS_GRID[hi] as u64) << 32;
            }
            sign_words(66, 4, &mut ls, &mut signs);
        }
        QuantType::IQ3S => {
            let index =
                |k: usize| b[2 + k] as usize | ((b[66 + k / 8] >> (k % 8) & 1) as usize) << 8;
            for i in 0..32 {
                grid[i] =
                    IQ3S_GRID[index(2 * i)] as u64 | (IQ3S_GRID[index(2 * i + 1)] as u64) << 32;
                signs[i] = b[74 + i];
            }
            nibble_scales(106, 2, &mut ls);
        }
        QuantType::IQ1S => {
            for ib in 0..8 {
                let h = u16_at(34 + 2 * ib);
                ls[2 * ib] = (h >> 12 & 7) as u8;
                ls[2 * ib + 1] = ls[2 * ib];
                for l in 0..4 {
                    let index = b[2 + 4 * ib + l] as usize | ((h >> (3 * l) & 7) as usize) << 8;
                    grid[4 * ib + l] = IQ1S_GRID[index];
                    signs[4 * ib + l] = (h >> 15) as u8;
                }
            }
        }
        QuantType::IQ1M => {
            for i in 0..32 {
                let h = b[32 + i / 2] >> (4 * (i % 2));
                grid[i] = IQ1S_GRID[b[i] as usize | ((h & 7) as usize) << 8];
                signs[i] = h >> 3 & 1;
            }
            for (g, l) in ls.iter_mut().enumerate() {
                *l = (u16_at(48 + 2 * (g / 4)) >> (3 * (g % 4)) & 7) as u8;
            }
        }
        _ => unreachable!("{ty} is not a grid i-quant"),
    }
    GridGroups { d, grid, signs, ls }
}

/// Unpacks a block of a grid i-quant (see [`GridBlock`]).
pub(crate) fn grid_block(ty: QuantType, b: &[u8]) -> GridBlock {
    let g = grid_groups(ty, b);
    let iq1 = matches!(ty, QuantType::IQ1S | QuantType::IQ1M);
    let mut q = [0i8; 256];
    for (i, q) in q.chunks_exact_mut(8).enumerate() {
        for (j, o) in q.iter_mut().enumerate() {
            let v = (g.grid[i] >> (8 * j)) as u8 as i8;
            *o = if iq1 {
                8 * v + if g.signs[i] != 0 { -1 } else { 1 }
            } else if g.signs[i] >> j & 1 != 0 {
                -v
            } else {
                v
            };
        }
    }
    GridBlock {
        d: g.d,
        q,
        ls: g.ls,
    }
}

pub(crate) fn dequantize(ty: QuantType, data: &[u8], out: &mut [f32]) {
    let bs = ty.block_size();
    let bb = ty.block_bytes();
    match ty {
        QuantType::F32 => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = f32_at(data, 4 * i);
            }
        }
        QuantType::F16 => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = f16_at(data, 2 * i);
            }
        }
        QuantType::BF16 => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = bf16_at(data, 2 * i);
            }
        }
        _ => {
            for (blk, y) in data.chunks_exact(bb).zip(out.chunks_exact_mut(bs)) {
                dequantize_block(ty, blk, y);
            }
        }
    }
}

fn dequantize_block(ty: QuantType, b: &[u8], y: &mut [f32]) {
    match ty {
        QuantType::Q4_0 => {
            let d = f16_at(b, 0);
            let qs = &b[2..18];
            for j in 0..16 {
                y[j] = ((qs[j] & 0x0f) as i32 - 8) as f32 * d;
                y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
            }
        }
        QuantType::Q4_1 => {
            let d = f16_at(b, 0);
            let m = f16_at(b, 2);
            let qs = &b[4..20];
            for j in 0..16 {
                y[j] = (qs[j] & 0x0f) as f32 * d + m;
                y[j + 16] = (qs[j] >> 4) as f32 * d + m;
            }
        }
        QuantType::Q5_0 => {
            let d = f16_at(b, 0);
            let qh = u32_at(b, 2);
            let qs = &b[6..22];
            for j in 0..16 {
                let h0 = ((qh >> j) & 1) << 4;
                let h1 = ((qh >> (j + 16)) & 1) << 4;
                y[j] = (((qs[j] & 0x0f) as u32 | h0) as i32 - 16) as f32 * d;
                y[j + 16] = (((qs[j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
            }
        }
        QuantType::Q5_1 => {
            let d = f16_at(b, 0);
            let m = f16_at(b, 2);
            let qh = u32_at(b, 4);
            let qs = &b[8..24];
            for j in 0..16 {
                let h0 = ((qh >> j) & 1) << 4;
                let h1 = ((qh >> (j + 16)) & 1) << 4;
                y[j] = ((qs[j] & 0x0f) as u32 | h0) as f32 * d + m;
                y[j + 16] = ((qs[j] >> 4) as u32 | h1) as f32 * d + m;
            }
        }
        QuantType::Q8_0 => {
            let d = f16_at(b, 0);
            for j in 0..32 {
                y[j] = b[2 + j] as i8 as f32 * d;
            }
        }
        QuantType::Q2K => {
            let scales = &b[0..16];
            let qs = &b[16..80];
            let d = f16_at(b, 80);
            let dmin = f16_at(b, 82);
            let mut is = 0;
            let mut yi = 0;
            for n in 0..2 {
                let q = &qs[32 * n..32 * n + 32];
                for shift in [0u32, 2, 4, 6] {
                    for half in 0..2 {
                        let sc = scales[is];
                        is += 1;
                        let dl = d * (sc & 0x0f) as f32;
                        let ml = dmin * (sc >> 4) as f32;
                        for l in 0..16 {
                            y[yi] = dl * ((q[l + 16 * half] >> shift) & 3) as f32 - ml;
                            yi += 1;
                        }
                    }
                }
            }
        }
        QuantType::Q3K => {
            let hm = &b[0..32];
            let qs = &b[32..96];
            let sc = scales_q3k(&b[96..108]);
            let d = f16_at(b, 108);
            let mut is = 0;
            let mut yi = 0;
            let mut m = 1u8;
            for n in 0..2 {
                let q = &qs[32 * n..32 * n + 32];
                for shift in [0u32, 2, 4, 6] {
                    for half in 0..2 {
                        let dl = d * sc[is] as f32;
                        is += 1;
                        for l in 16 * half..16 * half + 16 {
                            let v =
                                ((q[l] >> shift) & 3) as i32 - if hm[l] & m != 0 { 0 } else { 4 };
                            y[yi] = dl * v as f32;
                            yi += 1;
                        }
                    }
                    m <<= 1;
                }
            }
        }
        QuantType::Q4K => {
            let d = f16_at(b, 0);
            let dmin = f16_at(b, 2);
            let (sc, mn) = scale_min_k4(&b[4..16]);
            let qs = &b[16..144];
            for j in 0..4 {
                let q = &qs[32 * j..32 * j + 32];
                let d1 = d * sc[2 * j] as f32;
                let m1 = dmin * mn[2 * j] as f32;
                let d2 = d * sc[2 * j + 1] as f32;
                let m2 = dmin * mn[2 * j + 1] as f32;
                for l in 0..32 {
                    y[64 * j + l] = d1 * (q[l] & 0x0f) as f32 - m1;
                    y[64 * j + 32 + l] = d2 * (q[l] >> 4) as f32 - m2;
                }
            }
        }
        QuantType::Q5K => {
            let d = f16_at(b, 0);
            let dmin = f16_at(b, 2);
            let (sc, mn) = scale_min_k4(&b[4..16]);
            let qh = &b[16..48];
            let qs = &b[48..176];
            for j in 0..4 {
                let q = &qs[32 * j..32 * j + 32];
                let d1 = d * sc[2 * j] as f32;
                let m1 = dmin * mn[2 * j] as f32;
                let d2 = d * sc[2 * j + 1] as f32;
                let m2 = dmin * mn[2 * j + 1] as f32;
                let u1 = 1u8 << (2 * j);
                let u2 = 2u8 << (2 * j);
                for l in 0..32 {
                    let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                    let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                    y[64 * j + l] = d1 * ((q[l] & 0x0f) + h1) as f32 - m1;
                    y[64 * j + 32 + l] = d2 * ((q[l] >> 4) + h2) as f32 - m2;
                }
            }
        }
        QuantType::Q6K => {
            let ql = &b[0..128];
            let qh = &b[128..192];
            let sc = &b[192..208];
            let d = f16_at(b, 208);
            for n in 0..2 {
                let ql = &ql[64 * n..];
                let qh = &qh[32 * n..];
                let sc = &sc[8 * n..];
                let y = &mut y[128 * n..];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                    y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                    y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                    y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                }
            }
        }
        QuantType::Q8K => {
            let d = f32_at(b, 0);
            for j in 0..256 {
                y[j] = d * b[4 + j] as i8 as f32;
            }
        }
        QuantType::IQ4NL => {
            let d = f16_at(b, 0);
            for (o, q) in y.iter_mut().zip(iq4nl_values(&b[2..18])) {
                *o = d * q as f32;
            }
        }
        QuantType::IQ4XS => {
            let d = f16_at(b, 0);
            for (j, sc) in scales_iq4xs(b).into_iter().enumerate() {
                let dl = d * sc as f32;
                let q = iq4nl_values(&b[8 + 16 * j..24 + 16 * j]);
                for (o, q) in y[32 * j..32 * j + 32].iter_mut().zip(q) {
                    *o = dl * q as f32;
                }
            }
        }
        _ if ty.is_grid_iquant() => {
            let g = grid_block(ty, b);
            for (i, (o, &q)) in y.iter_mut().zip(&g.q).enumerate() {
                let ls = g.ls[i / 16] as f32;
                // each type's float steps in gguf-py's order, for the same bits
                *o = match ty {
                    QuantType::IQ2XXS | QuantType::IQ2XS | QuantType::IQ2S => {
                        g.d * (0.5 + ls) * 0.25 * q as f32
                    }
                    QuantType::IQ3XXS => g.d * (0.5 + ls) * 0.5 * q as f32,
                    QuantType::IQ3S => g.d * (1.0 + 2.0 * ls) * q as f32,
                    // the grid value plus the offset, exact in eighths
                    _ => g.d * (2.0 * ls + 1.0) * (q as f32 * 0.125),
                };
            }
        }
        _ => unreachable!(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The grids and sign bytes are gguf-py's (`kernels/tests/data/make_iq_vectors.py` dumped
    /// them, one byte per value).
    #[test]
    fn grids_and_signs_are_gguf_py_s() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/iq_grids.gguf_py.i8"
        );
        let want = std::fs::read(path).unwrap();
        let mut ours = Vec::new();
        for grid in [&IQ2XXS_GRID[..], &IQ2XS_GRID, &IQ2S_GRID] {
            ours.extend(grid.iter().flat_map(|g| g.to_le_bytes()));
        }
        for grid in [&IQ3XXS_GRID[..], &IQ3S_GRID] {
            ours.extend(grid.iter().flat_map(|g| g.to_le_bytes()));
        }
        ours.extend(IQ1S_GRID.iter().flat_map(|g| g.to_le_bytes()));
        ours.extend(KSIGNS);
        assert_eq!(ours.len(), want.len());
        assert!(ours == want, "a grid or sign table differs from gguf-py's");
    }
}
