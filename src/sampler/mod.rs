//! Picks the next token from logits: greedy, or temperature with top-k / top-p / min-p, after the
//! repeat, presence and frequency penalties and a per-token logit bias; seeded so that the same
//! seed gives the same output. Also reports the distribution a token was drawn from (logprobs).

use anyhow::{bail, Result};
use rand::{rngs::StdRng, Rng, SeedableRng};

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1.0 disables.
    pub top_p: f32,
    /// 0.0 disables.
    pub min_p: f32,
    /// 1.0 disables.
    pub repeat_penalty: f32,
    /// How many recent tokens the repeat penalty looks at.
    pub repeat_last_n: usize,
    /// Subtracted once from the logit of every token already generated (OpenAI's
    /// `presence_penalty`); 0 disables.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated (OpenAI's
    /// `frequency_penalty`); 0 disables.
    pub frequency_penalty: f32,
    /// Added to the logits of these tokens (OpenAI's `logit_bias`; -100 bans a token).
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: u64,
}

impl Default for SamplingParams {
    /// llama.cpp's defaults.
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: 0xC0FFEE,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail!(
                "temperature must be a number >= 0, got {}",
                self.temperature
            );
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            bail!("top-p must be between 0 and 1, got {}", self.top_p);
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            bail!("min-p must be between 0 and 1, got {}", self.min_p);
        }
        if !(self.repeat_penalty > 0.0 && self.repeat_penalty.is_finite()) {
            bail!("repeat penalty must be > 0, got {}", self.repeat_penalty);
        }
        for (name, v) in [
            ("presence penalty", self.presence_penalty),
            ("frequency penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                bail!("{name} must be between -2 and 2, got {v}");
            }
        }
        for &(id, bias) in &self.logit_bias {
            if !(-100.0..=100.0).contains(&bias) {
                bail!("the logit bias of token {id} must be between -100 and 100, got {bias}");
            }
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Scratch reused across steps so sampling allocates nothing per token.
    candidates: Vec<(u32, f32)>,
    seen: Vec<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Sampler> {
        params.validate()?;
        Ok(Sampler {
            rng: StdRng::seed_from_u64(params.seed),
            params,
            candidates: Vec::new(),
            seen: Vec::new(),
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// `history`: the tokens so far, the prompt's first `prompt_len` of them, for the penalties
    /// (repeat: prompt and generated, as llama.cpp; presence and frequency: generated, as
    /// OpenAI). Leaves in `logits` the values it sampled from before temperature: penalized,
    /// biased.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32], prompt_len: usize) -> u32 {
        let p = &self.params;
        for &(id, bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += bias;
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let seen = &mut self.seen;
            seen.clear();
            seen.extend_from_slice(&history[prompt_len.min(history.len())..]);
            seen.sort_unstable();
            for run in seen.chunk_by(|a, b| a == b) {
                if let Some(l) = logits.get_mut(run[0] as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * run.len() as f32;
                }
            }
        }
        if p.repeat_penalty != 1.0 {
            let start = history.len().saturating_sub(p.repeat_last_n);
            let seen = &mut self.seen;
            seen.clear();
            seen.extend_from_slice(&history[start..]);
            seen.sort_unstable();
            seen.dedup();
            for &t in seen.iter() {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repeat_penalty
                    } else {
                        *l * p.repeat_penalty
                    };
                }
            }
        }
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        let c = &mut self.candidates;
        c.clear();
        c.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, l / p.temperature)),
        );
        let by_logit_desc =
            |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < c.len() {
            c.select_nth_unstable_by(p.top_k - 1, by_logit_desc);
            c.truncate(p.top_k);
        }
        c.sort_unstable_by(by_logit_desc);
        // Softmax over what is left.
        let max = c[0].1;
        let mut sum = 0.0;
        for (_, l) in c.iter_mut() {
            *l = (*l - max).exp();
            sum += *l;
        }
        for (_, l) in c.iter_mut() {
            *l /= sum;
        }
        if p.min_p > 0.0 {
            let floor = c[0].1 * p.min_p;
            let keep = c.iter().take_while(|(_, q)| *q >= floor).count().max(1);
            c.truncate(keep);
        }
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = c
                .iter()
                .position(|(_, q)| {
                    acc += q;
                    acc >= p.top_p
                })
                .map_or(c.len(), |i| i + 1);
            c.truncate(keep);
        }
        let total: f32 = c.iter().map(|(_, q)| q).sum();
        let mut r = self.rng.random::<f32>() * total;
        for &(id, q) in c.iter() {
            if r < q {
                return id;
            }
            r -= q;
        }
        c.last().map_or(0, |x| x.0)
    }
}

/// The log-probability of `token` and of the `top` most likely tokens (most likely first) under
/// the softmax of `logits`; `top` is written over, its length is how many are wanted.
pub fn logprobs(logits: &[f32], token: u32, top: &mut Vec<(u32, f32)>, wanted: usize) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = qwen_run_kernels::elementwise::sum_exp_shifted(logits, max).ln() + max;
    // One pass keeps the `wanted` largest, sorted by logit, ties to the lower id: only a logit
    // above the smallest kept one goes in.
    top.clear();
    if wanted > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if top.len() == wanted && !l.total_cmp(&top[wanted - 1].1).is_gt() {
                continue;
            }
            let at = top.partition_point(|x| x.1.total_cmp(&l).is_ge());
            if top.len() == wanted {
                top.pop();
            }
            top.insert(at, (i as u32, l));
        }
        for (_, l) in top.iter_mut() {
            *l -= log_sum;
        }
    }
    logits
        .get(token as usize)
        .map_or(f32::NEG_INFINITY, |&l| l - log_sum)
}

/// Index of the largest logit; ties go to the lowest id (as llama.cpp's greedy sampler does).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_lowest_id_on_ties() {
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        assert_eq!(s.sample(&mut [1.0, 3.0, 3.0, 2.0], &[], 0), 1);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 17) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed,
                ..Default::default()
            })
            .unwrap();
            (0..20)
                .map(|_| s.sample(&mut logits.clone(), &[], 0))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(SamplingParams {
            top_k: 1,
            ..Default::default()
        })
        .unwrap();
        for _ in 0..10 {
            assert_eq!(s.sample(&mut [0.5, 2.0, 1.9, -1.0], &[], 0), 1);
        }
    }

    #[test]
    fn repeat_penalty_demotes_seen_tokens() {
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 2.0,
            ..SamplingParams::greedy()
        })
        .unwrap();
        assert_eq!(s.sample(&mut [1.0, 1.5, 1.0], &[1], 0), 0);
    }

    #[test]
    fn presence_and_frequency_penalties_count_generated_tokens_only() {
        let params = SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..SamplingParams::greedy()
        };
        let mut s = Sampler::new(params).unwrap();
        // Token 0 is in the prompt only: untouched. Token 1 was generated twice: 0.5 + 2 * 0.25.
        let mut logits = [2.0, 2.0, 1.2];
        assert_eq!(s.sample(&mut logits, &[0, 1, 1], 1), 0);
        assert_eq!(logits, [2.0, 1.0, 1.2]);
    }

    #[test]
    fn logit_bias_can_ban_and_force() {
        let mut s = Sampler::new(SamplingParams {
            logit_bias: vec![(1, -100.0), (2, 5.0)],
            ..SamplingParams::greedy()
        })
        .unwrap();
        assert_eq!(s.sample(&mut [1.0, 3.0, 0.0], &[], 0), 2);
    }

    #[test]
    fn logprobs_are_a_sorted_log_softmax() {
        let logits = [1.0f32, 3.0, 2.0, f32::NEG_INFINITY];
        let mut top = Vec::new();
        let lp = logprobs(&logits, 2, &mut top, 3);
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        assert!((lp - (2.0 - z.ln())).abs() < 1e-5);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 2, 0]);
        assert!(top.windows(2).all(|w| w[0].1 >= w[1].1) && top[0].1 <= 0.0);
        assert_eq!(logprobs(&logits, 3, &mut top, 0), f32::NEG_INFINITY);
        assert!(top.is_empty());
        // A vocabulary's worth with many ties: the same as sorting everything.
        let logits: Vec<f32> = (0..5000)
            .map(|i| ((i * 7919) % 613) as f32 * 0.05)
            .collect();
        let mut all: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let z = logits.iter().map(|&l| (l as f64).exp()).sum::<f64>().ln() as f32;
        for wanted in [1, 5, 20] {
            logprobs(&logits, 0, &mut top, wanted);
            let ids: Vec<u32> = top.iter().map(|t| t.0).collect();
            let want: Vec<u32> = all[..wanted].iter().map(|t| t.0).collect();
            assert_eq!(ids, want);
            for (t, a) in top.iter().zip(&all) {
                assert!((t.1 - (a.1 - z)).abs() < 1e-4, "{t:?} {a:?}");
            }
        }
    }

    #[test]
    fn rejects_bad_params() {
        assert!(Sampler::new(SamplingParams {
            top_p: 1.5,
            ..Default::default()
        })
        .is_err());
        assert!(Sampler::new(SamplingParams {
            temperature: -1.0,
            ..Default::default()
        })
        .is_err());
        assert!(Sampler::new(SamplingParams {
            presence_penalty: 3.0,
            ..Default::default()
        })
        .is_err());
        assert!(Sampler::new(SamplingParams {
            logit_bias: vec![(5, 101.0)],
            ..Default::default()
        })
        .is_err());
    }
}
