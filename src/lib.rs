//! qwen-run: Qwen2.5 inference from quantized GGUF files, on Candle.
//!
//! The parts, from the file up: [`gguf`] reads model files, [`model`] is the Qwen2 forward pass
//! over quantized weights (CPU kernels in the `qwen-run-kernels` crate), [`kv_cache`] holds
//! attention state, [`tokenizer`] turns text into tokens and chats into prompts, [`sampler`]
//! picks tokens, and [`engine`] ties them into a streaming generation loop that the [`cli`] uses.

pub mod bench;
pub mod cli;
pub mod engine;
pub mod gguf;
pub mod hub;
pub mod kv_cache;
pub mod model;
pub mod prefix_cache;
pub mod sampler;
pub mod server;
pub mod tokenizer;
