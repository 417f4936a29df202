//! The sampling side of one generation: picks each token from the logits, turns tokens into text,
//! cuts the text at stop strings, and decides when to stop.

use super::request::{Event, FinishReason, Guide, Output, TokenLogprob, MAX_TOP_LOGPROBS};
use super::stop::StopMatcher;
use crate::sampler::Sampler;
use crate::tokenizer::{TextStream, Tokenizer};

pub(super) struct Decoder {
    stream: TextStream,
    stops: StopMatcher,
    /// The prompt and the tokens generated so far (the sampler's repetition penalty reads it).
    history: Vec<u32>,
    prompt_tokens: usize,
    budget: usize,
    max_tokens: usize,
    finish: FinishReason,
    done: bool,
    /// Alternatives to report per token, when the request wants logprobs.
    logprobs: Option<usize>,
}

impl Decoder {
    /// `room`: the positions left in the context after the prompt.
    pub(super) fn new(
        prompt: &[u32],
        max_tokens: usize,
        room: usize,
        stop: &[String],
        logprobs: Option<usize>,
    ) -> Decoder {
        let budget = max_tokens.min(room);
        let mut history = Vec::with_capacity(prompt.len() + budget);
        history.extend_from_slice(prompt);
        Decoder {
            stream: TextStream::new(),
            stops: StopMatcher::new(stop),
            history,
            prompt_tokens: prompt.len(),
            budget,
            max_tokens,
            finish: FinishReason::Length,
            done: false,
            logprobs: logprobs.map(|n| n.min(MAX_TOP_LOGPROBS)),
        }
    }

    pub(super) fn generated(&self) -> &[u32] {
        &self.history[self.prompt_tokens..]
    }

    pub(super) fn history(&self) -> &[u32] {
        &self.history
    }

    /// Tokens that may still be generated after the next one.
    pub(super) fn left(&self) -> usize {
        self.budget.saturating_sub(self.generated().len() + 1)
    }

    /// Tokens that may still be generated, the next one included.
    pub(super) fn remaining(&self) -> usize {
        self.budget.saturating_sub(self.generated().len())
    }

    pub(super) fn finish_reason(&self) -> FinishReason {
        self.finish
    }

    /// Samples the next token from `logits` and sends its text. Returns the token to run next,
    /// or None when the generation is over (end of text, a stop string, the budget, or the
    /// listener gone).
    pub(super) fn step(
        &mut self,
        tokenizer: &Tokenizer,
        sampler: &mut Sampler,
        guide: Option<&mut (dyn Guide + '_)>,
        logits: &mut [f32],
        out: &mut dyn Output,
    ) -> Option<u32> {
        if self.done || self.generated().len() >= self.budget {
            return self.stop(out);
        }
        if let Some(g) = guide {
            g.mask(self.generated(), logits);
        }
        let next = sampler.sample(logits, &self.history, self.prompt_tokens);
        self.history.push(next);
        if tokenizer.is_eog(next) {
            self.finish = FinishReason::Stop;
            return self.stop(out);
        }
        if let Some(wanted) = self.logprobs {
            let mut top = Vec::with_capacity(wanted);
            let logprob = crate::sampler::logprobs(logits, next, &mut top, wanted);
            let entry = TokenLogprob {
                token: next,
                logprob,
                top,
            };
            if !out.send(Event::Logprob(&entry)) {
                self.finish = FinishReason::Cancelled;
                return self.stop(out);
            }
        }
        let piece = self.stream.push(tokenizer, next);
        if !piece.is_empty() {
            let (text, hit) = self.stops.push(&piece);
            if !text.is_empty() && !out.send(Event::Text(&text)) {
                self.finish = FinishReason::Cancelled;
                return self.stop(out);
            }
            if hit {
                self.finish = FinishReason::Stop;
                self.done = true;
                return None;
            }
        }
        if self.generated().len() == self.budget {
            return self.stop(out);
        }
        Some(next)
    }

    /// Ends the generation, sending the text held back (a partial character, a possible start of
    /// a stop string).
    fn stop(&mut self, out: &mut dyn Output) -> Option<u32> {
        if !self.done {
            self.done = true;
            let mut rest = self.stream.finish();
            if self.finish != FinishReason::Cancelled {
                let (text, hit) = self.stops.push(&rest);
                rest = if hit {
                    text
                } else {
                    text + &self.stops.finish()
                };
                if hit {
                    self.finish = FinishReason::Stop;
                }
            }
            if !rest.is_empty() && self.finish != FinishReason::Cancelled {
                out.send(Event::Text(&rest));
            }
            if self.finish == FinishReason::Length && self.budget < self.max_tokens {
                self.finish = FinishReason::ContextFull;
            }
        }
        None
    }

    /// Ends the generation early (the listener left).
    pub(super) fn cancel(&mut self) {
        if !self.done {
            self.finish = FinishReason::Cancelled;
            self.done = true;
        }
    }

    /// The generated tokens, the decoder consumed.
    pub(super) fn into_generated(mut self) -> Vec<u32> {
        self.history.drain(..self.prompt_tokens);
        self.history
    }
}
