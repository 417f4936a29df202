use anyhow::{bail, Result};
use candle_core::Device;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    Cuda,
    /// The GPU when one is compiled in and visible, else the CPU; the report says which.
    Auto,
}

impl DeviceChoice {
    pub fn parse(s: &str) -> Result<DeviceChoice> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "cpu" => DeviceChoice::Cpu,
            "cuda" | "gpu" => DeviceChoice::Cuda,
            "auto" => DeviceChoice::Auto,
            other => bail!("unknown device '{other}': expected cpu, cuda or auto"),
        })
    }
}

/// Never falls back silently: asking for CUDA without it is an error.
pub fn select_device(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda => {
            if !candle_core::utils::cuda_is_available() {
                bail!("--device cuda: this qwen-run was built without CUDA support. Rebuild with `cargo build --release --features cuda` (see README), or use --device cpu");
            }
            Device::new_cuda(0).map_err(|e| {
                // Candle appends a backtrace when RUST_BACKTRACE is set; keep the first line.
                let e = e.to_string();
                let e = e.lines().next().unwrap_or_default();
                anyhow::anyhow!("--device cuda: no usable CUDA GPU ({e}). Check the driver with nvidia-smi, or use --device cpu")
            })
        }
        DeviceChoice::Auto => {
            if candle_core::utils::cuda_is_available() {
                if let Ok(d) = Device::new_cuda(0) {
                    return Ok(d);
                }
            }
            Ok(Device::Cpu)
        }
    }
}
