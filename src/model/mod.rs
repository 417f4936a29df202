//! Model code: Qwen2 built from GGUF weights, device-generic over Candle tensors.

mod attention;
mod ops;
mod qwen2;
mod weight_arena;
mod weights;

pub use qwen2::{check_shapes, Config, Logits, Placement, Qwen2, Sequence};
pub use weight_arena::WeightArena;
pub use weights::{Embedding, Linear, QMatrix};
