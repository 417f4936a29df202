//! Which device the model loads on, and where it runs as the reports show it.

use super::Engine;
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

/// The device to load on. Never falls back silently: asking for CUDA (`--device cuda`, or GPU
/// layers with `-ngl N`, N > 0) without a usable GPU is an error.
pub fn select_device(choice: DeviceChoice, gpu_layers: Option<usize>) -> Result<Device> {
    let wants_gpu_layers = gpu_layers.filter(|&n| n > 0);
    let no_gpu = |n: usize, why: String| {
        anyhow::anyhow!(
            "--gpu-layers {n} asks for a GPU, but {why}. Drop --gpu-layers (or pass 0) to run on the CPU"
        )
    };
    match (choice, wants_gpu_layers) {
        (DeviceChoice::Cpu, Some(n)) => Err(no_gpu(n, "--device cpu was given".into())),
        (DeviceChoice::Cpu, None) => Ok(Device::Cpu),
        (DeviceChoice::Cuda, _) => open_cuda().map_err(|e| anyhow::anyhow!("--device cuda: {e}")),
        (DeviceChoice::Auto, Some(n)) => {
            open_cuda().map_err(|e| no_gpu(n, format!("none is usable ({e})")))
        }
        (DeviceChoice::Auto, None) => Ok(open_cuda().unwrap_or(Device::Cpu)),
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

impl Engine {
    /// The backend, as llama-bench's column names it: "CPU (avx2)", "CUDA", or "CUDA+CPU" when
    /// only some layers are offloaded.
    pub fn device_name(&self) -> String {
        let p = self.placement();
        match p.gpu() {
            None => format!("CPU ({})", qwen_run_kernels::simd_name()),
            Some(gpu) => {
                let name = match gpu {
                    Device::Cuda(_) => "CUDA",
                    _ => "Metal",
                };
                let all = p.gpu_layers() == p.layers.len() && !p.output.is_cpu();
                if all {
                    name.to_string()
                } else {
                    format!("{name}+CPU")
                }
            }
        }
    }

    /// Whether the weight tensor `name` lives on the GPU. A tied output head reads the embedding
    /// table from a GPU copy too, but lookups read the host copy: counted as host.
    pub fn on_gpu(&self, name: &str) -> bool {
        let p = self.placement();
        match name.strip_prefix("blk.").and_then(|r| r.split('.').next()) {
            Some(i) => i.parse::<usize>().is_ok_and(|i| !p.layers[i].is_cpu()),
            None => name != "token_embd.weight" && !p.output.is_cpu(),
        }
    }

    /// Where the model runs on the GPU and the GPU memory it takes, for the run report; None on
    /// the CPU.
    pub fn gpu_report(&self) -> Option<String> {
        let p = self.placement();
        let gpu = p.gpu()?;
        let c = self.config();
        let weights: usize = self
            .gguf
            .tensors
            .iter()
            .filter(|t| self.on_gpu(&t.name))
            .map(|t| t.size)
            .sum();
        let kv = self.kv_bytes_per_token() / c.n_layers * p.gpu_layers() * self.ctx_size;
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        let mut s = format!(
            "{}: {}/{} layers{} | weights {:.2} GiB + KV {:.2} GiB on the GPU",
            gpu_name(gpu),
            p.gpu_layers(),
            p.layers.len(),
            if p.output.is_cpu() { "" } else { " + output" },
            gib(weights),
            gib(kv)
        );
        if let Some((free, total)) = gpu_memory(gpu) {
            s.push_str(&format!(
                " | device memory {:.2} GiB used of {:.2} GiB",
                gib(total - free),
                gib(total)
            ));
        }
        Some(s)
    }
}
