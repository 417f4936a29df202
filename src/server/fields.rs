//! Request fields the handlers do not act on, and what each API does with them: accepted as
//! having no effect here (documented), accepted only with the value that means "off", or refused.
//! A field in none of these lists, and not read by the handler, is refused with a 400 that names
//! it: nothing is silently ignored. The README's field table lists the same.

use super::error::ApiError;
use serde_json::{Map, Value};

/// What a request may send in a field the handler does not read.
#[derive(Clone, Copy)]
pub enum Unused {
    /// Accepted; it changes nothing here (bookkeeping, or a hint this server has no use for).
    Ignored,
    /// Accepted only with the value that turns it off (the API's default), which is what this
    /// server does; the text says which values.
    Off(fn(&Value) -> bool, &'static str),
    /// Refused with this explanation.
    Refused(&'static str),
}

use Unused::{Ignored, Off, Refused};

fn null(v: &Value) -> bool {
    v.is_null()
}
fn null_or_false(v: &Value) -> bool {
    v.is_null() || v == &Value::Bool(false)
}
fn null_or_zero(v: &Value) -> bool {
    v.is_null() || v.as_f64() == Some(0.0)
}
fn null_or_one(v: &Value) -> bool {
    v.is_null() || v.as_f64() == Some(1.0)
}
fn null_or_empty(v: &Value) -> bool {
    v.is_null() || v.as_array().is_some_and(|a| a.is_empty()) || v.as_str() == Some("")
}
fn null_or_minus_one(v: &Value) -> bool {
    v.is_null() || v.as_f64() == Some(-1.0)
}
fn text_only(v: &Value) -> bool {
    v.is_null() || v.as_array().is_some_and(|a| a.iter().all(|m| m == "text"))
}

/// llama-server's sampler fields that clients of its OpenAI endpoints send; their "off" values.
pub const LLAMA_SAMPLERS: &[(&str, Unused)] = &[
    ("typical_p", Off(null_or_one, "1 (off)")),
    ("tfs_z", Off(null_or_one, "1 (off)")),
    ("mirostat", Off(null_or_zero, "0 (off)")),
    ("mirostat_tau", Ignored),
    ("mirostat_eta", Ignored),
    ("dry_multiplier", Off(null_or_zero, "0 (off)")),
    ("xtc_probability", Off(null_or_zero, "0 (off)")),
    ("ignore_eos", Off(null_or_false, "false")),
    ("cache_prompt", Ignored),
    ("id_slot", Ignored),
    ("n_keep", Ignored),
];

/// llama-server's `/completion` and `/infill` fields this server does not read (beyond
/// [`LLAMA_SAMPLERS`]).
pub const LLAMA_SERVER: &[(&str, Unused)] = &[
    // The order is fixed here: penalties and bias, grammar, top-k, top-p, min-p, temperature.
    ("samplers", Ignored),
    ("timings_per_token", Ignored),
    ("response_fields", Ignored),
    ("min_keep", Ignored),
    ("xtc_threshold", Ignored),
    ("dry_base", Ignored),
    ("dry_allowed_length", Ignored),
    ("dry_penalty_last_n", Ignored),
    ("dry_sequence_breakers", Ignored),
    ("dynatemp_exponent", Ignored),
    ("dynatemp_range", Off(null_or_zero, "0 (off)")),
    ("top_n_sigma", Off(null_or_minus_one, "-1 (off)")),
    ("post_sampling_probs", Off(null_or_false, "false")),
    ("return_tokens", Off(null_or_false, "false")),
    ("t_max_predict_ms", Off(null_or_zero, "0 (off)")),
    ("lora", Off(null_or_empty, "[] (no adapters)")),
];

/// OpenAI chat and completions fields (and the llama-server extras) this server does not read.
pub const OPENAI: &[(&str, Unused)] = &[
    ("user", Ignored),
    ("metadata", Ignored),
    ("store", Ignored),
    ("service_tier", Ignored),
    ("prompt_cache_key", Ignored),
    ("safety_identifier", Ignored),
    ("prediction", Ignored),
    ("reasoning_effort", Ignored),
    ("verbosity", Ignored),
    ("modalities", Off(text_only, "[\"text\"]")),
    (
        "audio",
        Off(null, "null (this model reads and writes text only)"),
    ),
    (
        "web_search_options",
        Off(null, "null (there is no web search here)"),
    ),
    ("echo", Off(null_or_false, "false")),
    ("best_of", Off(null_or_one, "1")),
    (
        "functions",
        Refused("the deprecated 'functions' is not supported; send 'tools' instead"),
    ),
    (
        "function_call",
        Refused("the deprecated 'function_call' is not supported; send 'tool_choice' instead"),
    ),
];

/// Ollama's `/api/chat` and `/api/generate` fields this server does not read.
pub const OLLAMA: &[(&str, Unused)] = &[
    (
        "think",
        Off(
            null_or_false,
            "false (Qwen2.5 models do not think before answering)",
        ),
    ),
    (
        "template",
        Off(
            null_or_empty,
            "empty (the model's own chat template is used; use raw: true to send a rendered prompt)",
        ),
    ),
    (
        "context",
        Off(
            null_or_empty,
            "empty (send the conversation with /api/chat instead; this server caches its prefix)",
        ),
    ),
];

/// OpenAI's embedding fields this server does not read.
pub const EMBEDDINGS: &[(&str, Unused)] = &[("user", Ignored)];

/// Ollama's generation options, which change nothing for an embedding (`/api/embed`,
/// `/api/embeddings`).
pub const OLLAMA_GENERATION_OPTIONS: &[(&str, Unused)] = &[
    ("num_predict", Ignored),
    ("temperature", Ignored),
    ("top_p", Ignored),
    ("top_k", Ignored),
    ("min_p", Ignored),
    ("seed", Ignored),
    ("repeat_penalty", Ignored),
    ("repeat_last_n", Ignored),
    ("presence_penalty", Ignored),
    ("frequency_penalty", Ignored),
    ("stop", Ignored),
];

/// Ollama's `/api/show` fields this server does not read: the older API's, which change what a
/// show shows in Ollama only for models built on the fly.
pub const OLLAMA_SHOW: &[(&str, Unused)] = &[
    ("system", Ignored),
    ("template", Ignored),
    ("options", Ignored),
];

/// Ollama's `options` this server does not read.
pub const OLLAMA_OPTIONS: &[(&str, Unused)] = &[
    // Load-time settings: `qwen-run serve`'s flags decide them for all requests.
    ("num_keep", Ignored),
    ("numa", Ignored),
    ("num_batch", Ignored),
    ("num_gpu", Ignored),
    ("main_gpu", Ignored),
    ("use_mmap", Ignored),
    ("use_mlock", Ignored),
    ("num_thread", Ignored),
    ("low_vram", Ignored),
    ("f16_kv", Ignored),
    ("vocab_only", Ignored),
    ("penalize_newline", Ignored),
    ("typical_p", Off(null_or_one, "1 (off)")),
    ("tfs_z", Off(null_or_one, "1 (off)")),
    ("mirostat", Off(null_or_zero, "0 (off)")),
    ("mirostat_tau", Ignored),
    ("mirostat_eta", Ignored),
];

/// Checks the fields a handler did not read against `tables`; `what` names where they were
/// (e.g. "the request", "options").
pub fn check(
    extra: &Map<String, Value>,
    tables: &[&[(&str, Unused)]],
    what: &str,
) -> Result<(), ApiError> {
    for (name, value) in extra {
        let found = tables
            .iter()
            .flat_map(|t| t.iter())
            .find(|(n, _)| n == name);
        match found {
            Some((_, Ignored)) => {}
            Some((_, Off(ok, allowed))) => {
                if !ok(value) {
                    return Err(ApiError::bad_request(format!(
                        "{what} field '{name}' = {value} is not supported; only {allowed} is accepted"
                    )));
                }
            }
            Some((_, Refused(why))) => return Err(ApiError::bad_request(*why)),
            None => {
                return Err(ApiError::bad_request(format!(
                    "{what} has an unknown field '{name}'; the fields qwen-run reads or accepts are listed in its README (\"Request fields\")"
                )))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn extra(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn ignored_off_refused_unknown() {
        assert!(check(
            &extra(json!({"user": "x", "store": true})),
            &[OPENAI],
            "the request"
        )
        .is_ok());
        assert!(check(
            &extra(json!({"mirostat": 0})),
            &[OPENAI, LLAMA_SAMPLERS],
            "the request"
        )
        .is_ok());
        let e = check(
            &extra(json!({"mirostat": 2})),
            &[OPENAI, LLAMA_SAMPLERS],
            "the request",
        )
        .unwrap_err();
        assert!(
            e.message.contains("'mirostat'") && e.message.contains("0 (off)"),
            "{}",
            e.message
        );
        let e = check(&extra(json!({"functions": []})), &[OPENAI], "the request").unwrap_err();
        assert!(e.message.contains("'tools'"), "{}", e.message);
        let e = check(&extra(json!({"frobnicate": 1})), &[OPENAI], "the request").unwrap_err();
        assert!(e.message.contains("'frobnicate'"), "{}", e.message);
        assert!(check(
            &extra(json!({"num_thread": 8})),
            &[OLLAMA_OPTIONS],
            "options"
        )
        .is_ok());
    }
}
