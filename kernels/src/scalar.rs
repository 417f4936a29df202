//! The portable scalar kernels, the reference for the SIMD ones: activation quantization into
//! Q8 and Q8_K blocks (round-half-to-even of `x * (1/d)` with `d = amax / 127`), dot products of
//! one weight row with one activation row, and a row chunk of a product built from them.

use crate::dequant::{
    bf16_at, f16_at, f32_at, grid_block, grid_iquant_factor, iq4nl_values, scale_min_k4,
    scales_iq4xs, scales_q3k, u32_at,
};
use crate::layout::{q8_scale, Act, BlockQ8, BlockQ8K, Packing, QuantType, RowsPlan};
use crate::repack::unpack_rows4_group;
use std::ops::Range;

#[inline(always)]
fn q(x: f32, id: f32) -> i8 {
    (x * id).round_ties_even().clamp(-127.0, 127.0) as i8
}

/// Quantizes `x` (a multiple of 32 long) into `out`.
pub(crate) fn quantize_q8(x: &[f32], out: &mut [BlockQ8]) {
    assert_eq!(x.len(), out.len() * 32);
    for (xb, ob) in x.chunks_exact(32).zip(out.iter_mut()) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let (d, id) = q8_scale(amax);
        let mut sum = 0i32;
        for (o, &v) in ob.qs.iter_mut().zip(xb) {
            *o = q(v, id);
            sum += *o as i32;
        }
        ob.d = d;
        ob.s = d * sum as f32;
    }
}

/// Quantizes `x` (a multiple of 256 long) into `out`.
pub(crate) fn quantize_q8k(x: &[f32], out: &mut [BlockQ8K]) {
    assert_eq!(x.len(), out.len() * 256);
    for (xb, ob) in x.chunks_exact(256).zip(out.iter_mut()) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let (d, id) = q8_scale(amax);
        for (o, &v) in ob.qs.iter_mut().zip(xb) {
            *o = q(v, id);
        }
        for g in 0..16 {
            ob.bsums[g] = ob.qs[16 * g..16 * g + 16].iter().map(|&v| v as i16).sum();
        }
        ob.d = d;
    }
}

/// Rows `rows` of `plan` for all its tokens.
///
/// # Safety
/// `plan.y` must be valid for `n_tokens * plan.rows` writes, and no one else may write rows
/// `rows` of it while this runs.
pub(crate) unsafe fn chunk_rows(plan: &RowsPlan<'_>, rows: Range<usize>) {
    let &RowsPlan {
        ty,
        packing,
        w,
        row_bytes: rb,
        rows: stride,
        cols,
        act,
        n_tokens,
        y,
    } = plan;
    // rows4 weights are read one group of four rows at a time, back in GGUF form
    let grb = ty.row_bytes(cols).expect("checked by matmul_many");
    let mut group = Vec::new();
    for r in rows.clone() {
        let wr = match packing {
            Packing::Gguf => &w[r * rb..(r + 1) * rb],
            Packing::Rows4 => {
                if r % 4 == 0 || group.is_empty() {
                    let g = r / 4 * 4;
                    group.resize(4 * grb, 0);
                    unpack_rows4_group(ty, grb, &w[g * rb..(g + 4) * rb], &mut group);
                }
                &group[r % 4 * grb..(r % 4 + 1) * grb]
            }
        };
        for t in 0..n_tokens {
            let v = match act {
                Act::F32(x) => dot_float(ty, wr, &x[t * cols..(t + 1) * cols]),
                Act::Q8(a) => {
                    let nb = cols / 32;
                    dot_q8(ty, wr, &a[t * nb..(t + 1) * nb])
                }
                Act::Q8K(a) => {
                    let nb = cols / 256;
                    dot_q8k(ty, wr, &a[t * nb..(t + 1) * nb])
                }
            };
            // SAFETY: the caller gives this task rows `rows`; the index is in bounds.
            *y.0.add(t * stride + r) = v;
        }
    }
}

/// Dot of a float-typed weight row with f32 activations.
pub(crate) fn dot_float(ty: QuantType, w: &[u8], x: &[f32]) -> f32 {
    let mut s = 0f32;
    match ty {
        QuantType::F32 => {
            for (i, &v) in x.iter().enumerate() {
                s += f32_at(w, 4 * i) * v;
            }
        }
        QuantType::F16 => {
            for (i, &v) in x.iter().enumerate() {
                s += f16_at(w, 2 * i) * v;
            }
        }
        QuantType::BF16 => {
            for (i, &v) in x.iter().enumerate() {
                s += bf16_at(w, 2 * i) * v;
            }
        }
        _ => unreachable!(),
    }
    s
}

/// Dot of a weight row of a type with 32-value blocks or sub-blocks (Q4_0, Q4_1, Q5_0, Q5_1,
/// Q8_0, IQ4_NL, IQ4_XS) with Q8 activations.
pub(crate) fn dot_q8(ty: QuantType, w: &[u8], a: &[BlockQ8]) -> f32 {
    if ty == QuantType::IQ4XS {
        return dot_iq4xs_q8(w, a);
    }
    let bb = ty.block_bytes();
    let mut sum = 0f32;
    for (b, ab) in w.chunks_exact(bb).zip(a) {
        let mut q = [0i32; 32];
        let (d, m) = match ty {
            QuantType::Q4_0 => {
                for j in 0..16 {
                    q[j] = (b[2 + j] & 0x0f) as i32 - 8;
                    q[j + 16] = (b[2 + j] >> 4) as i32 - 8;
                }
                (f16_at(b, 0), 0.0)
            }
            QuantType::Q4_1 => {
                for j in 0..16 {
                    q[j] = (b[4 + j] & 0x0f) as i32;
                    q[j + 16] = (b[4 + j] >> 4) as i32;
                }
                (f16_at(b, 0), f16_at(b, 2))
            }
            QuantType::Q5_0 => {
                let qh = u32_at(b, 2);
                for j in 0..16 {
                    q[j] = ((b[6 + j] & 0x0f) as u32 | (((qh >> j) & 1) << 4)) as i32 - 16;
                    q[j + 16] =
                        ((b[6 + j] >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4)) as i32 - 16;
                }
                (f16_at(b, 0), 0.0)
            }
            QuantType::Q5_1 => {
                let qh = u32_at(b, 4);
                for j in 0..16 {
                    q[j] = ((b[8 + j] & 0x0f) as u32 | (((qh >> j) & 1) << 4)) as i32;
                    q[j + 16] = ((b[8 + j] >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4)) as i32;
                }
                (f16_at(b, 0), f16_at(b, 2))
            }
            QuantType::Q8_0 => {
                for j in 0..32 {
                    q[j] = b[2 + j] as i8 as i32;
                }
                (f16_at(b, 0), 0.0)
            }
            QuantType::IQ4NL => {
                for (o, v) in q.iter_mut().zip(iq4nl_values(&b[2..18])) {
                    *o = v as i32;
                }
                (f16_at(b, 0), 0.0)
            }
            _ => unreachable!(),
        };
        let isum: i32 = q.iter().zip(&ab.qs).map(|(&w, &x)| w * x as i32).sum();
        sum += isum as f32 * (d * ab.d) + m * ab.s;
    }
    sum
}

/// Dot of an IQ4_XS row with Q8 activations, one activation block per 32-value sub-block,
/// whose scale is `d * scale` (exact in f32).
fn dot_iq4xs_q8(w: &[u8], a: &[BlockQ8]) -> f32 {
    let mut sum = 0f32;
    for (b, ab) in w.chunks_exact(136).zip(a.chunks_exact(8)) {
        let d = f16_at(b, 0);
        for (j, (sc, ab)) in scales_iq4xs(b).into_iter().zip(ab).enumerate() {
            let q = iq4nl_values(&b[8 + 16 * j..24 + 16 * j]);
            let isum: i32 = q
                .iter()
                .zip(&ab.qs)
                .map(|(&w, &x)| w as i32 * x as i32)
                .sum();
            sum += isum as f32 * (d * sc as f32 * ab.d);
        }
    }
    sum
}

/// Dot of a K-quant or grid i-quant weight row with Q8_K activations.
pub(crate) fn dot_q8k(ty: QuantType, w: &[u8], a: &[BlockQ8K]) -> f32 {
    let bb = ty.block_bytes();
    let mut sum = 0f32;
    for (b, ab) in w.chunks_exact(bb).zip(a) {
        let x = &ab.qs;
        sum += match ty {
            QuantType::Q2K => {
                let d = f16_at(b, 80);
                let dmin = f16_at(b, 82);
                let scales = &b[0..16];
                let qs = &b[16..80];
                let mut isum = 0i32;
                let mut msum = 0i32;
                let mut g = 0;
                for n in 0..2 {
                    for shift in [0u32, 2, 4, 6] {
                        for half in 0..2 {
                            let sc = scales[g];
                            let mut s = 0i32;
                            for l in 0..16 {
                                let qv = ((qs[32 * n + 16 * half + l] >> shift) & 3) as i32;
                                s += qv * x[16 * g + l] as i32;
                            }
                            isum += (sc & 0x0f) as i32 * s;
                            msum += (sc >> 4) as i32 * ab.bsums[g] as i32;
                            g += 1;
                        }
                    }
                }
                ab.d * (d * isum as f32 - dmin * msum as f32)
            }
            QuantType::Q3K => {
                let hm = &b[0..32];
                let qs = &b[32..96];
                let sc = scales_q3k(&b[96..108]);
                let d = f16_at(b, 108);
                let mut isum = 0i32;
                let mut g = 0;
                let mut m = 1u8;
                for n in 0..2 {
                    for shift in [0u32, 2, 4, 6] {
                        for half in 0..2 {
                            let mut s = 0i32;
                            for l in 0..16 {
                                let li = 16 * half + l;
                                let qv = ((qs[32 * n + li] >> shift) & 3) as i32
                                    - if hm[li] & m != 0 { 0 } else { 4 };
                                s += qv * x[16 * g + l] as i32;
                            }
                            isum += sc[g] as i32 * s;
                            g += 1;
                        }
                        m <<= 1;
                    }
                }
                ab.d * d * isum as f32
            }
            QuantType::Q4K | QuantType::Q5K => {
                let d = f16_at(b, 0);
                let dmin = f16_at(b, 2);
                let (sc, mn) = scale_min_k4(&b[4..16]);
                let (qh, qs) = if ty == QuantType::Q5K {
                    (Some(&b[16..48]), &b[48..176])
                } else {
                    (None, &b[16..144])
                };
                let mut isum = 0i32;
                let mut msum = 0i32;
                for j in 0..8 {
                    let mut s = 0i32;
                    for l in 0..32 {
                        let byte = qs[32 * (j / 2) + l];
                        let mut qv = if j % 2 == 0 { byte & 0x0f } else { byte >> 4 } as i32;
                        if let Some(qh) = qh {
                            qv += (((qh[l] >> j) & 1) as i32) << 4;
                        }
                        s += qv * x[32 * j + l] as i32;
                    }
                    isum += sc[j] as i32 * s;
                    msum += mn[j] as i32 * (ab.bsums[2 * j] as i32 + ab.bsums[2 * j + 1] as i32);
                }
                ab.d * (d * isum as f32 - dmin * msum as f32)
            }
            QuantType::Q6K => {
                let ql = &b[0..128];
                let qh = &b[128..192];
                let sc = &b[192..208];
                let d = f16_at(b, 208);
                let mut isum = 0i32;
                for n in 0..2 {
                    for k in 0..4 {
                        for half in 0..2 {
                            let g = 8 * n + 2 * k + half;
                            let mut s = 0i32;
                            for l in 16 * half..16 * half + 16 {
                                let lb = ql[64 * n + 32 * (k % 2) + l];
                                let lo = if k < 2 { lb & 0x0f } else { lb >> 4 };
                                let hi = (qh[32 * n + l] >> (2 * k)) & 3;
                                let qv = (lo | (hi << 4)) as i32 - 32;
                                s += qv * x[128 * n + 32 * k + l] as i32;
                            }
                            isum += (sc[g] as i8) as i32 * s;
                        }
                    }
                }
                ab.d * d * isum as f32
            }
            QuantType::Q8K => {
                let d = f32_at(b, 0);
                let isum: i32 = (0..256).map(|j| b[4 + j] as i8 as i32 * x[j] as i32).sum();
                ab.d * d * isum as f32
            }
            // integer sums of each 16 values times their scale's odd multiplier; the type's
            // power-of-two factor folded into d
            _ if ty.is_grid_iquant() => {
                let g = grid_block(ty, b);
                let isum: i32 = (0..16)
                    .map(|k| {
                        let s: i32 = (16 * k..16 * k + 16)
                            .map(|i| g.q[i] as i32 * x[i] as i32)
                            .sum();
                        (2 * g.ls[k] as i32 + 1) * s
                    })
                    .sum();
                ab.d * (g.d * grid_iquant_factor(ty)) * isum as f32
            }
            _ => unreachable!(),
        };
    }
    sum
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Activations with exact ties, zeros, a zero block and a few large values.
    pub(crate) fn activations(n: usize) -> Vec<f32> {
        let mut s = 12345u32;
        (0..n)
            .map(|i| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                let v = (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
                if i % 97 == 0 || (256..288).contains(&i) {
                    0.0
                } else {
                    v * if i % 31 == 0 { 10.0 } else { 1.0 }
                }
            })
            .collect()
    }

    #[test]
    fn quantization_error_is_bounded() {
        let x = activations(256);
        let mut a = vec![BlockQ8::default(); 8];
        quantize_q8(&x, &mut a);
        for (xb, ab) in x.chunks(32).zip(&a) {
            for (v, q) in xb.iter().zip(&ab.qs) {
                assert!((v - ab.d * *q as f32).abs() <= ab.d * 0.5 + 1e-7);
            }
        }
    }
}
