//! Model code: Qwen2 built from GGUF weights, device-generic over Candle tensors, with a pass
//! over host memory for CPU decode steps.

mod attention;
mod host_pass;
mod ops;
mod qwen2;
mod weight_arena;
mod weights;

pub use qwen2::{check_shapes, Config, Logits, Placement, Qwen2, Sequence};
pub use weight_arena::WeightArena;
pub use weights::{Embedding, Linear, QMatrix};
