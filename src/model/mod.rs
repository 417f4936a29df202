//! The model: Qwen2 weights from GGUF ([`qwen2`]), the types the engine shares with it
//! ([`config`]), and the [`ModelRunner`] that runs a step in one of two passes: [`host_pass`]
//! (the CPU with f32 caches, our kernels over host memory) or [`tensor_pass`] (Candle tensor ops
//! on any device and cache type).

mod attention;
mod config;
mod host_pass;
mod ops;
mod qwen2;
mod rope;
mod runner;
mod tensor_pass;
mod weight_arena;
mod weight_cache;
mod weights;

pub use config::{check_shapes, Config, Head, Logits, Placement, Sequence};
pub use qwen2::Qwen2;
pub use rope::{RopeOverrides, RopeParams, RopeScaling};
pub use runner::{ModelRunner, Pass};
pub use weight_arena::WeightArena;
pub use weight_cache::{layout_probe, WeightCache};
pub use weights::{Embedding, Linear, QMatrix};

/// A host-pass step with up to this many new tokens of a sequence gives each of them the
/// attention a step of that token alone gives; [`ModelRunner::exact_step_tokens`] adds the
/// limits of the model's weight types.
pub const EXACT_STEP_TOKENS: usize = qwen_run_kernels::attention::EXACT_STEP_TOKENS;
