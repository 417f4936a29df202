//! Speculative decoding: tokens proposed ahead of the model and checked in the same step as the
//! token before them. The scheduler keeps a draft only where sampling picks it too, so every
//! emitted token is the model's own sample and greedy output is what plain decoding gives; this
//! module proposes the drafts of prompt lookup ([`ngram`]), asks for those of a draft model (which
//! the scheduler runs on the draft's own KV cache), and sizes both: a draft of k tokens is tried
//! when the tokens it is expected to add, from the acceptance measured so far, outweigh what the
//! k extra tokens cost the step, from the step times measured on this machine ([`costs`]), and,
//! for a draft model, what its own k steps cost. When no length pays, it drafts nothing and
//! decodes as without it.

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
    /// A draft model (`-md`) proposes the tokens it finds most likely, greedily.
    DraftSimple,
}

/// The `--spec-type` values llama.cpp b11434 lists that are not implemented here.
const NOT_IMPLEMENTED: &[&str] = &[
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
            "draft-simple" => Ok(SpecType::DraftSimple),
            other if NOT_IMPLEMENTED.contains(&other) => Err(format!(
                "speculative type '{other}' is not supported here; supported: none, ngram-simple, draft-simple"
            )),
            other => Err(format!(
                "unknown speculative type '{other}'; supported: none, ngram-simple, draft-simple"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SpecType::None => "none",
            SpecType::NgramSimple => "ngram-simple",
            SpecType::DraftSimple => "draft-simple",
        }
    }
}

/// Default longest n-gram looked up.
pub const DEFAULT_NGRAM_SIZE: usize = 4;
/// Default most tokens drafted at once.
pub const DEFAULT_DRAFT_MAX: usize = 16;

/// Default probability below which the draft model stops drafting (llama.cpp b11434's: never).
pub const DEFAULT_P_MIN: f32 = 0.0;

/// How a generation speculates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SpecConfig {
    /// The draft made without a model (none or ngram-simple); tried first, as llama.cpp ranks
    /// the draftless types above draft-simple.
    pub kind: SpecType,
    /// Where `kind` finds nothing, ask the engine's draft model (draft-simple).
    pub draft_model: bool,
    /// The draft model stops at a token whose probability, among its ten most likely, is below
    /// this (`--spec-draft-p-min`).
    pub p_min: f32,
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
            draft_model: false,
            p_min: DEFAULT_P_MIN,
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
        draft_model: false,
        p_min: DEFAULT_P_MIN,
        ngram_size: DEFAULT_NGRAM_SIZE,
        n_max: DEFAULT_DRAFT_MAX,
        n_min: 0,
        adaptive: true,
    };

    pub fn check(&self) -> Result<()> {
        if self.kind == SpecType::DraftSimple {
            bail!("draft-simple is set by `draft_model`, not `kind`");
        }
        if !(0.0..=1.0).contains(&self.p_min) {
            bail!(
                "draft probability minimum {} is out of range: it must be 0 to 1 (--spec-draft-p-min)",
                self.p_min
            );
        }
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

    /// Whether any draft is made.
    pub fn speculates(&self) -> bool {
        (self.kind != SpecType::None || self.draft_model) && self.n_max > 0
    }

    /// The types in use, as `--spec-type` names them: "ngram-simple,draft-simple".
    pub fn type_names(&self) -> String {
        let mut names: Vec<&str> = Vec::new();
        if self.kind != SpecType::None {
            names.push(self.kind.name());
        }
        if self.draft_model {
            names.push(SpecType::DraftSimple.name());
        }
        match names.is_empty() {
            true => "none".into(),
            false => names.join(","),
        }
    }

    /// "ngram-simple (n 4, max 16, adaptive)" for reports.
    pub fn describe(&self) -> String {
        let adaptive = if self.adaptive { ", adaptive" } else { "" };
        let mut parts = Vec::new();
        if self.kind == SpecType::NgramSimple {
            parts.push(format!(
                "ngram-simple (n {}, max {}{adaptive})",
                self.ngram_size, self.n_max
            ));
        }
        if self.draft_model {
            parts.push(format!(
                "draft-simple (max {}, p-min {}{adaptive})",
                self.n_max, self.p_min
            ));
        }
        match parts.is_empty() {
            true => "none".into(),
            false => parts.join(", then "),
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

/// Where a draft came from: each source learns its own acceptance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Lookup,
    Model,
}

/// How often one source's drafts are kept, and how long since it last drafted.
#[derive(Default)]
struct Learner {
    /// Drafted positions reached and kept, fading: acceptance = kept / tried.
    tried: f64,
    kept: f64,
    /// Chances to draft since a draft was last tried.
    idle: u32,
}

impl Learner {
    /// The chance that the next drafted token is kept, given the ones before it were: measured,
    /// starting from an even chance.
    fn acceptance(&self) -> f64 {
        (self.kept + 1.0) / (self.tried + 2.0)
    }

    fn record(&mut self, drafted: usize, kept: usize) {
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

    /// Tokens of output expected from running the next token and `k` drafts.
    fn expected(&self, k: usize) -> f64 {
        let a = self.acceptance();
        (0..=k).map(|i| a.powi(i as i32)).sum()
    }

    /// The draft length, up to `available`, that yields the most output per second of step,
    /// where each drafted token also costs `per_token` seconds to make (None: not yet known,
    /// so `untimed` tokens are tried to time it).
    fn length(
        &mut self,
        available: usize,
        costs: &CostTable,
        planned: Planned,
        per_token: Option<f64>,
        untimed: usize,
    ) -> usize {
        let base = planned.tokens + 1;
        let Some(plain) = costs.seconds(base) else {
            return 0; // Not even a plain step has been timed: time one first.
        };
        let Some(per_token) = per_token else {
            self.idle = 0;
            return untimed.min(available);
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
            let rate = (planned.expected + expected) / (seconds + per_token * k as f64);
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
}

/// One generation's drafter: proposes drafts and learns how often they are kept.
pub struct Drafter {
    config: SpecConfig,
    lookup: Learner,
    model: Learner,
    /// The source of the drafts in the step being run.
    last: Option<Source>,
    found: Vec<u32>,
}

impl Drafter {
    /// None when `config` makes no drafts.
    pub fn new(config: SpecConfig) -> Option<Drafter> {
        if !config.speculates() {
            return None;
        }
        Some(Drafter {
            config,
            lookup: Learner::default(),
            model: Learner::default(),
            last: None,
            found: Vec::with_capacity(config.n_max),
        })
    }

    /// The measured chance that the next prompt-lookup token is kept (see [`Learner`]).
    pub fn acceptance(&self) -> f64 {
        self.lookup.acceptance()
    }

    /// The measured chance that the draft model's next token is kept.
    pub fn model_acceptance(&self) -> f64 {
        self.model.acceptance()
    }

    pub fn config(&self) -> &SpecConfig {
        &self.config
    }

    /// Writes the prompt-lookup drafts to try after the last token of `history` (which runs
    /// next) to `out`: at most `room`, and only as many as pay for their place in a step that
    /// already holds `planned`, at the step `costs`. Returns the tokens of output this slot is
    /// expected to add.
    pub fn propose(
        &mut self,
        history: &[u32],
        room: usize,
        costs: &CostTable,
        planned: Planned,
        out: &mut Vec<u32>,
    ) -> f64 {
        out.clear();
        self.last = None;
        let max = self.config.n_max.min(room);
        match self.config.kind {
            SpecType::None | SpecType::DraftSimple => return 1.0,
            SpecType::NgramSimple => {
                ngram::lookup(history, self.config.ngram_size, max, &mut self.found)
            }
        }
        if self.found.is_empty() {
            return 1.0;
        }
        let k = if self.config.adaptive {
            self.lookup
                .length(self.found.len(), costs, planned, Some(0.0), 1)
        } else {
            self.found.len()
        };
        if k == 0 || k < self.config.n_min {
            return 1.0;
        }
        out.extend_from_slice(&self.found[..k]);
        self.last = Some(Source::Lookup);
        self.lookup.expected(k)
    }

    /// How many tokens to ask of the draft model when prompt lookup found none (0: do not run
    /// it): at most `room`, and only as many as pay for their place in the step and for the
    /// draft model's own steps, at its step costs `draft_costs`.
    pub fn model_length(
        &mut self,
        room: usize,
        costs: &CostTable,
        draft_costs: &CostTable,
        planned: Planned,
    ) -> usize {
        if !self.config.draft_model {
            return 0;
        }
        let max = self.config.n_max.min(room);
        if max == 0 || max < self.config.n_min {
            return 0;
        }
        if !self.config.adaptive {
            return max;
        }
        // A draft of k tokens takes k draft steps of about one token each (the first also
        // runs the tokens the draft has not seen yet, usually one or two). Until a step of one
        // or two tokens was timed, two tokens are asked for, so that one is.
        let per_token = draft_costs.seconds(1).or_else(|| draft_costs.seconds(2));
        match self.model.length(max, costs, planned, per_token, 2) {
            k if k < self.config.n_min => 0,
            k => k,
        }
    }

    /// Takes the draft model's tokens (`out`, fewer than asked when its confidence fell below
    /// `p_min`); drops them when they are fewer than `n_min`. Returns the tokens of output
    /// this slot is expected to add.
    pub fn model_drafted(&mut self, out: &mut Vec<u32>) -> f64 {
        if out.len() < self.config.n_min.max(1) {
            out.clear();
            self.last = None;
            return 1.0;
        }
        self.last = Some(Source::Model);
        self.model.expected(out.len())
    }

    /// Stops asking the draft model (it failed).
    pub fn stop_model(&mut self) {
        self.config.draft_model = false;
    }

    /// Learns from a step that ran `drafted` of this drafter's tokens and kept `kept`.
    pub fn record(&mut self, drafted: usize, kept: usize) {
        if drafted == 0 {
            return;
        }
        match self.last.take() {
            Some(Source::Lookup) => self.lookup.record(drafted, kept),
            Some(Source::Model) => self.model.record(drafted, kept),
            None => {}
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
            d.lookup.record(4, 4);
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
            d.lookup.record(4, 0);
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
            d.lookup.record(4, 0);
        }
        assert!(d.acceptance() < 0.05);
        for _ in 0..100 {
            d.lookup.record(4, 4);
        }
        assert!(d.acceptance() > 0.95);
    }

    fn model_drafter() -> Drafter {
        Drafter::new(SpecConfig {
            kind: SpecType::None,
            draft_model: true,
            ..SpecConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn a_draft_model_is_timed_first_then_sized_by_its_own_cost() {
        let mut d = model_drafter();
        let target = costs(&[(1, 0.010), (2, 0.011), (3, 0.012), (4, 0.013)]);
        // No one-token draft step timed yet: two tokens, so that one is.
        assert_eq!(
            d.model_length(7, &target, &costs(&[]), Planned::default()),
            2
        );
        for _ in 0..20 {
            d.model.record(3, 3);
        }
        // A cheap draft whose tokens are kept: as long as the room allows.
        let cheap = costs(&[(1, 0.001)]);
        assert_eq!(d.model_length(3, &target, &cheap, Planned::default()), 3);
        // A draft step that costs as much as the target's: nothing pays, then a probe.
        let dear = costs(&[(1, 0.010)]);
        let tries: usize = (0..PROBE_EVERY)
            .map(|_| d.model_length(7, &target, &dear, Planned::default()))
            .sum();
        assert_eq!(tries, 1);
        // Fewer than n_min drafted tokens are dropped.
        let mut d = Drafter::new(SpecConfig {
            n_min: 3,
            ..d.config
        })
        .unwrap();
        let mut out = vec![1, 2];
        assert_eq!(d.model_drafted(&mut out), 1.0);
        assert!(out.is_empty());
    }

    #[test]
    fn each_source_learns_its_own_acceptance() {
        let mut d = Drafter::new(SpecConfig {
            draft_model: true,
            ..SpecConfig::default()
        })
        .unwrap();
        let mut out = vec![5, 6];
        d.model_drafted(&mut out);
        d.record(2, 0);
        assert!(d.model_acceptance() < 0.5);
        assert_eq!(d.acceptance(), 0.5);
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
        assert_eq!(SpecType::parse("draft-simple"), Ok(SpecType::DraftSimple));
        let both = SpecConfig {
            draft_model: true,
            ..SpecConfig::default()
        };
        assert_eq!(both.type_names(), "ngram-simple,draft-simple");
        assert!(SpecConfig { p_min: 1.5, ..both }.check().is_err());
    }
}
