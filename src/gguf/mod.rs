//! GGUF files: a memory-mapped reader (v2/v3, split files) and a writer for tests and synthetic models.
//!
//! Tensor data is never copied at load: `tensor_data` hands out slices of the mapping, so a warm
//! load costs only the header parse.

mod reader;
mod value;
mod writer;

pub use reader::{GgufFile, TensorInfo};
pub use value::Value;
pub use writer::{GgufWriter, TensorSource};

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: usize = 32;

/// Names of ggml tensor types that exist in the wild but that qwen-run does not implement, so an
/// error can say what the file holds instead of a bare number.
pub fn ggml_type_name(id: u32) -> Option<&'static str> {
    if let Some(t) = qwen_run_kernels::QuantType::from_ggml_id(id) {
        return Some(t.name());
    }
    Some(match id {
        4 => "Q4_2 (removed from ggml)",
        5 => "Q4_3 (removed from ggml)",
        9 => "Q8_1",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return None,
    })
}

/// The tensor types qwen-run reads, for error messages.
pub fn supported_type_names() -> String {
    (0..64)
        .filter_map(qwen_run_kernels::QuantType::from_ggml_id)
        .map(|t| t.name())
        .collect::<Vec<_>>()
        .join(", ")
}
