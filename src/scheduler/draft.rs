//! The draft model's part of a decode step: it catches up on the text its session has not seen
//! (the tokens the target kept since its last draft, or the whole prompt the first time) and
//! proposes tokens greedily, one draft step each, on the same runner and KV-cache code as the
//! target. Its session is rolled back to what it shares with the text before each draft, so
//! rejected drafts never stay in it.

use crate::engine::{Engine, Step};
use crate::kv_cache::Session;
use crate::model::Logits;
use anyhow::Result;

/// Candidates among which the draft's confidence in its top token is measured, as llama.cpp's
/// draft sampler keeps them (top-k 10, then a softmax).
const CONFIDENCE_TOP_K: usize = 10;

/// Writes to `out` up to `max` tokens the draft model finds most likely after `history` (whose
/// last token the target runs next), stopping before a token whose probability among the
/// draft's ten most likely is below `p_min`, or that is not below `vocab` (the target's
/// vocabulary). `session` is the draft's session of this slot, made on first use.
#[allow(clippy::too_many_arguments)]
pub(super) fn propose(
    draft: &Engine,
    session: &mut Option<Box<Session>>,
    history: &[u32],
    max: usize,
    p_min: f32,
    vocab: usize,
    logits: &mut Vec<f32>,
    out: &mut Vec<u32>,
) -> Result<()> {
    out.clear();
    if max == 0 || history.is_empty() {
        return Ok(());
    }
    let session = made(draft, session)?;
    // Keep what the draft holds of the text, less the last token, whose logits are needed.
    let keep = session.common_prefix(history).min(history.len() - 1);
    session.truncate(keep);
    let draft_vocab = draft.config().vocab_size;
    let mut last = None;
    loop {
        let run = match &last {
            None => &history[keep..],
            Some(t) => std::slice::from_ref(t),
        };
        run_tokens(draft, session, run, logits)?;
        let (token, p) = most_likely(&logits[..draft_vocab]);
        if p < p_min || token as usize >= vocab {
            break;
        }
        out.push(token);
        if out.len() == max {
            break;
        }
        last = Some(token);
    }
    Ok(())
}

/// Brings the draft's session to hold `text` (a prompt, as it finishes): the draft reads the
/// prompt as part of the prefill rather than in the first decode step.
pub(super) fn catch_up(
    draft: &Engine,
    session: &mut Option<Box<Session>>,
    text: &[u32],
    logits: &mut Vec<f32>,
) -> Result<()> {
    let session = made(draft, session)?;
    let keep = session.common_prefix(text);
    session.truncate(keep);
    run_tokens(draft, session, &text[keep..], logits)
}

/// The slot's draft session, made on first use.
fn made<'s>(draft: &Engine, session: &'s mut Option<Box<Session>>) -> Result<&'s mut Session> {
    let made = match session.take() {
        Some(s) => s,
        None => Box::new(draft.new_session()?),
    };
    let made: &mut Session = session.insert(made);
    Ok(made)
}

/// Runs `tokens` on the draft's session in `--batch-size` steps; the last one's logits in
/// `logits`.
fn run_tokens(
    draft: &Engine,
    session: &mut Session,
    tokens: &[u32],
    logits: &mut Vec<f32>,
) -> Result<()> {
    for chunk in tokens.chunks(draft.batch_size) {
        let mut step = [Step {
            session: &mut *session,
            tokens: chunk,
            logits: Logits::Last,
        }];
        draft.step(&mut step, logits)?;
    }
    Ok(())
}

/// The most likely token and its probability among the [`CONFIDENCE_TOP_K`] most likely.
fn most_likely(logits: &[f32]) -> (u32, f32) {
    let mut top = [f32::NEG_INFINITY; CONFIDENCE_TOP_K];
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > top[CONFIDENCE_TOP_K - 1] {
            if l > top[0] {
                best = i;
            }
            let at = top
                .iter()
                .position(|&t| l > t)
                .unwrap_or(CONFIDENCE_TOP_K - 1);
            top.copy_within(at..CONFIDENCE_TOP_K - 1, at + 1);
            top[at] = l;
        }
    }
    let max = top[0];
    let sum: f32 = top
        .iter()
        .filter(|t| t.is_finite())
        .map(|&t| (t - max).exp())
        .sum();
    (best as u32, if max.is_finite() { 1.0 / sum } else { 0.0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_top_token_and_its_share_of_the_ten_most_likely() {
        let mut logits = vec![-100.0; 50];
        logits[7] = 2.0;
        logits[3] = 2.0f32 - 3.0f32.ln(); // a third as likely
        let (token, p) = most_likely(&logits);
        assert_eq!(token, 7);
        // Eight more at e^-102 of the top: nothing next to 1 / (1 + 1/3).
        assert!((p - 0.75).abs() < 1e-4, "{p}");
        // The first of equals, as an argmax.
        assert_eq!(most_likely(&[1.0, 3.0, 3.0]).0, 1);
        assert_eq!(most_likely(&[]).1, 0.0);
    }
}
