//! Prefill path (n_tokens >= 4) for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and Q4_K, Q5_K, Q6_K.
//!
//! A panel of 4 weight rows is unpacked once per chunk of tokens into plain
//! bytes, transposed so that each 32-byte vector holds 8 consecutive values of
//! each of the 4 rows ("steps"), plus pre-broadcast scale vectors. The 4 x T
//! micro-kernels then broadcast 8 activation bytes at a time
//! (`vpbroadcastq` from memory) against a step vector, so one `maddubs`
//! serves all four rows, partial sums stay in i16 where the value ranges allow
//! it, and one accumulator per token holds the rows as [r0 r0 r1 r1 r2 r2 r3 r3].
//! Q4_0/Q5_0 are unpacked as unsigned values with the -8/-16 offset folded into
//! a float "min" term (like Q4_1/Q5_1), so only Q8_0 needs the sign trick.

#![allow(clippy::needless_range_loop)]

use super::*;

/// Rows per panel.
pub(super) const PR: usize = 4;
/// Tokens per micro-kernel call.
const PT: usize = 4;
/// Bytes per unpacked block of the panel: values[4][32], signed[4][32], d[8], m[8].
const PB: usize = 4 * 32 * 2 + 64;
const OFF_SGN: usize = 128;
const OFF_D: usize = 256;
const OFF_M: usize = 288;

thread_local! {
    static PANEL: std::cell::Cell<Vec<u64>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Unsigned values only (d and m are not read by callers that gather them).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn unpack32u_vals<const K: u8>(p: *const u8) -> (__m256i, f32, f32) {
    match K {
        K_Q4_0 => (nibbles32(p.add(2)), 0.0, 0.0),
        K_Q4_1 => (nibbles32(p.add(4)), 0.0, 0.0),
        K_Q5_0 => {
            let hb = bits32(p.add(2));
            (
                _mm256_or_si256(
                    nibbles32(p.add(6)),
                    _mm256_and_si256(hb, _mm256_set1_epi8(0x10)),
                ),
                0.0,
                0.0,
            )
        }
        _ => {
            let hb = bits32(p.add(4));
            (
                _mm256_or_si256(
                    nibbles32(p.add(8)),
                    _mm256_and_si256(hb, _mm256_set1_epi8(0x10)),
                ),
                0.0,
                0.0,
            )
        }
    }
}

/// Unsigned unpack: (values >= 0, d, m) with x = d * v + m.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack32u<const K: u8>(p: *const u8) -> (__m256i, f32, f32) {
    match K {
        K_Q4_0 => {
            let d = f16_ld(p);
            (nibbles32(p.add(2)), d, -8.0 * d)
        }
        K_Q5_0 => {
            let d = f16_ld(p);
            let hb = bits32(p.add(2));
            let w = _mm256_or_si256(
                nibbles32(p.add(6)),
                _mm256_and_si256(hb, _mm256_set1_epi8(0x10)),
            );
            (w, d, -16.0 * d)
        }
        _ => unpack32::<K>(p),
    }
}

/// Stores four 32-byte row vectors as four "step" vectors: step k holds bytes
/// 8k..8k+8 of rows 0, 1, 2, 3 (so one broadcast 8-byte activation chunk meets
/// all four rows in a single maddubs).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn store_steps(v: [__m256i; 4], dst: *mut u8) {
    // 4x4 transpose of 64-bit elements
    let t0 = _mm256_unpacklo_epi64(v[0], v[1]); // r0q0 r1q0 | r0q2 r1q2
    let t1 = _mm256_unpackhi_epi64(v[0], v[1]); // r0q1 r1q1 | r0q3 r1q3
    let t2 = _mm256_unpacklo_epi64(v[2], v[3]);
    let t3 = _mm256_unpackhi_epi64(v[2], v[3]);
    let s0 = _mm256_permute2x128_si256::<0x20>(t0, t2);
    let s1 = _mm256_permute2x128_si256::<0x20>(t1, t3);
    let s2 = _mm256_permute2x128_si256::<0x31>(t0, t2);
    let s3 = _mm256_permute2x128_si256::<0x31>(t1, t3);
    _mm256_storeu_si256(dst as *mut __m256i, s0);
    _mm256_storeu_si256(dst.add(32) as *mut __m256i, s1);
    _mm256_storeu_si256(dst.add(64) as *mut __m256i, s2);
    _mm256_storeu_si256(dst.add(96) as *mut __m256i, s3);
}

/// Unpacks rows `0..nr` (nr <= 4) of `nb` blocks into `panel`; missing rows are zero.
/// Per block: value steps[4] (|w| for Q8_0, unsigned values otherwise), signed
/// steps[4] (Q8_0 only), d as [d0 d0 d1 d1 d2 d2 d3 d3], m as [m0 0 m1 0 ..].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack_panel<const K: u8>(w: *const u8, rb: usize, nr: usize, nb: usize, panel: *mut u8) {
    let bb = q32_block_bytes(K);
    for b in 0..nb {
        let pb = panel.add(b * PB);
        let mut vals = [_mm256_setzero_si256(); 4];
        let mut sgn = [_mm256_setzero_si256(); 4];
        for r in 0..PR {
            let (v, d, m) = if r < nr {
                if K == K_Q8_0 {
                    let (v, d, _) = unpack32::<K>(w.add(r * rb + b * bb));
                    sgn[r] = v;
                    (_mm256_sign_epi8(v, v), d, 0.0)
                } else {
                    unpack32u::<K>(w.add(r * rb + b * bb))
                }
            } else {
                (_mm256_setzero_si256(), 0.0, 0.0)
            };
            vals[r] = v;
            let df = pb.add(OFF_D) as *mut f32;
            *df.add(2 * r) = d;
            *df.add(2 * r + 1) = d;
            let mf = pb.add(OFF_M) as *mut f32;
            *mf.add(2 * r) = m;
            *mf.add(2 * r + 1) = 0.0;
        }
        store_steps(vals, pb);
        if K == K_Q8_0 {
            store_steps(sgn, pb.add(OFF_SGN));
        }
    }
}

/// 4 rows x T tokens over `nb` blocks. Accumulator lanes are [r0 r0 r1 r1 r2 r2 r3 r3].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn micro<const SIGNED: bool, const T: usize>(
    panel: *const u8,
    nb: usize,
    a: *const BlockQ8,
    astride: usize,
) -> [[f32; T]; PR] {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); T];
    let mut ap = [a; T];
    for t in 0..T {
        ap[t] = a.add(t * astride);
    }
    let bq = |p: *const u8, k: usize| {
        _mm256_set1_epi64x(std::ptr::read_unaligned(p.add(8 * k) as *const i64))
    };
    for b in 0..nb {
        let pb = panel.add(b * PB);
        let dw = _mm256_loadu_ps(pb.add(OFF_D) as *const f32);
        let w0 = ld256(pb);
        let w1 = ld256(pb.add(32));
        let w2 = ld256(pb.add(64));
        let w3 = ld256(pb.add(96));
        if SIGNED {
            let s0 = ld256(pb.add(OFF_SGN));
            let s1 = ld256(pb.add(OFF_SGN + 32));
            let s2 = ld256(pb.add(OFF_SGN + 64));
            let s3 = ld256(pb.add(OFF_SGN + 96));
            for t in 0..T {
                let ab = &*ap[t].add(b);
                let aq = ab.qs.as_ptr() as *const u8;
                let p0 = _mm256_madd_epi16(
                    _mm256_maddubs_epi16(w0, _mm256_sign_epi8(bq(aq, 0), s0)),
                    ones,
                );
                let p1 = _mm256_madd_epi16(
                    _mm256_maddubs_epi16(w1, _mm256_sign_epi8(bq(aq, 1), s1)),
                    ones,
                );
                let p2 = _mm256_madd_epi16(
                    _mm256_maddubs_epi16(w2, _mm256_sign_epi8(bq(aq, 2), s2)),
                    ones,
                );
                let p3 = _mm256_madd_epi16(
                    _mm256_maddubs_epi16(w3, _mm256_sign_epi8(bq(aq, 3), s3)),
                    ones,
                );
                let h = _mm256_add_epi32(_mm256_add_epi32(p0, p1), _mm256_add_epi32(p2, p3));
                let sc = _mm256_mul_ps(dw, _mm256_broadcast_ss(&ab.d));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), sc, acc[t]);
            }
        } else {
            let m = _mm256_loadu_ps(pb.add(OFF_M) as *const f32);
            for t in 0..T {
                let ab = &*ap[t].add(b);
                let aq = ab.qs.as_ptr() as *const u8;
                // |8 products| <= 8 * 31 * 127 < 2^15: i16 adds cannot overflow
                let p = _mm256_add_epi16(
                    _mm256_add_epi16(
                        _mm256_maddubs_epi16(w0, bq(aq, 0)),
                        _mm256_maddubs_epi16(w1, bq(aq, 1)),
                    ),
                    _mm256_add_epi16(
                        _mm256_maddubs_epi16(w2, bq(aq, 2)),
                        _mm256_maddubs_epi16(w3, bq(aq, 3)),
                    ),
                );
                let h = _mm256_madd_epi16(p, ones);
                let sc = _mm256_mul_ps(dw, _mm256_broadcast_ss(&ab.d));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), sc, acc[t]);
                acc[t] = _mm256_fmadd_ps(m, _mm256_broadcast_ss(&ab.s), acc[t]);
            }
        }
    }
    finish(acc)
}

/// [r0 r0 r1 r1 r2 r2 r3 r3] accumulators -> out[row][token].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn finish<const T: usize>(acc: [__m256; T]) -> [[f32; T]; PR] {
    let mut out = [[0f32; T]; PR];
    for t in 0..T {
        let mut c = [0f32; 8];
        _mm256_storeu_ps(c.as_mut_ptr(), acc[t]);
        for r in 0..PR {
            out[r][t] = c[2 * r] + c[2 * r + 1];
        }
    }
    out
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn run_tokens<const SIGNED: bool>(
    panel: *const u8,
    nb: usize,
    a: *const BlockQ8,
    t0: usize,
    t1: usize,
    nr: usize,
    y: *mut f32,
    ystride: usize,
) {
    let mut t = t0;
    while t + PT <= t1 {
        let o = micro::<SIGNED, PT>(panel, nb, a.add(t * nb), nb);
        for r in 0..nr {
            for j in 0..PT {
                *y.add((t + j) * ystride + r) = o[r][j];
            }
        }
        t += PT;
    }
    while t < t1 {
        let o = micro::<SIGNED, 1>(panel, nb, a.add(t * nb), nb);
        for r in 0..nr {
            *y.add(t * ystride + r) = o[r][0];
        }
        t += 1;
    }
}

/// Rows `0..nrows` at `w` (row stride `rb`), all `ntok` tokens of `a` (nb blocks each).
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_panel_q32<const K: u8>(
    w: *const u8,
    rb: usize,
    nrows: usize,
    a: *const BlockQ8,
    nb: usize,
    ntok: usize,
    y: *mut f32,
    ystride: usize,
) {
    let mut buf = PANEL.with(|c| c.take());
    buf.resize((nb * PB).div_ceil(8), 0); // u64-backed: 8-byte aligned f32/i16 fields
    let panel = buf.as_mut_ptr() as *mut u8;
    // tokens per chunk: keep the chunk's activations within ~256 KiB (L2)
    let tch = ((256 << 10) / (nb * size_of::<BlockQ8>())).clamp(12, 192) / PT * PT;
    let mut tc = 0;
    while tc < ntok {
        let te = (tc + tch).min(ntok);
        let mut r = 0;
        while r < nrows {
            let nr = (nrows - r).min(PR);
            unpack_panel::<K>(w.add(r * rb), rb, nr, nb, panel);
            if K == K_Q8_0 {
                run_tokens::<true>(panel, nb, a, tc, te, nr, y.add(r), ystride);
            } else {
                run_tokens::<false>(panel, nb, a, tc, te, nr, y.add(r), ystride);
            }
            r += PR;
        }
        tc = te;
    }
    PANEL.with(|c| c.set(buf));
}

// ---------------------------------------------------------------------------
// K-quants (Q4_K, Q5_K, Q6_K) prefill path.
//
// Panel of 4 rows per 256-element super-block (same broadcast layout as above):
//   vals [8 sub-blocks][4 steps][4 rows x 8 bytes]   unsigned values
//   scl  Q4_K/Q5_K: [8 sub-blocks][r0 x4, r1 x4, r2 x4, r3 x4] i16
//        Q6_K:      [16 groups of 16][same]
//   minv [4 steps][4 rows x 4 i16]: factors of the 16 activation bsums
//        (Q4_K/Q5_K: min of sub-block g/2; Q6_K: scale of group g)
//   d8, dmin8: [d0 d0 d1 d1 d2 d2 d3 d3] (f32)

const KPB_VALS: usize = 0;
const KPB_SCL: usize = 1024;
const KPB_MINV: usize = 1024 + 512;
const KPB_D: usize = KPB_MINV + 128;
const KPB_DMIN: usize = KPB_D + 32;
const KPB: usize = KPB_DMIN + 32;

/// Unpacks rows `0..nr` (nr <= 4) of `nb` super-blocks of a K-quant into the panel.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack_panel_k<const K: u8>(
    w: *const u8,
    rb: usize,
    nr: usize,
    nb: usize,
    panel: *mut u8,
) {
    let m4 = _mm256_set1_epi8(0x0f);
    let m3 = _mm256_set1_epi8(3);
    let one = _mm256_set1_epi8(1);
    let two = _mm256_set1_epi8(2);
    for b in 0..nb {
        let pb = panel.add(b * KPB);
        let scl = pb.add(KPB_SCL) as *mut i16;
        let minv = pb.add(KPB_MINV) as *mut i16;
        let d8 = pb.add(KPB_D) as *mut f32;
        let dmin8 = pb.add(KPB_DMIN) as *mut f32;
        // vals[j][r]: 32 values of sub-block j of row r
        let mut vals = [[_mm256_setzero_si256(); PR]; 8];
        // per row: 16 group scales (Q6_K) or 8 sub-block scales; 16 bsum factors
        let mut gs = [[0i16; 16]; PR];
        let mut bf = [[0i16; 16]; PR];
        let mut dd = [0f32; PR];
        let mut dm = [0f32; PR];
        for r in 0..nr {
            let p = w.add(r * rb + b * K_BLOCK_BYTES[K as usize]);
            if K == K_Q6K {
                dd[r] = f16_ld(p.add(208));
                let sc = p.add(192) as *const i8;
                for n in 0..2 {
                    let qla = ld256(p.add(64 * n));
                    let qlb = ld256(p.add(64 * n + 32));
                    let qh = ld256(p.add(128 + 32 * n));
                    vals[4 * n][r] = _mm256_or_si256(
                        _mm256_and_si256(qla, m4),
                        _mm256_slli_epi16::<4>(_mm256_and_si256(qh, m3)),
                    );
                    vals[4 * n + 1][r] = _mm256_or_si256(
                        _mm256_and_si256(qlb, m4),
                        _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<2>(qh), m3)),
                    );
                    vals[4 * n + 2][r] = _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(qla), m4),
                        _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<4>(qh), m3)),
                    );
                    vals[4 * n + 3][r] = _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(qlb), m4),
                        _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<6>(qh), m3)),
                    );
                }
                for g in 0..16 {
                    gs[r][g] = *sc.add(g) as i16;
                    bf[r][g] = *sc.add(g) as i16;
                }
            } else {
                let five = K == K_Q5K;
                dd[r] = f16_ld(p);
                dm[r] = f16_ld(p.add(2));
                let (sc, mn) =
                    crate::dequant::scale_min_k4(std::slice::from_raw_parts(p.add(4), 12));
                let qs = p.add(if five { 48 } else { 16 });
                let qhv = if five {
                    ld256(p.add(16))
                } else {
                    _mm256_setzero_si256()
                };
                for jj in 0..4 {
                    let q = ld256(qs.add(32 * jj));
                    let mut lo = _mm256_and_si256(q, m4);
                    let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
                    if five {
                        let h = _mm256_srl_epi16(qhv, _mm_cvtsi32_si128(2 * jj as i32));
                        lo = _mm256_or_si256(lo, _mm256_slli_epi16::<4>(_mm256_and_si256(h, one)));
                        hi = _mm256_or_si256(hi, _mm256_slli_epi16::<3>(_mm256_and_si256(h, two)));
                    }
                    vals[2 * jj][r] = lo;
                    vals[2 * jj + 1][r] = hi;
                }
                for j in 0..8 {
                    gs[r][j] = sc[j] as i16;
                }
                for g in 0..16 {
                    bf[r][g] = mn[g / 2] as i16;
                }
            }
        }
        for j in 0..8 {
            store_steps(vals[j], pb.add(KPB_VALS + 128 * j));
        }
        let ngs = if K == K_Q6K { 16 } else { 8 };
        for g in 0..ngs {
            for r in 0..PR {
                for c in 0..4 {
                    *scl.add(16 * g + 4 * r + c) = gs[r][g];
                }
            }
        }
        for q in 0..4 {
            for r in 0..PR {
                for c in 0..4 {
                    *minv.add(16 * q + 4 * r + c) = bf[r][4 * q + c];
                }
            }
        }
        for r in 0..PR {
            *d8.add(2 * r) = dd[r];
            *d8.add(2 * r + 1) = dd[r];
            *dmin8.add(2 * r) = dm[r];
            *dmin8.add(2 * r + 1) = dm[r];
        }
    }
}

const K_BLOCK_BYTES: [usize; 9] = [0, 0, 0, 0, 0, 144, 176, 210, 292];

/// 4 rows x T tokens over `nb` super-blocks; accumulator lanes [r0 r0 r1 r1 r2 r2 r3 r3].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn micro_k<const SIX: bool, const T: usize>(
    panel: *const u8,
    nb: usize,
    a: *const BlockQ8K,
    astride: usize,
) -> [[f32; T]; PR] {
    let mut acc = [_mm256_setzero_ps(); T];
    let mut ap = [a; T];
    for t in 0..T {
        ap[t] = a.add(t * astride);
    }
    let bq = |p: *const u8| _mm256_set1_epi64x(std::ptr::read_unaligned(p as *const i64));
    for b in 0..nb {
        let pb = panel.add(b * KPB);
        let mut isum = [_mm256_setzero_si256(); T];
        for j in 0..8 {
            let vp = pb.add(KPB_VALS + 128 * j);
            let w0 = ld256(vp);
            let w1 = ld256(vp.add(32));
            let w2 = ld256(vp.add(64));
            let w3 = ld256(vp.add(96));
            if SIX {
                let sa = ld256(pb.add(KPB_SCL + 64 * j));
                let sb = ld256(pb.add(KPB_SCL + 64 * j + 32));
                for t in 0..T {
                    let aq = ((*ap[t].add(b)).qs.as_ptr() as *const u8).add(32 * j);
                    // |4 products| <= 4 * 63 * 127 < 2^15
                    let pa = _mm256_add_epi16(
                        _mm256_maddubs_epi16(w0, bq(aq)),
                        _mm256_maddubs_epi16(w1, bq(aq.add(8))),
                    );
                    let pbb = _mm256_add_epi16(
                        _mm256_maddubs_epi16(w2, bq(aq.add(16))),
                        _mm256_maddubs_epi16(w3, bq(aq.add(24))),
                    );
                    isum[t] = _mm256_add_epi32(
                        isum[t],
                        _mm256_add_epi32(_mm256_madd_epi16(pa, sa), _mm256_madd_epi16(pbb, sb)),
                    );
                }
            } else {
                let s = ld256(pb.add(KPB_SCL + 32 * j));
                for t in 0..T {
                    let aq = ((*ap[t].add(b)).qs.as_ptr() as *const u8).add(32 * j);
                    // |8 products| <= 8 * 31 * 127 < 2^15
                    let p = _mm256_add_epi16(
                        _mm256_add_epi16(
                            _mm256_maddubs_epi16(w0, bq(aq)),
                            _mm256_maddubs_epi16(w1, bq(aq.add(8))),
                        ),
                        _mm256_add_epi16(
                            _mm256_maddubs_epi16(w2, bq(aq.add(16))),
                            _mm256_maddubs_epi16(w3, bq(aq.add(24))),
                        ),
                    );
                    isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(p, s));
                }
            }
        }
        let d8 = _mm256_loadu_ps(pb.add(KPB_D) as *const f32);
        let mv = pb.add(KPB_MINV);
        let (m0, m1, m2, m3) = (
            ld256(mv),
            ld256(mv.add(32)),
            ld256(mv.add(64)),
            ld256(mv.add(96)),
        );
        for t in 0..T {
            let ab = &*ap[t].add(b);
            let bp = ab.bsums.as_ptr() as *const u8;
            let mi = _mm256_add_epi32(
                _mm256_add_epi32(
                    _mm256_madd_epi16(bq(bp), m0),
                    _mm256_madd_epi16(bq(bp.add(8)), m1),
                ),
                _mm256_add_epi32(
                    _mm256_madd_epi16(bq(bp.add(16)), m2),
                    _mm256_madd_epi16(bq(bp.add(24)), m3),
                ),
            );
            let da = _mm256_broadcast_ss(&ab.d);
            if SIX {
                let i = _mm256_sub_epi32(isum[t], _mm256_slli_epi32::<5>(mi));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_mul_ps(d8, da), acc[t]);
            } else {
                let dmin8 = _mm256_loadu_ps(pb.add(KPB_DMIN) as *const f32);
                acc[t] =
                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), _mm256_mul_ps(d8, da), acc[t]);
                acc[t] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(mi), _mm256_mul_ps(dmin8, da), acc[t]);
            }
        }
    }
    finish(acc)
}

/// Rows `0..nrows` at `w` (row stride `rb`), all `ntok` tokens of `a` (nb super-blocks each).
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_panel_k<const K: u8>(
    w: *const u8,
    rb: usize,
    nrows: usize,
    a: *const BlockQ8K,
    nb: usize,
    ntok: usize,
    y: *mut f32,
    ystride: usize,
) {
    const KT: usize = 4;
    let mut buf = PANEL.with(|c| c.take());
    buf.resize((nb * KPB).div_ceil(8), 0);
    let panel = buf.as_mut_ptr() as *mut u8;
    let tch = ((256 << 10) / (nb * size_of::<BlockQ8K>())).clamp(8, 192) / KT * KT;
    let mut tc = 0;
    while tc < ntok {
        let te = (tc + tch).min(ntok);
        let mut r = 0;
        while r < nrows {
            let nr = (nrows - r).min(PR);
            unpack_panel_k::<K>(w.add(r * rb), rb, nr, nb, panel);
            let yr = y.add(r);
            let mut t = tc;
            while t < te {
                if t + KT <= te {
                    let o = if K == K_Q6K {
                        micro_k::<true, KT>(panel, nb, a.add(t * nb), nb)
                    } else {
                        micro_k::<false, KT>(panel, nb, a.add(t * nb), nb)
                    };
                    for rr in 0..nr {
                        for j in 0..KT {
                            *yr.add((t + j) * ystride + rr) = o[rr][j];
                        }
                    }
                    t += KT;
                } else {
                    let o = if K == K_Q6K {
                        micro_k::<true, 1>(panel, nb, a.add(t * nb), nb)
                    } else {
                        micro_k::<false, 1>(panel, nb, a.add(t * nb), nb)
                    };
                    for rr in 0..nr {
                        *yr.add(t * ystride + rr) = o[rr][0];
                    }
                    t += 1;
                }
            }
            r += PR;
        }
        tc = te;
    }
    PANEL.with(|c| c.set(buf));
}
