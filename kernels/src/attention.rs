//! Attention of a forward pass on the CPU (prompt chunks, decode steps, continuous batching),
//! read straight from each sequence's preallocated f32 KV cache.
//!
//! A decode step's attention is tiny arithmetic spread over many small tensors; built from
//! general tensor ops it costs a dozen allocations and copies per sequence and layer, more than
//! the arithmetic. Here one call covers every sequence of the step: tasks are (sequence, KV head,
//! block of query tokens) triples, so the query heads that share a KV head read its cache rows
//! once, and the tasks run on the current rayon pool.

use crate::layout::YPtr;
use crate::Backend;
use std::cell::Cell;

thread_local! {
    static SCORES: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    static TILES: Cell<Tiles> = const { Cell::new(Tiles::new()) };
}

/// A thread's buffers for [`Task::run_tiled`] and [`Task::run_narrow`], grown to the largest
/// task it has run.
struct Tiles {
    /// The task's queries, scaled: one row per (token, head) (tiled), or one column (narrow,
    /// `[head_dim, 16]`).
    q: Vec<f32>,
    /// Tiled: a chunk of keys, transposed, `[head_dim, keys]`. Narrow: the scores with one
    /// column per query row, `[keys, 16]`.
    kt: Vec<f32>,
    /// Scores, then probabilities: `[rows, keys]` (of the chunk, when tiled).
    s: Vec<f32>,
    /// Output rows (tiled: not yet divided by their softmax sums).
    o: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
}

impl Tiles {
    const fn new() -> Tiles {
        Tiles {
            q: Vec::new(),
            kt: Vec::new(),
            s: Vec::new(),
            o: Vec::new(),
            max: Vec::new(),
            sum: Vec::new(),
        }
    }
}

impl Default for Tiles {
    fn default() -> Tiles {
        Tiles::new()
    }
}

/// Keys per chunk of [`Task::run_tiled`]: the chunk's transposed keys, scores and values stay in
/// L2 while every row of the task uses them.
const KEY_CHUNK: usize = 256;

/// `v` holding `n` copies of `x`, with room for `room` values: buffers sized for the largest
/// step at once, so that decode steps allocate nothing as the context grows.
fn grow(v: &mut Vec<f32>, n: usize, room: usize, x: f32) {
    v.clear();
    v.reserve(room.max(n));
    v.resize(n, x);
}

/// Shapes shared by all sequences of a step.
#[derive(Clone, Copy, Debug)]
pub struct AttnDims {
    pub n_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// One sequence of the step: its cache buffers, `[kv_heads, capacity, head_dim]` (the capacity
/// is the sequence's own), whose first `pos + n` positions are written (the `n` new ones
/// included), and its `n` queries, which sit at positions `pos..pos + n` and see the keys up to
/// their own position.
#[derive(Clone, Copy, Debug)]
pub struct CachedSeq<'a> {
    pub keys: &'a [f32],
    pub values: &'a [f32],
    pub pos: usize,
    pub n: usize,
}

impl CachedSeq<'_> {
    fn capacity(&self, kv_heads: usize, head_dim: usize) -> usize {
        self.keys.len() / (kv_heads * head_dim)
    }
}

/// Below this many multiply-adds a step runs on the calling thread.
const MIN_PARALLEL_WORK: usize = 1 << 15;

/// `q` and `y`: `[tokens, n_heads, head_dim]`, the sequences' tokens one after another.
/// `y = softmax(q k^T * scale + causal mask) v` per head, each sequence on its own cache.
pub fn cached_attention(dims: AttnDims, q: &[f32], seqs: &[CachedSeq], scale: f32, y: &mut [f32]) {
    cached_attention_with(Backend::detect(), dims, q, seqs, scale, y)
}

pub fn cached_attention_with(
    backend: Backend,
    dims: AttnDims,
    q: &[f32],
    seqs: &[CachedSeq],
    scale: f32,
    y: &mut [f32],
) {
    let AttnDims {
        n_heads,
        kv_heads,
        head_dim: d,
    } = dims;
    assert!(
        kv_heads > 0 && n_heads.is_multiple_of(kv_heads),
        "{n_heads} query heads cannot share {kv_heads} KV heads"
    );
    let tokens: usize = seqs.iter().map(|s| s.n).sum();
    assert_eq!(q.len(), tokens * n_heads * d, "queries: wrong length");
    assert_eq!(y.len(), q.len(), "output: wrong length");
    let mut work = 0;
    for s in seqs {
        assert!(
            s.keys.len() == s.values.len() && s.keys.len().is_multiple_of(kv_heads * d),
            "cache buffers of the wrong size"
        );
        assert!(
            s.pos + s.n <= s.capacity(kv_heads, d),
            "sequence runs past its cache"
        );
        work += s.n * (s.pos + s.n) * n_heads * d;
    }
    let out = YPtr(y.as_mut_ptr());
    let task = |t: usize| {
        // SAFETY: tasks write disjoint (row, head) blocks of `y`, which outlives them.
        unsafe { task_at(dims, seqs, scale, t).run(backend, q, out) }
    };
    let n_tasks = seqs
        .iter()
        .map(|s| s.n.div_ceil(QUERY_BLOCK))
        .sum::<usize>()
        * kv_heads;
    if work < MIN_PARALLEL_WORK || rayon::current_num_threads() < 2 {
        (0..n_tasks).for_each(task);
    } else {
        crate::pool::for_each(n_tasks, task);
    }
}

/// Query tokens per task: a prompt chunk's attention splits into many tasks (so that all
/// threads share it), a decode step's is one per (sequence, KV head).
const QUERY_BLOCK: usize = 32;

/// Up to this many new tokens of a sequence in a step (a decode step with its drafts), each
/// token's attention gives the same bits as a step of that token alone: speculative decoding
/// checks drafts in such steps, and must sample what plain decoding would.
pub const EXACT_STEP_TOKENS: usize = 24;

/// Task `t` of a step: the sequences' query blocks, each sequence's from its last (which sees
/// the most keys, so the longest tasks are claimed first) to its first, times the KV heads.
fn task_at<'a>(dims: AttnDims, seqs: &[CachedSeq<'a>], scale: f32, mut t: usize) -> Task<'a> {
    let mut row0 = 0;
    for &seq in seqs {
        let blocks = seq.n.div_ceil(QUERY_BLOCK);
        if t < blocks * dims.kv_heads {
            let first = (blocks - 1 - t / dims.kv_heads) * QUERY_BLOCK;
            return Task {
                dims,
                seq,
                kv_head: t % dims.kv_heads,
                row0,
                queries: first..(first + QUERY_BLOCK).min(seq.n),
                scale,
            };
        }
        t -= blocks * dims.kv_heads;
        row0 += seq.n;
    }
    unreachable!("task {t} past the step's tasks")
}

/// The query heads of one KV head, for a block of one sequence's tokens.
struct Task<'a> {
    dims: AttnDims,
    seq: CachedSeq<'a>,
    kv_head: usize,
    /// The step's rows before this sequence's.
    row0: usize,
    /// This task's tokens of the sequence.
    queries: std::ops::Range<usize>,
    scale: f32,
}

/// A task's view of its sequence's cache (its KV head's rows, up to the last key its tokens see)
/// and its shape.
struct Span<'a> {
    keys: &'a [f32],
    values: &'a [f32],
    /// Position of the sequence's first new token.
    pos: usize,
    /// Keys seen by the task's last token.
    seen: usize,
    /// Query rows: the task's (token, query head) pairs, token-major.
    rows: usize,
    /// Positions in the cache buffers.
    capacity: usize,
}

impl<'a> Task<'a> {
    fn span(&self) -> Span<'a> {
        let AttnDims {
            n_heads,
            kv_heads,
            head_dim: d,
        } = self.dims;
        let capacity = self.seq.capacity(kv_heads, d);
        let base = self.kv_head * capacity * d;
        let seen = self.seq.pos + self.queries.end;
        Span {
            keys: &self.seq.keys[base..base + seen * d],
            values: &self.seq.values[base..base + seen * d],
            pos: self.seq.pos,
            seen,
            rows: self.queries.len() * (n_heads / kv_heads),
            capacity,
        }
    }

    /// The token (of the sequence) of query row `r`.
    fn token(&self, r: usize) -> usize {
        self.queries.start + r / (self.dims.n_heads / self.dims.kv_heads)
    }

    /// Where query row `r` sits in the step's queries (and its output in `y`).
    fn q_at(&self, r: usize) -> usize {
        let group = self.dims.n_heads / self.dims.kv_heads;
        ((self.row0 + self.token(r)) * self.dims.n_heads + self.kv_head * group + r % group)
            * self.dims.head_dim
    }
}

impl Task<'_> {
    /// # Safety
    /// `y` must be valid for the whole output and no one else may write this task's block.
    unsafe fn run(&self, backend: Backend, q: &[f32], y: YPtr) {
        let AttnDims {
            n_heads,
            kv_heads,
            head_dim,
        } = self.dims;
        if head_dim.is_multiple_of(crate::f32_gemm::COLS) {
            let group = n_heads / kv_heads;
            return match self.queries.len() * group {
                rows if rows <= crate::f32_gemm::COLS => self.run_narrow(backend, q, y),
                _ if self.queries.len() <= EXACT_STEP_TOKENS && group <= crate::f32_gemm::COLS => {
                    // In pieces of whole tokens that fit the narrow kernel, each token's result
                    // is what a step of that token alone gives.
                    let per = crate::f32_gemm::COLS / group;
                    let mut start = self.queries.start;
                    while start < self.queries.end {
                        let end = (start + per).min(self.queries.end);
                        let piece = Task {
                            queries: start..end,
                            ..*self
                        };
                        piece.run_narrow(backend, q, y);
                        start = end;
                    }
                }
                _ => self.run_tiled(backend, q, y),
            };
        }
        match backend {
            #[cfg(target_arch = "x86_64")]
            level if level.is_simd() => self.run_avx2(q, y),
            _ => self.run_portable(Backend::Scalar, q, y),
        }
    }

    /// Up to 16 query rows (a decode step's query heads of one KV head): the scores as one
    /// product of the keys, as they lie in the cache, with the rows as its 16 columns (no key is
    /// copied, unlike [`run_tiled`](Self::run_tiled), whose many rows pay for that), turned into
    /// rows for the softmax, then one product of the probabilities with the values.
    ///
    /// # Safety
    /// As [`run`](Self::run).
    unsafe fn run_narrow(&self, backend: Backend, q: &[f32], y: YPtr) {
        use crate::f32_gemm::{gemm, COLS};
        let Span {
            keys,
            values,
            pos,
            seen,
            rows,
            capacity,
        } = self.span();
        let (d, token, q_at) = (self.dims.head_dim, |r| self.token(r), |r| self.q_at(r));

        let mut t = TILES.with(|c| c.take());
        // t.q: the rows as columns, [d, COLS]; t.kt: the scores that way, [seen, COLS].
        grow(&mut t.q, d * COLS, 0, 0.0);
        grow(&mut t.kt, seen * COLS, capacity * COLS, 0.0);
        grow(&mut t.s, rows * seen, COLS * capacity, 0.0);
        grow(&mut t.o, rows * d, 0, 0.0);
        for r in 0..rows {
            for (c, &v) in q[q_at(r)..q_at(r) + d].iter().enumerate() {
                t.q[c * COLS + r] = v * self.scale;
            }
        }
        gemm(
            backend,
            (seen, COLS, d),
            (keys, d),
            (&t.q, COLS),
            (&mut t.kt, COLS),
            false,
        );
        for r in 0..rows {
            // Causal: the row's token sees keys up to its own position.
            let valid = pos + token(r) + 1;
            let s = &mut t.s[r * seen..(r + 1) * seen];
            for (j, x) in s[..valid].iter_mut().enumerate() {
                *x = t.kt[j * COLS + r];
            }
            let max = s[..valid].iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let inv = 1.0 / crate::elementwise::exp_shifted(backend, &mut s[..valid], max);
            s[..valid].iter_mut().for_each(|x| *x *= inv);
            s[valid..].fill(0.0);
        }
        gemm(
            backend,
            (rows, d, seen),
            (&t.s, seen),
            (values, d),
            (&mut t.o, d),
            false,
        );
        for (r, o) in t.o.chunks_exact(d).enumerate() {
            std::slice::from_raw_parts_mut(y.0.add(q_at(r)), d).copy_from_slice(o);
        }
        TILES.with(|c| c.set(t));
    }

    /// Several tokens at once, as matrix products over chunks of the keys with a running
    /// softmax (the chunk's scores never need the whole context in memory): rows are the
    /// task's (token, query head) pairs, so each key and value is read once per chunk for all.
    ///
    /// # Safety
    /// As [`run`](Self::run).
    unsafe fn run_tiled(&self, backend: Backend, q: &[f32], y: YPtr) {
        use crate::f32_gemm::{gemm, COLS};
        let Span {
            keys,
            values,
            pos,
            seen,
            rows,
            ..
        } = self.span();
        let (d, token, q_at) = (self.dims.head_dim, |r| self.token(r), |r| self.q_at(r));
        let width = KEY_CHUNK.min(seen).next_multiple_of(COLS);

        let mut t = TILES.with(|c| c.take());
        grow(&mut t.q, rows * d, 0, 0.0);
        grow(&mut t.kt, d * width, d * KEY_CHUNK, 0.0);
        grow(&mut t.s, rows * width, rows * KEY_CHUNK, 0.0);
        grow(&mut t.o, rows * d, 0, 0.0);
        grow(&mut t.max, rows, 0, f32::NEG_INFINITY);
        grow(&mut t.sum, rows, 0, 0.0);
        for (r, qr) in t.q.chunks_exact_mut(d).enumerate() {
            let at = q_at(r);
            for (x, &v) in qr.iter_mut().zip(&q[at..at + d]) {
                *x = v * self.scale;
            }
        }
        let mut c0 = 0;
        while c0 < seen {
            let n = (seen - c0).min(KEY_CHUNK);
            let np = n.next_multiple_of(COLS);
            for (c, kt) in t.kt.chunks_exact_mut(np).take(d).enumerate() {
                for (j, x) in kt[..n].iter_mut().enumerate() {
                    *x = keys[(c0 + j) * d + c];
                }
                kt[n..].fill(0.0);
            }
            gemm(
                backend,
                (rows, np, d),
                (&t.q, d),
                (&t.kt, np),
                (&mut t.s, np),
                false,
            );
            for r in 0..rows {
                // Causal: the row's token sees keys up to its own position.
                let valid = (pos + token(r) + 1).saturating_sub(c0).min(n);
                let s = &mut t.s[r * np..(r + 1) * np];
                let max = s[..valid].iter().fold(t.max[r], |m, &x| m.max(x));
                if max > t.max[r] {
                    let rescale = (t.max[r] - max).exp();
                    t.sum[r] *= rescale;
                    t.o[r * d..(r + 1) * d]
                        .iter_mut()
                        .for_each(|o| *o *= rescale);
                    t.max[r] = max;
                }
                t.sum[r] += crate::elementwise::exp_shifted(backend, &mut s[..valid], t.max[r]);
                s[valid..].fill(0.0);
            }
            gemm(
                backend,
                (rows, d, n),
                (&t.s, np),
                (&values[c0 * d..(c0 + n) * d], d),
                (&mut t.o, d),
                true,
            );
            c0 += n;
        }
        for (r, o) in t.o.chunks_exact(d).enumerate() {
            let at = q_at(r);
            let out = std::slice::from_raw_parts_mut(y.0.add(at), d);
            let inv = 1.0 / t.sum[r];
            for (y, &o) in out.iter_mut().zip(o) {
                *y = o * inv;
            }
        }
        TILES.with(|c| c.set(t));
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, q: &[f32], y: YPtr) {
        self.run_portable(Backend::Avx2, q, y)
    }

    /// Written so that the compiler vectorizes it (8-lane accumulators, fused multiply-adds)
    /// when inlined into a function compiled for AVX2.
    #[inline(always)]
    unsafe fn run_portable(&self, backend: Backend, q: &[f32], y: YPtr) {
        let AttnDims {
            n_heads,
            kv_heads,
            head_dim: d,
        } = self.dims;
        let group = n_heads / kv_heads;
        let CachedSeq {
            keys,
            values,
            pos,
            n,
        } = self.seq;
        let base = self.kv_head * self.seq.capacity(kv_heads, d) * d;
        let keys = &keys[base..base + (pos + n) * d];
        let values = &values[base..base + (pos + n) * d];
        // Kept by the thread from step to step, sized for the whole context once: a step
        // allocates nothing.
        let mut scores = SCORES.with(|c| c.take());
        let capacity = self.seq.capacity(kv_heads, d);
        scores.reserve(capacity.saturating_sub(scores.len()));
        scores.resize(pos + n, 0.0);
        for i in self.queries.clone() {
            let seen = pos + i + 1;
            for h in self.kv_head * group..(self.kv_head + 1) * group {
                let at = ((self.row0 + i) * n_heads + h) * d;
                let qrow = &q[at..at + d];
                let mut max = f32::NEG_INFINITY;
                for (s, k) in scores[..seen].iter_mut().zip(keys.chunks_exact(d)) {
                    *s = dot(qrow, k) * self.scale;
                    max = max.max(*s);
                }
                let sum = crate::elementwise::exp_shifted(backend, &mut scores[..seen], max);
                let out = std::slice::from_raw_parts_mut(y.0.add(at), d);
                out.fill(0.0);
                for (&p, v) in scores[..seen].iter().zip(values.chunks_exact(d)) {
                    for (o, &x) in out.iter_mut().zip(v) {
                        *o = p.mul_add(x, *o);
                    }
                }
                let inv = 1.0 / sum;
                out.iter_mut().for_each(|o| *o *= inv);
            }
        }
        SCORES.with(|c| c.set(scores));
    }
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 8;
    let mut lanes = [0f32; L];
    let (ac, bc) = (a.chunks_exact(L), b.chunks_exact(L));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..L {
            lanes[l] = x[l].mul_add(y[l], lanes[l]);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention of one head in f64, the textbook way.
    fn reference(q: &[f32], keys: &[&[f32]], values: &[&[f32]], scale: f32) -> Vec<f32> {
        let s: Vec<f64> = keys
            .iter()
            .map(|k| {
                q.iter()
                    .zip(*k)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
                    * scale as f64
            })
            .collect();
        let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        (0..q.len())
            .map(|c| {
                (e.iter()
                    .zip(values)
                    .map(|(p, v)| p * v[c] as f64)
                    .sum::<f64>()
                    / sum) as f32
            })
            .collect()
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_the_reference_for_every_sequence_head_and_backend() {
        // An odd head size (a tail after the 8-lane chunks, no tiled path) and one the tiled path
        // takes, 3 query heads per KV head, sequences with one token, several tokens (causal
        // mask), an empty history, more tokens than a task's block and more keys than a chunk
        // of the tiled path, caches of four sizes.
        for head_dim in [12, 32] {
            check_against_reference(AttnDims {
                n_heads: 6,
                kv_heads: 2,
                head_dim,
            });
        }
    }

    fn check_against_reference(dims: AttnDims) {
        // (position, tokens, cache capacity)
        let shapes = [
            (17, 1, 40),
            (0, 3, 40),
            (30, 4, 40),
            (5, 1, 24),
            (9, 70, 80),
            (250, 37, 300),
        ];
        let caches: Vec<(Vec<f32>, Vec<f32>)> = (0..shapes.len() as u32)
            .map(|i| {
                let buf = dims.kv_heads * shapes[i as usize].2 * dims.head_dim;
                (values(buf, 2 * i + 1), values(buf, 2 * i + 2))
            })
            .collect();
        let seqs: Vec<CachedSeq> = shapes
            .iter()
            .zip(&caches)
            .map(|(&(pos, n, _), (k, v))| CachedSeq {
                keys: k,
                values: v,
                pos,
                n,
            })
            .collect();
        let tokens: usize = shapes.iter().map(|s| s.1).sum();
        let width = dims.n_heads * dims.head_dim;
        let q = values(tokens * width, 99);
        let scale = 0.3;
        for backend in [Backend::Scalar, Backend::detect()] {
            let mut y = vec![f32::NAN; q.len()];
            cached_attention_with(backend, dims, &q, &seqs, scale, &mut y);
            let mut row = 0;
            for (s, &(_, _, capacity)) in seqs.iter().zip(&shapes) {
                for i in 0..s.n {
                    for h in 0..dims.n_heads {
                        let kv = h / (dims.n_heads / dims.kv_heads);
                        let rows = |buf: &'_ [f32]| -> Vec<Vec<f32>> {
                            (0..=s.pos + i)
                                .map(|j| {
                                    let at = (kv * capacity + j) * dims.head_dim;
                                    buf[at..at + dims.head_dim].to_vec()
                                })
                                .collect()
                        };
                        let (k, v) = (rows(s.keys), rows(s.values));
                        let k: Vec<&[f32]> = k.iter().map(|r| r.as_slice()).collect();
                        let v: Vec<&[f32]> = v.iter().map(|r| r.as_slice()).collect();
                        let at = (row + i) * width + h * dims.head_dim;
                        let want = reference(&q[at..at + dims.head_dim], &k, &v, scale);
                        for (c, (a, b)) in y[at..at + dims.head_dim].iter().zip(&want).enumerate() {
                            assert!(
                                (a - b).abs() < 1e-5,
                                "{backend:?}: token {} head {h} column {c}: {a} vs {b}",
                                row + i
                            );
                        }
                    }
                }
                row += s.n;
            }
        }
    }
}
