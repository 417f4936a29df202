//! qwen-run: Qwen2.5 inference from quantized GGUF files, on Candle.
//!
//! The parts, from the file up: [`gguf`] reads model files, [`model`] runs Qwen2 steps over
//! quantized weights (CPU kernels in the `qwen-run-kernels` crate), [`kv_cache`] holds attention
//! state, [`prefix_cache`] reuses prompt prefixes, [`tokenizer`] turns text into tokens and chats
//! into prompts, [`sampler`] picks tokens, [`speculative`] proposes tokens ahead, [`engine`] is a loaded model on its threads,
//! [`scheduler`] is the one generation loop, and [`server`] and [`cli`] are layers on top.
//! docs/ARCHITECTURE.md has the call graph.

pub mod bench;
pub mod cli;
pub mod engine;
pub mod gguf;
pub mod grammar;
pub mod hub;
pub mod kv_cache;
pub mod model;
pub mod prefix_cache;
pub mod sampler;
pub mod scheduler;
pub mod server;
pub mod speculative;
pub mod tokenizer;
