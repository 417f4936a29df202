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
        DeviceChoice::Cuda => open_cuda().map_err(|e| anyhow::anyhow!("--device cuda: {e}")),
        DeviceChoice::Auto => Ok(open_cuda().unwrap_or(Device::Cpu)),
    }
}

fn open_cuda() -> Result<Device> {
    if !candle_core::utils::cuda_is_available() {
        bail!("this qwen-run was built without CUDA support. Rebuild with `cargo build --release --features cuda` (see README), or use --device cpu");
    }
    Device::new_cuda(0).map_err(|e| {
        // Candle appends a backtrace when RUST_BACKTRACE is set; keep the first line.
        let e = e.to_string();
        let e = e.lines().next().unwrap_or_default();
        anyhow::anyhow!(
            "no usable CUDA GPU ({e}). Check the driver with nvidia-smi, or use --device cpu"
        )
    })
}

/// Why no GPU can be opened, for error messages.
pub fn gpu_unavailable_reason() -> String {
    match open_cuda() {
        Ok(_) => "a GPU was found".to_string(),
        Err(e) => e.to_string(),
    }
}

/// "NVIDIA GeForce RTX 4090 (sm_89)", or the backend's name where the driver cannot say.
pub fn gpu_name(device: &Device) -> String {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        let ctx = d.cuda_stream().context().clone();
        if let (Ok(name), Ok((major, minor))) = (ctx.name(), ctx.compute_capability()) {
            return format!("{name} (sm_{major}{minor})");
        }
    }
    match device {
        Device::Cuda(_) => "CUDA GPU".to_string(),
        Device::Metal(_) => "Metal GPU".to_string(),
        Device::Cpu => "CPU".to_string(),
    }
}

/// (free, total) bytes of the GPU's memory, from the driver.
pub fn gpu_memory(device: &Device) -> Option<(usize, usize)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        return d.cuda_stream().context().mem_get_info().ok();
    }
    let _ = device;
    None
}
