//! Speculative decoding: tokens proposed ahead of the model and checked in the same step as the
//! token before them. The scheduler keeps a draft only where sampling picks it too, so every
//! emitted token is the model's own sample and greedy output is what plain decoding gives; this
//! module proposes the drafts (prompt lookup, [`ngram`]) and sizes them: a draft of k tokens is
//! tried when the tokens it is expected to add, from the acceptance measured so far, outweigh
//! what the k extra tokens cost the step, from the step times measured on this machine
//! ([`costs`]). When no length pays, it drafts nothing and decodes as without it.

mod costs;
pub mod ngram;

pub use costs::{CostTable, StepCosts, TIMED_SIZES};

use anyhow::{bail, Result};

/// How drafts are made (`--spec-type`, llama.cpp's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpecType {
    None,
    /// Prompt lookup: the tokens that followed an earlier occurrence of the text's last n-gram.
    NgramSimple,
}

/// The `--spec-type` values llama.cpp b11434 lists that are not implemented here.
const NOT_IMPLEMENTED: &[&str] = &[
    "draft-simple",
    "draft-eagle3",
    "draft-mtp",
    "draft-dflash",
    "draft-dspark",
    "ngram-map-k",
    "ngram-map-k4v",
    "ngram-mod",
    "ngram-cache",
];

impl SpecType {
    pub fn parse(s: &str) -> Result<SpecType, String> {
        match s {
            "none" => Ok(SpecType::None),
            "ngram-simple" => Ok(SpecType::NgramSimple),
            other if NOT_IMPLEMENTED.contains(&other) => Err(format!(
                "speculative type '{other}' is not supported here; supported: none, ngram-simple"
            )),
            other => Err(format!(
                "unknown speculative type '{other}'; supported: none, ngram-simple"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SpecType::None => "none",
            SpecType::NgramSimple => "ngram-simple",
        }
    }
}

/// Default longest n-gram looked up.
pub const DEFAULT_NGRAM_SIZE: usize = 4;
/// Default most tokens drafted at once.
pub const DEFAULT_DRAFT_MAX: usize = 16;

/// How a generation speculates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SpecConfig {
    pub kind: SpecType,
    /// Longest n-gram looked up (`--spec-ngram-simple-size-n`).
    pub ngram_size: usize,
    /// Most tokens drafted at once (`--spec-ngram-simple-size-m`, `--spec-draft-n-max`).
    pub n_max: usize,
    /// Fewer drafted tokens than this are not tried (`--spec-draft-n-min`).
    pub n_min: usize,
    /// Size each draft by the measured acceptance and step costs; off: try every draft whole,
    /// up to `n_max` (`--spec-adaptive`).
    pub adaptive: bool,
}

impl Default for SpecConfig {
    fn default() -> Self {
        SpecConfig {
            kind: SpecType::NgramSimple,
            ngram_size: DEFAULT_NGRAM_SIZE,
            n_max: DEFAULT_DRAFT_MAX,
            n_min: 0,
            adaptive: true,
        }
    }
}

impl SpecConfig {
    pub const OFF: SpecConfig = SpecConfig {
        kind: SpecType::None,
        ngram_size: DEFAULT_NGRAM_SIZE,
        n_max: DEFAULT_DRAFT_MAX,
        n_min: 0,
        adaptive: true,
    };

    pub fn check(&self) -> Result<()> {
        if !(ngram::MIN_NGRAM..=ngram::MAX_NGRAM).contains(&self.ngram_size) {
            bail!(
                "n-gram size {} is out of range: it must be {} to {} (--spec-ngram-simple-size-n)",
                self.ngram_size,
                ngram::MIN_NGRAM,
                ngram::MAX_NGRAM
            );
        }
        if self.n_max > 1024 {
            bail!(
                "draft maximum {} is out of range: at most 1024 (--spec-draft-n-max)",
                self.n_max
            );
        }
        if self.n_min > self.n_max {
            bail!(
                "draft minimum {} is more than the draft maximum {} (--spec-draft-n-min, --spec-draft-n-max)",
                self.n_min,
                self.n_max
            );
        }
        Ok(())
    }

    /// "ngram-simple (n 4, max 16, adaptive)" for reports.
    pub fn describe(&self) -> String {
        match self.kind {
            SpecType::None => "none".into(),
            SpecType::NgramSimple => format!(
                "ngram-simple (n {}, max {}{})",
                self.ngram_size,
                self.n_max,
                if self.adaptive { ", adaptive" } else { "" }
            ),
        }
    }
}

/// What speculation did in one generation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpecStats {
    /// Drafted tokens run.
    pub drafted: usize,
    /// Drafted tokens kept (the model sampled them too).
    pub accepted: usize,
    /// Decode steps (forward passes after the prompt's).
    pub passes: usize,
}

impl SpecStats {
    /// Share of the drafted tokens that were kept (0 when none were drafted).
    pub fn acceptance(&self) -> f64 {
        self.accepted as f64 / self.drafted.max(1) as f64
    }
}

/// What a step holds before a slot adds its drafts: tokens, and the tokens of output they are
/// expected to yield.
#[derive(Clone, Copy, Debug, Default)]
pub struct Planned {
    pub tokens: usize,
    pub expected: f64,
}

/// While no length pays, one draft token is still tried every this many matches, so that a
/// generation that turns repetitive is noticed.
const PROBE_EVERY: u32 = 16;
/// Outcomes (kept or not, per drafted position) remembered: older ones fade.
const MEMORY: f64 = 64.0;

/// One generation's drafter: proposes drafts and learns how often they are kept.
pub struct Drafter {
    config: SpecConfig,
    /// Drafted positions reached and kept, fading: acceptance = kept / tried.
    tried: f64,
    kept: f64,
    /// Matches since a draft was last tried.
    idle: u32,
    found: Vec<u32>,
}

impl Drafter {
    /// None when `config` makes no drafts.
    pub fn new(config: SpecConfig) -> Option<Drafter> {
        if config.kind == SpecType::None || config.n_max == 0 {
            return None;
        }
        Some(Drafter {
            config,
            tried: 0.0,
            kept: 0.0,
            idle: 0,
            found: Vec::with_capacity(config.n_max),
        })
    }

    /// The chance that the next drafted token is kept, given the ones before it were: measured,
    /// starting from an even chance.
    pub fn acceptance(&self) -> f64 {
        (self.kept + 1.0) / (self.tried + 2.0)
    }

    /// Writes the drafts to try after the last token of `history` (which runs next) to `out`:
    /// at most `room`, and only as many as pay for their place in a step that already holds
    /// `planned`, at the step `costs`. Returns the tokens of output this slot is expected to add.
    pub fn propose(
        &mut self,
        history: &[u32],
        room: usize,
        costs: &CostTable,
        planned: Planned,
        out: &mut Vec<u32>,
    ) -> f64 {
        out.clear();
        let max = self.config.n_max.min(room);
        match self.config.kind {
            SpecType::None => return 1.0,
            SpecType::NgramSimple => {
                ngram::lookup(history, self.config.ngram_size, max, &mut self.found)
            }
        }
        if self.found.is_empty() {
            return 1.0;
        }
        let k = if self.config.adaptive {
            self.length(self.found.len(), costs, planned)
        } else {
            self.found.len()
        };
        if k == 0 || k < self.config.n_min {
            return 1.0;
        }
        out.extend_from_slice(&self.found[..k]);
        self.expected(k)
    }

    /// Tokens of output expected from running the next token and `k` drafts.
    fn expected(&self, k: usize) -> f64 {
        let a = self.acceptance();
        (0..=k).map(|i| a.powi(i as i32)).sum()
    }

    /// The draft length, up to `available`, that yields the most output per second of step.
    fn length(&mut self, available: usize, costs: &CostTable, planned: Planned) -> usize {
        let base = planned.tokens + 1;
        let Some(plain) = costs.seconds(base) else {
            return 0; // Not even a plain step has been timed: time one first.
        };
        let a = self.acceptance();
        let mut best = (0, (planned.expected + 1.0) / plain);
        let (mut expected, mut p) = (1.0, 1.0);
        for k in 1..=available {
            p *= a;
            expected += p;
            let Some(seconds) = costs.seconds(base + k) else {
                // A size never timed, with nothing to draw it from: try it once to time it.
                if best.0 == 0 {
                    best.0 = k;
                }
                break;
            };
            let rate = (planned.expected + expected) / seconds;
            if rate > best.1 {
                best = (k, rate);
            }
        }
        if best.0 > 0 {
            self.idle = 0;
            return best.0;
        }
        self.idle += 1;
        if self.idle >= PROBE_EVERY {
            self.idle = 0;
            return 1;
        }
        0
    }

    /// Learns from a step that ran `drafted` of this drafter's tokens and kept `kept`.
    pub fn record(&mut self, drafted: usize, kept: usize) {
        if drafted == 0 {
            return;
        }
        // Positions reached: every kept one, and the first that was not.
        let reached = kept + usize::from(kept < drafted);
        self.tried += reached as f64;
        self.kept += kept as f64;
        if self.tried > MEMORY {
            let fade = MEMORY / self.tried;
            self.tried *= fade;
            self.kept *= fade;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn costs(points: &[(usize, f64)]) -> CostTable {
        let c = StepCosts::default();
        for &(n, s) in points {
            c.record(n, Duration::from_secs_f64(s));
        }
        let mut t = CostTable::default();
        c.snapshot(&mut t);
        t
    }

    fn drafter() -> Drafter {
        Drafter::new(SpecConfig::default()).unwrap()
    }

    const REPEAT: [u32; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3];

    #[test]
    fn nothing_is_drafted_before_a_plain_step_is_timed() {
        let mut d = drafter();
        let mut out = Vec::new();
        d.propose(&REPEAT, 100, &costs(&[]), Planned::default(), &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn an_untimed_size_is_tried_once() {
        let mut d = drafter();
        let mut out = Vec::new();
        d.propose(
            &REPEAT,
            100,
            &costs(&[(1, 0.01)]),
            Planned::default(),
            &mut out,
        );
        assert_eq!(out, [4]);
    }

    #[test]
    fn cheap_extra_tokens_and_kept_drafts_draft_long() {
        let mut d = drafter();
        for _ in 0..20 {
            d.record(4, 4);
        }
        let flat = costs(&[(1, 0.010), (2, 0.0101)]);
        let mut out = Vec::new();
        d.propose(&REPEAT, 100, &flat, Planned::default(), &mut out);
        assert_eq!(out, [4, 5, 6, 7, 8, 9, 1, 2, 3]);
        // The budget bounds it.
        d.propose(&REPEAT, 2, &flat, Planned::default(), &mut out);
        assert_eq!(out, [4, 5]);
    }

    #[test]
    fn rejected_drafts_on_costly_steps_back_off_then_probe() {
        let mut d = drafter();
        for _ in 0..20 {
            d.record(4, 0);
        }
        // Each extra token costs as much as a plain step.
        let steep = costs(&[(1, 0.010), (2, 0.020), (64, 0.640)]);
        let mut out = Vec::new();
        let mut tries = 0;
        for _ in 0..PROBE_EVERY {
            d.propose(&REPEAT, 100, &steep, Planned::default(), &mut out);
            tries += out.len();
        }
        assert_eq!(tries, 1, "one probe per {PROBE_EVERY} matches");
    }

    #[test]
    fn acceptance_fades_to_the_latest() {
        let mut d = drafter();
        for _ in 0..100 {
            d.record(4, 0);
        }
        assert!(d.acceptance() < 0.05);
        for _ in 0..100 {
            d.record(4, 4);
        }
        assert!(d.acceptance() > 0.95);
    }

    #[test]
    fn types_and_limits() {
        assert_eq!(SpecType::parse("ngram-simple"), Ok(SpecType::NgramSimple));
        let e = SpecType::parse("ngram-mod").unwrap_err();
        assert!(
            e.contains("not supported") && e.contains("ngram-simple"),
            "{e}"
        );
        assert!(SpecType::parse("eagle").unwrap_err().contains("unknown"));
        let bad = SpecConfig {
            n_min: 5,
            n_max: 4,
            ..SpecConfig::default()
        };
        assert!(bad.check().is_err());
        assert!(Drafter::new(SpecConfig::OFF).is_none());
    }
}
