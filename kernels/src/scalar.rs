//! Portable scalar dot products of one weight row with one quantized activation
//! row. These are the reference for the SIMD kernels.

use crate::act::{BlockQ8, BlockQ8K};
use crate::dequant::{bf16_at, f16_at, f32_at, scale_min_k4, scales_q3k, u32_at};
use crate::QuantType;

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

/// Dot of a 32-element-block weight row (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) with Q8 activations.
pub(crate) fn dot_q8(ty: QuantType, w: &[u8], a: &[BlockQ8]) -> f32 {
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
            _ => unreachable!(),
        };
        let isum: i32 = q.iter().zip(&ab.qs).map(|(&w, &x)| w * x as i32).sum();
        sum += isum as f32 * (d * ab.d) + m * ab.s;
    }
    sum
}

/// Dot of a K-quant weight row with Q8_K activations.
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
            _ => unreachable!(),
        };
    }
    sum
}
