//! Attention for steps that run a few tokens per sequence (decode, continuous batching), read
//! straight from each sequence's preallocated f32 KV cache.
//!
//! A decode step's attention is tiny arithmetic spread over many small tensors; built from
//! general tensor ops it costs a dozen allocations and copies per sequence and layer, more than
//! the arithmetic. Here one call covers every sequence of the step: tasks are (sequence, KV head)
//! pairs, so the query heads that share a KV head read its cache rows once, and the tasks run on
//! the current rayon pool.

use crate::driver::YPtr;
use crate::Backend;
use std::cell::Cell;

thread_local! {
    static SCORES: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
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
        let (si, head) = (t / kv_heads, t % kv_heads);
        let job = Task {
            dims,
            seq: seqs[si],
            kv_head: head,
            // the rows of the sequences before this one (a few sums, no allocation per step)
            row0: seqs[..si].iter().map(|s| s.n).sum(),
            scale,
        };
        // SAFETY: tasks write disjoint (row, head) blocks of `y`, which outlives them.
        unsafe { job.run(backend, q, out) }
    };
    let n_tasks = seqs.len() * kv_heads;
    if work < MIN_PARALLEL_WORK || rayon::current_num_threads() < 2 {
        (0..n_tasks).for_each(task);
    } else {
        crate::pool::for_each(n_tasks, task);
    }
}

/// The query heads of one KV head, for every token of one sequence.
struct Task<'a> {
    dims: AttnDims,
    seq: CachedSeq<'a>,
    kv_head: usize,
    row0: usize,
    scale: f32,
}

impl Task<'_> {
    /// # Safety
    /// `y` must be valid for the whole output and no one else may write this task's block.
    unsafe fn run(&self, backend: Backend, q: &[f32], y: YPtr) {
        match backend {
            #[cfg(target_arch = "x86_64")]
            Backend::Avx2 => self.run_avx2(q, y),
            _ => self.run_portable(Backend::Scalar, q, y),
        }
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
        for i in 0..n {
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
        // Odd head size (a tail after the 8-lane chunks), 3 query heads per KV head, sequences
        // with one token, several tokens (causal mask) and an empty history, caches of two sizes.
        let dims = AttnDims {
            n_heads: 6,
            kv_heads: 2,
            head_dim: 12,
        };
        // (position, tokens, cache capacity)
        let shapes = [(17, 1, 40), (0, 3, 40), (30, 4, 40), (5, 1, 24)];
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
