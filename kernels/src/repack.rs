//! The scalar packer and unpacker of the rows4 weight layout ([`crate::layout`] describes it):
//! the reference the x86 packer must match, the packer of the types that have no x86 one, and
//! how the scalar kernels read rows4 weights.

use crate::dequant::{scale_min_k4, scales_iq4xs};
use crate::layout::{
    group_block_bytes, QuantType, IQ4XS_D, IQ4XS_SCALES, IQ4XS_SUB_BYTES, Q4K_D, Q4K_DMIN,
    Q4K_MINS, Q4K_SCALES, Q5_HIGH_BIT, Q6K_D, Q6K_SCALES,
};

/// Groups of four GGUF rows of `ty` (`rb` bytes per row) in `src` as rows4 groups in `dst`.
pub(crate) fn pack_rows4(ty: QuantType, rb: usize, src: &[u8], dst: &mut [u8]) {
    let (bb, gb) = (ty.block_bytes(), group_block_bytes(ty));
    let group = rb / bb * gb;
    for (dst, src) in dst.chunks_exact_mut(group).zip(src.chunks_exact(4 * rb)) {
        for (b, g) in dst.chunks_exact_mut(gb).enumerate() {
            let blk = |r: usize| &src[r * rb + b * bb..r * rb + (b + 1) * bb];
            pack_group_block(ty, [blk(0), blk(1), blk(2), blk(3)], g);
        }
    }
}

/// Packs four rows' Q6_K super-blocks of one index into a group-block.
fn pack_group_block_q6k(blocks: [&[u8]; 4], out: &mut [u8]) {
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let twos = 0x0303_0303_0303_0303u64;
    for (r, blk) in blocks.iter().enumerate() {
        let (ql, qh) = (&blk[..128], &blk[128..192]);
        for j in 0..8 {
            // values 32j..32j+32: low bits from ql[64 (j / 4) + 32 (j % 2)..] (nibble j % 4 / 2),
            // top bits from qh[32 (j / 4)..] (bit pair j % 4); step k = the 8 bytes at 8k
            let (n, m) = (j / 4, j % 4);
            let step = |k: usize| {
                let low = u64_at(ql, 64 * n + 32 * (m % 2) + 8 * k) >> (4 * (m / 2));
                let top = u64_at(qh, 32 * n + 8 * k) >> (2 * m);
                (low & 0x0f0f_0f0f_0f0f_0f0f) | (top & twos) << 4
            };
            let s3 = step(3);
            for (v, k) in [(0, 0), (1, 1), (2, 2)] {
                let o = 96 * j + 32 * v + 8 * r;
                let packed = step(k) | ((s3 >> (2 * k)) & twos) << 6;
                out[o..o + 8].copy_from_slice(&packed.to_le_bytes());
            }
        }
        for h in 0..2 {
            let o = Q6K_SCALES + 32 * h + 8 * r;
            out[o..o + 8].copy_from_slice(&blk[192 + 8 * h..200 + 8 * h]);
        }
        out[Q6K_D + 2 * r..Q6K_D + 2 * r + 2].copy_from_slice(&blk[208..210]);
    }
}

/// The inverse of [`pack_group_block_q6k`]: row `r`'s GGUF super-block into `out`.
fn unpack_group_block_q6k(g: &[u8], r: usize, out: &mut [u8]) {
    out[..210].fill(0);
    for j in 0..8 {
        let (n, m) = (j / 4, j % 4);
        for i in 0..8 {
            let byte = |v: usize| g[96 * j + 32 * v + 8 * r + i];
            let s3 = (0..3).fold(0, |acc, v| acc | (byte(v) >> 6) << (2 * v));
            for k in 0..4 {
                let v = if k < 3 { byte(k) & 0x3f } else { s3 };
                out[64 * n + 32 * (m % 2) + 8 * k + i] |= (v & 0x0f) << (4 * (m / 2));
                out[128 + 32 * n + 8 * k + i] |= (v >> 4) << (2 * m);
            }
        }
    }
    for h in 0..2 {
        let o = Q6K_SCALES + 32 * h + 8 * r;
        out[192 + 8 * h..200 + 8 * h].copy_from_slice(&g[o..o + 8]);
    }
    out[208..210].copy_from_slice(&g[Q6K_D + 2 * r..Q6K_D + 2 * r + 2]);
}

/// Packs four rows' Q4_K super-blocks of one index into a group-block.
fn pack_group_block_q4k(blocks: [&[u8]; 4], out: &mut [u8]) {
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    for (r, blk) in blocks.iter().enumerate() {
        let qs = &blk[16..144];
        for j in 0..8 {
            // sub-block j: low (even j) or high (odd j) nibbles of qs[32 (j / 2)..][..32];
            // its step k is the 8 bytes at 8k
            let shift = 4 * (j % 2) as u32;
            let step =
                |k: usize| (u64_at(qs, 32 * (j / 2) + 8 * k) >> shift) & 0x0f0f_0f0f_0f0f_0f0f;
            let o = 64 * j + 8 * r;
            out[o..o + 8].copy_from_slice(&(step(0) | step(1) << 4).to_le_bytes());
            out[o + 32..o + 40].copy_from_slice(&(step(2) | step(3) << 4).to_le_bytes());
        }
        let (sc, mn) = scale_min_k4(&blk[4..16]);
        out[Q4K_SCALES + 8 * r..Q4K_SCALES + 8 * r + 8].copy_from_slice(&sc);
        for q in 0..4 {
            let o = Q4K_MINS + 8 * q + 2 * r;
            out[o..o + 2].copy_from_slice(&mn[2 * q..2 * q + 2]);
        }
        out[Q4K_D + 2 * r..Q4K_D + 2 * r + 2].copy_from_slice(&blk[0..2]);
        out[Q4K_DMIN + 2 * r..Q4K_DMIN + 2 * r + 2].copy_from_slice(&blk[2..4]);
    }
}

/// The inverse of [`pack_group_block_q4k`]: row `r`'s GGUF super-block into `out`.
fn unpack_group_block_q4k(g: &[u8], r: usize, out: &mut [u8]) {
    out[..144].fill(0);
    for j in 0..8 {
        for k in 0..4 {
            for i in 0..8 {
                let v = (g[64 * j + 32 * (k / 2) + 8 * r + i] >> (4 * (k % 2))) & 0x0f;
                out[16 + 32 * (j / 2) + 8 * k + i] |= v << (4 * (j % 2));
            }
        }
    }
    let sc = &g[Q4K_SCALES + 8 * r..Q4K_SCALES + 8 * r + 8];
    let mn: Vec<u8> = (0..8)
        .map(|j| g[Q4K_MINS + 8 * (j / 2) + 2 * r + j % 2])
        .collect();
    // the 12-byte packing of eight 6-bit scales and mins (inverse of scale_min_k4)
    let s = &mut out[4..16];
    for j in 0..4 {
        s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        s[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
        s[j + 8] = (sc[j + 4] & 0x0f) | ((mn[j + 4] & 0x0f) << 4);
    }
    out[0..2].copy_from_slice(&g[Q4K_D + 2 * r..Q4K_D + 2 * r + 2]);
    out[2..4].copy_from_slice(&g[Q4K_DMIN + 2 * r..Q4K_DMIN + 2 * r + 2]);
}

/// The 32 signed values of a GGUF block of `ty` (before scaling).
fn block_values(ty: QuantType, b: &[u8]) -> [i8; 32] {
    let mut q = [0i8; 32];
    match ty {
        QuantType::Q8_0 => {
            for (j, v) in q.iter_mut().enumerate() {
                *v = b[2 + j] as i8;
            }
        }
        QuantType::Q4_0 => {
            for j in 0..16 {
                q[j] = (b[2 + j] & 0x0f) as i8 - 8;
                q[j + 16] = (b[2 + j] >> 4) as i8 - 8;
            }
        }
        QuantType::Q5_0 => {
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            for j in 0..16 {
                let hi = |e: usize| (((qh >> e) & 1) << 4) as u8;
                q[j] = ((b[6 + j] & 0x0f) | hi(j)) as i8 - 16;
                q[j + 16] = ((b[6 + j] >> 4) | hi(j + 16)) as i8 - 16;
            }
        }
        _ => unreachable!("no rows4 form for {ty}"),
    }
    q
}

/// A GGUF block of `ty` holding `q` (signed values in the type's range) with scale bits `d`.
fn block_from_values(ty: QuantType, q: &[i8; 32], d: [u8; 2], out: &mut [u8]) {
    out[..2].copy_from_slice(&d);
    match ty {
        QuantType::Q8_0 => {
            for j in 0..32 {
                out[2 + j] = q[j] as u8;
            }
        }
        QuantType::Q4_0 => {
            for j in 0..16 {
                out[2 + j] = (q[j] + 8) as u8 | (((q[j + 16] + 8) as u8) << 4);
            }
        }
        QuantType::Q5_0 => {
            let mut qh = 0u32;
            for j in 0..16 {
                let (lo, hi) = ((q[j] + 16) as u8, (q[j + 16] + 16) as u8);
                out[6 + j] = (lo & 0x0f) | ((hi & 0x0f) << 4);
                qh |= ((lo >> 4) as u32) << j | ((hi >> 4) as u32) << (j + 16);
            }
            out[2..6].copy_from_slice(&qh.to_le_bytes());
        }
        _ => unreachable!("no rows4 form for {ty}"),
    }
}

/// (step, byte) of element `e` of row `r` within a group-block.
fn step_byte(r: usize, e: usize) -> (usize, usize) {
    (e / 8, 8 * r + e % 8)
}

/// Offset of the four f16 scales within a group-block.
fn scales_offset(ty: QuantType) -> usize {
    group_block_bytes(ty) - 8
}

/// What is added to a signed value of `ty` to store it as a nibble (plus fifth bit).
fn unsigned_offset(ty: QuantType) -> i8 {
    match ty {
        QuantType::Q4_0 => 8,
        QuantType::Q5_0 => 16,
        _ => 0,
    }
}

/// Packs four rows' IQ4_XS super-blocks of one index into a group-block: each sub-block as
/// the Q4_0-shaped block (d, its 16 bytes of nibbles) it is, with its scales inserted.
fn pack_group_block_iq4xs(blocks: [&[u8]; 4], out: &mut [u8]) {
    let scales = blocks.map(scales_iq4xs);
    let (subs, d) = out.split_at_mut(IQ4XS_D);
    for r in 0..4 {
        d[2 * r..2 * r + 2].copy_from_slice(&blocks[r][..2]);
    }
    for (j, g) in subs.chunks_exact_mut(IQ4XS_SUB_BYTES).enumerate() {
        let sub = |r: usize| {
            let mut b = [0u8; 18];
            b[..2].copy_from_slice(&blocks[r][..2]);
            b[2..].copy_from_slice(&blocks[r][8 + 16 * j..24 + 16 * j]);
            b
        };
        let subs = [sub(0), sub(1), sub(2), sub(3)];
        let mut q4 = [0u8; 72];
        pack_group_block(
            QuantType::Q4_0,
            [&subs[0], &subs[1], &subs[2], &subs[3]],
            &mut q4,
        );
        g[..64].copy_from_slice(&q4[..64]);
        for r in 0..4 {
            g[IQ4XS_SCALES + r] = scales[r][j] as u8;
        }
    }
}

/// The inverse of [`pack_group_block_iq4xs`]: row `r`'s GGUF super-block into `out`.
fn unpack_group_block_iq4xs(g: &[u8], r: usize, out: &mut [u8]) {
    out[..136].fill(0);
    let mut high = 0u16;
    let (subs, d) = g.split_at(IQ4XS_D);
    for (j, g) in subs.chunks_exact(IQ4XS_SUB_BYTES).enumerate() {
        let mut q4 = [0u8; 72];
        q4[..64].copy_from_slice(&g[..64]);
        q4[64..].copy_from_slice(&d[..8]);
        let mut sub = [0u8; 18];
        unpack_group_block(QuantType::Q4_0, &q4, r, &mut sub);
        out[..2].copy_from_slice(&sub[..2]);
        out[8 + 16 * j..24 + 16 * j].copy_from_slice(&sub[2..]);
        let stored = (g[IQ4XS_SCALES + r] as i8 + 32) as u8;
        out[4 + j / 2] |= (stored & 0x0f) << (4 * (j % 2));
        high |= ((stored >> 4) as u16) << (2 * j);
    }
    out[2..4].copy_from_slice(&high.to_le_bytes());
}

/// Packs four rows' blocks of index `b` (`blocks[r]` is row r's GGUF block) into `out`.
fn pack_group_block(ty: QuantType, blocks: [&[u8]; 4], out: &mut [u8]) {
    match ty {
        QuantType::Q4K => return pack_group_block_q4k(blocks, out),
        QuantType::Q6K => return pack_group_block_q6k(blocks, out),
        QuantType::IQ4XS => return pack_group_block_iq4xs(blocks, out),
        // its blocks have Q4_0's bytes (f16 d, 16 bytes of nibbles), only read differently
        QuantType::IQ4NL => return pack_group_block(QuantType::Q4_0, blocks, out),
        _ => {}
    }
    // steps[k][s]: the stored value (unsigned for Q4_0/Q5_0) of step k, byte s
    let mut steps = [[0u8; 32]; 4];
    let off = unsigned_offset(ty);
    for (r, blk) in blocks.iter().enumerate() {
        let q = block_values(ty, blk);
        for (k, step) in steps.iter_mut().enumerate() {
            for j in 0..8 {
                step[8 * r + j] = q[8 * k + j].wrapping_add(off) as u8;
            }
        }
        let so = scales_offset(ty) + 2 * r;
        out[so..so + 2].copy_from_slice(&blk[..2]);
    }
    if ty == QuantType::Q8_0 {
        for (k, step) in steps.iter().enumerate() {
            out[32 * k..32 * (k + 1)].copy_from_slice(step);
        }
        return;
    }
    for s in 0..32 {
        out[s] = (steps[0][s] & 0x0f) | (steps[1][s] << 4);
        out[32 + s] = (steps[2][s] & 0x0f) | (steps[3][s] << 4);
    }
    if ty == QuantType::Q5_0 {
        out[64..80].fill(0);
        for (k, step) in steps.iter().enumerate() {
            for (s, &u) in step.iter().enumerate() {
                out[64 + s % 16] |= (u >> 4) << Q5_HIGH_BIT[k][s / 16];
            }
        }
    }
}

/// The inverse of [`pack_group_block`]: row `r`'s GGUF block into `out`.
fn unpack_group_block(ty: QuantType, g: &[u8], r: usize, out: &mut [u8]) {
    match ty {
        QuantType::Q4K => return unpack_group_block_q4k(g, r, out),
        QuantType::Q6K => return unpack_group_block_q6k(g, r, out),
        QuantType::IQ4XS => return unpack_group_block_iq4xs(g, r, out),
        QuantType::IQ4NL => return unpack_group_block(QuantType::Q4_0, g, r, out),
        _ => {}
    }
    let mut q = [0i8; 32];
    for (e, v) in q.iter_mut().enumerate() {
        let (k, s) = step_byte(r, e);
        *v = match ty {
            QuantType::Q8_0 => g[32 * k + s] as i8,
            _ => {
                let mut u = (g[32 * (k / 2) + s] >> (4 * (k % 2))) & 0x0f;
                if ty == QuantType::Q5_0 {
                    u |= ((g[64 + s % 16] >> Q5_HIGH_BIT[k][s / 16]) & 1) << 4;
                }
                u as i8 - unsigned_offset(ty)
            }
        };
    }
    let so = scales_offset(ty) + 2 * r;
    block_from_values(ty, &q, [g[so], g[so + 1]], out);
}

/// One group of four rows (rows4 layout) back in GGUF form, `rb` bytes per row, into `out`
/// (`4 * rb` bytes): the scalar reference reads rows4 weights through this.
pub(crate) fn unpack_rows4_group(ty: QuantType, rb: usize, group: &[u8], out: &mut [u8]) {
    let (bb, gb) = (ty.block_bytes(), group_block_bytes(ty));
    for (b, g) in group.chunks_exact(gb).enumerate() {
        for r in 0..4 {
            let o = r * rb + b * bb;
            unpack_group_block(ty, g, r, &mut out[o..o + bb]);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Pseudo-random bytes (xorshift), the same for the same seed.
    pub(crate) fn bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s as u8
            })
            .collect()
    }

    #[test]
    fn round_trip_is_exact() {
        for ty in [
            QuantType::Q4_0,
            QuantType::Q5_0,
            QuantType::Q8_0,
            QuantType::IQ4NL,
            QuantType::IQ4XS,
        ] {
            let (rows, cols) = (8, 256);
            let rb = ty.row_bytes(cols).unwrap();
            let prb = crate::layout::rows4_row_bytes(ty, cols).unwrap();
            let data = bytes(rows * rb, 7);
            let mut packed = vec![0u8; rows * prb];
            pack_rows4(ty, rb, &data, &mut packed);
            let mut back = vec![0u8; data.len()];
            for (g, o) in packed
                .chunks_exact(4 * prb)
                .zip(back.chunks_exact_mut(4 * rb))
            {
                unpack_rows4_group(ty, rb, g, o);
            }
            assert_eq!(back, data, "{ty}");
        }
    }
}
