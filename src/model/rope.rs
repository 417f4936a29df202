//! Rotary position embeddings and their context extension: the settings a GGUF file trains with
//! (`qwen2.rope.*`), the overrides llama.cpp's flags give (`--rope-scaling`, `--rope-scale`,
//! `--yarn-*`...), and the cos/sin tables both passes read.
//!
//! Context extension follows llama.cpp (ggml's `rope_yarn`), so a file gives the same logits
//! here as there with the same flags: *linear* scaling divides every position by the factor;
//! *YaRN* interpolates the low-frequency pairs like linear scaling, keeps the high-frequency ones
//! as trained, blends the pairs between on a ramp set by `beta_fast`/`beta_slow` and the original
//! context, and scales the attention logits by `(1 + 0.1 ln factor)^2` through the tables.
//! Qwen2.5's model cards extend 32k to 128k this way: `--rope-scaling yarn --rope-scale 4
//! --yarn-orig-ctx 32768`.

use crate::gguf::GgufFile;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

/// How positions are scaled beyond the trained context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeScaling {
    None,
    Linear,
    Yarn,
}

impl RopeScaling {
    pub fn parse(s: &str) -> Result<RopeScaling> {
        Ok(match s {
            "none" => RopeScaling::None,
            "linear" => RopeScaling::Linear,
            "yarn" => RopeScaling::Yarn,
            other => bail!("unknown rope scaling '{other}': use none, linear or yarn"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            RopeScaling::None => "none",
            RopeScaling::Linear => "linear",
            RopeScaling::Yarn => "yarn",
        }
    }
}

/// Settings given on the command line, each overriding the file's (llama.cpp's flags).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RopeOverrides {
    pub scaling: Option<RopeScaling>,
    /// `--rope-freq-scale`, or `1 / --rope-scale`.
    pub freq_scale: Option<f32>,
    pub freq_base: Option<f32>,
    pub orig_ctx: Option<usize>,
    pub ext_factor: Option<f32>,
    pub attn_factor: Option<f32>,
    pub beta_fast: Option<f32>,
    pub beta_slow: Option<f32>,
}

/// The rotary settings a model runs with, resolved from its file and the overrides.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeParams {
    pub scaling: RopeScaling,
    pub freq_base: f32,
    /// Positions are multiplied by this (1 / the context factor).
    pub freq_scale: f32,
    /// The context the model was trained with before extension (YaRN's ramp depends on it).
    pub orig_ctx: usize,
    /// YaRN's blend of extrapolated and interpolated frequencies; 0 is plain interpolation.
    pub ext_factor: f32,
    /// Multiplies cos and sin, and so the attention logits twice over.
    pub attn_factor: f32,
    pub beta_fast: f32,
    pub beta_slow: f32,
}

impl RopeParams {
    /// The file's settings (`<arch>.rope.*`), with llama.cpp's defaults where a key is absent.
    /// `context_length` is the file's `<arch>.context_length`.
    pub fn from_gguf(gguf: &GgufFile, arch: &str, context_length: usize) -> Result<RopeParams> {
        let key = |k: &str| format!("{arch}.rope.{k}");
        let float = |k: &str| -> Result<Option<f32>> {
            match gguf.get(&key(k)) {
                None => Ok(None),
                Some(v) => match v.as_f64() {
                    Some(x) if x.is_finite() => Ok(Some(x as f32)),
                    _ => bail!(
                        "GGUF metadata key '{}' in {} is not a finite number; the file is broken (or remove the key)",
                        key(k),
                        gguf.path.display()
                    ),
                },
            }
        };
        let scaling = match gguf.get(&key("scaling.type")) {
            None => RopeScaling::Linear,
            Some(v) => match v.as_str().map(RopeScaling::parse) {
                Some(Ok(s)) => s,
                _ => bail!(
                    "GGUF metadata key '{}' in {} is {v:?}; qwen-run knows none, linear and yarn (override it with --rope-scaling)",
                    key("scaling.type"),
                    gguf.path.display()
                ),
            },
        };
        let factor = match float("scaling.factor")? {
            Some(f) => Some(f),
            None => float("scale_linear")?,
        };
        let orig_ctx = match gguf.get(&key("scaling.original_context_length")) {
            None => context_length,
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => n as usize,
                _ => bail!(
                    "GGUF metadata key '{}' in {} is {v:?}, not a positive token count; the file is broken",
                    key("scaling.original_context_length"),
                    gguf.path.display()
                ),
            },
        };
        let params = RopeParams {
            scaling,
            freq_base: float("freq_base")?.unwrap_or(10_000.0),
            freq_scale: match factor {
                None | Some(0.0) => 1.0,
                Some(f) if f > 0.0 => 1.0 / f,
                Some(f) => bail!(
                    "GGUF metadata key '{}' in {} is {f}, a negative rope scaling factor; the file is broken (override it with --rope-scale)",
                    key("scaling.factor"),
                    gguf.path.display()
                ),
            },
            orig_ctx,
            ext_factor: float("scaling.yarn_ext_factor")?.unwrap_or(-1.0),
            attn_factor: float("scaling.attn_factor")?.unwrap_or(1.0),
            beta_fast: float("scaling.yarn_beta_fast")?.unwrap_or(32.0),
            beta_slow: float("scaling.yarn_beta_slow")?.unwrap_or(1.0),
        };
        params.resolve(&RopeOverrides::default(), "the file")
    }

    /// These settings with `o` applied, checked; `origin` names where a bad value came from.
    ///
    /// As llama.cpp: scaling `none` never scales; an unset extension factor is 1 for YaRN and 0
    /// otherwise; with YaRN the attention factor is the file's `rope.scaling.attn_factor` times
    /// the magnitude correction `1 + 0.1 ln factor`, which the tables apply. llama.cpp b11434
    /// drops `--yarn-attn-factor` when YaRN extrapolates; here it multiplies, so the flag does
    /// what it says.
    pub fn resolve(&self, o: &RopeOverrides, origin: &str) -> Result<RopeParams> {
        let mut p = *self;
        if let Some(s) = o.scaling {
            p.scaling = s;
        }
        let positive = |v: Option<f32>, what: &str, cur: f32| -> Result<f32> {
            match v {
                None => Ok(cur),
                Some(x) if x.is_finite() && x > 0.0 => Ok(x),
                Some(x) => bail!("{what} {x} (from {origin}) must be a positive number"),
            }
        };
        p.freq_base = positive(o.freq_base, "the rope frequency base", p.freq_base)?;
        p.freq_scale = positive(o.freq_scale, "the rope frequency scale", p.freq_scale)?;
        p.beta_fast = positive(o.beta_fast, "--yarn-beta-fast", p.beta_fast)?;
        p.beta_slow = positive(o.beta_slow, "--yarn-beta-slow", p.beta_slow)?;
        if let Some(n) = o.orig_ctx {
            if n == 0 {
                bail!("--yarn-orig-ctx must be at least 1 token");
            }
            p.orig_ctx = n;
        }
        if let Some(e) = o.ext_factor {
            if !(e.is_finite() && (0.0..=1.0).contains(&e)) {
                bail!("--yarn-ext-factor {e} must be between 0 (plain interpolation) and 1");
            }
            p.ext_factor = e;
        }
        if p.freq_base <= 1.0 {
            bail!(
                "the rope frequency base {} (from {origin}) must be above 1",
                p.freq_base
            );
        }
        if p.scaling == RopeScaling::None {
            p.freq_scale = 1.0;
        }
        if p.ext_factor < 0.0 || (o.ext_factor.is_none() && o.scaling.is_some()) {
            p.ext_factor = if p.scaling == RopeScaling::Yarn {
                1.0
            } else {
                0.0
            };
        }
        let user_attn = positive(o.attn_factor, "--yarn-attn-factor", 1.0)?;
        p.attn_factor = self.attn_factor * user_attn;
        Ok(p)
    }

    /// The longest context these settings serve: the file's, or the original one stretched by
    /// the scaling factor.
    pub fn max_context(&self, trained: usize) -> usize {
        match self.scaling {
            RopeScaling::None => trained,
            _ if self.freq_scale < 1.0 => {
                let stretched = (self.orig_ctx as f64 / self.freq_scale as f64) as usize;
                trained.max(stretched)
            }
            _ => trained,
        }
    }

    /// cos/sin tables `[positions, head_dim / 2]` for NeoX-style rotary embeddings: pair `i` of
    /// position `p` turns by `p * base^(-2i / head_dim)`, scaled and blended as these settings say.
    pub fn tables(&self, head_dim: usize, positions: usize) -> (Vec<f32>, Vec<f32>) {
        let half = head_dim / 2;
        let (low, high) = self.yarn_ramp_dims(head_dim);
        let yarn = self.ext_factor != 0.0;
        // YaRN's magnitude correction, for stretched contexts only (as llama.cpp's net factor)
        let mscale = match yarn && self.freq_scale < 1.0 {
            true => self.attn_factor * (1.0 + 0.1 * (1.0 / self.freq_scale).ln()),
            false => self.attn_factor,
        };
        let pairs: Vec<(f32, f32)> = (0..half)
            .map(|i| {
                let inv_freq = self.freq_base.powf(-2.0 * i as f32 / head_dim as f32);
                // share of the extrapolated (trained) frequency: 1 for the fast pairs, 0 for the slow
                let ramp = 1.0 - ((i as f32 - low) / (high - low).max(0.001)).clamp(0.0, 1.0);
                let mix = if yarn { ramp * self.ext_factor } else { 0.0 };
                (inv_freq, mix)
            })
            .collect();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for &(inv_freq, mix) in &pairs {
                let extrap = p as f32 * inv_freq;
                let interp = self.freq_scale * extrap;
                let theta = interp * (1.0 - mix) + extrap * mix;
                cos.push(theta.cos() * mscale);
                sin.push(theta.sin() * mscale);
            }
        }
        (cos, sin)
    }

    /// The pairs between which YaRN's ramp goes from trained to interpolated frequencies: those
    /// turning `beta_fast` and `beta_slow` times over the original context.
    fn yarn_ramp_dims(&self, head_dim: usize) -> (f32, f32) {
        let dim = |turns: f32| {
            head_dim as f32 * (self.orig_ctx as f32 / (turns * 2.0 * std::f32::consts::PI)).ln()
                / (2.0 * self.freq_base.ln())
        };
        let low = dim(self.beta_fast).floor().max(0.0);
        let high = dim(self.beta_slow).ceil().min(head_dim as f32 - 1.0);
        (low, high)
    }

    /// "rope yarn x4 of 32768" when positions are scaled; None when they run as trained.
    pub fn scaling_note(&self) -> Option<String> {
        match self.freq_scale == 1.0 && self.ext_factor == 0.0 && self.attn_factor == 1.0 {
            true => None,
            false => Some(format!(
                "rope {} x{} of {}",
                self.scaling.name(),
                1.0 / self.freq_scale,
                self.orig_ctx
            )),
        }
    }

    /// A fingerprint of the settings, for keys of caches whose contents depend on them.
    pub fn fingerprint(&self) -> [u8; 33] {
        let mut b = [0u8; 33];
        b[0] = self.scaling as u8;
        let fields = [
            self.freq_base,
            self.freq_scale,
            self.orig_ctx as f32,
            self.ext_factor,
            self.attn_factor,
            self.beta_fast,
            self.beta_slow,
            0.0,
        ];
        for (i, f) in fields.iter().enumerate() {
            b[1 + 4 * i..5 + 4 * i].copy_from_slice(&f.to_le_bytes());
        }
        b
    }

    /// The tables as tensors on `device`.
    pub fn tensors(
        &self,
        head_dim: usize,
        positions: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let (cos, sin) = self.tables(head_dim, positions);
        let half = head_dim / 2;
        Ok((
            Tensor::from_vec(cos, (positions, half), device)?,
            Tensor::from_vec(sin, (positions, half), device)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain() -> RopeParams {
        RopeParams {
            scaling: RopeScaling::Linear,
            freq_base: 1e6,
            freq_scale: 1.0,
            orig_ctx: 32768,
            ext_factor: 0.0,
            attn_factor: 1.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
        }
    }

    #[test]
    fn unscaled_tables_turn_each_pair_at_its_frequency() {
        let (cos, sin) = plain().tables(8, 3);
        for p in 0..3 {
            for i in 0..4 {
                let theta = p as f32 * 1e6f32.powf(-2.0 * i as f32 / 8.0);
                assert!((cos[p * 4 + i] - theta.cos()).abs() < 1e-6);
                assert!((sin[p * 4 + i] - theta.sin()).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn linear_scaling_divides_positions() {
        let o = RopeOverrides {
            freq_scale: Some(0.25),
            ..Default::default()
        };
        let scaled = plain().resolve(&o, "test").unwrap();
        let (c4, s4) = scaled.tables(8, 9);
        let (c1, s1) = plain().tables(8, 3);
        // position 8 at a quarter the speed is position 2 unscaled
        assert_eq!(&c4[8 * 4..9 * 4], &c1[2 * 4..3 * 4]);
        assert_eq!(&s4[8 * 4..9 * 4], &s1[2 * 4..3 * 4]);
        assert_eq!(scaled.max_context(32768), 131072);
    }

    #[test]
    fn none_never_scales_and_keeps_the_trained_context() {
        let o = RopeOverrides {
            scaling: Some(RopeScaling::None),
            freq_scale: Some(0.25),
            ..Default::default()
        };
        let p = plain().resolve(&o, "test").unwrap();
        assert_eq!(p.freq_scale, 1.0);
        assert_eq!(p.max_context(32768), 32768);
        assert_eq!(p.tables(8, 5), plain().tables(8, 5));
    }

    #[test]
    fn yarn_keeps_fast_pairs_interpolates_slow_ones_and_scales_magnitude() {
        let o = RopeOverrides {
            scaling: Some(RopeScaling::Yarn),
            freq_scale: Some(0.25),
            ..Default::default()
        };
        let y = plain().resolve(&o, "test").unwrap();
        assert_eq!(y.ext_factor, 1.0);
        let head = 128;
        let (low, high) = y.yarn_ramp_dims(head);
        // Qwen2.5 (base 1e6, head 128, 32k): pairs up to 23 keep their frequency, from 40 on are
        // interpolated, as llama.cpp's corr dims give
        assert_eq!((low, high), (23.0, 40.0));
        let m = 1.0 + 0.1 * 4f32.ln();
        let (cos, sin) = y.tables(head, 1001);
        let half = head / 2;
        let at = |p: usize, i: usize| (cos[p * half + i] / m, sin[p * half + i] / m);
        let inv = |i: usize| 1e6f32.powf(-2.0 * i as f32 / head as f32);
        let (c, s) = at(1000, 0);
        assert!((c - 1000f32.cos()).abs() < 1e-5 && (s - 1000f32.sin()).abs() < 1e-5);
        let (c, _) = at(1000, 60);
        assert!((c - (250.0 * inv(60)).cos()).abs() < 1e-5);
        // no magnitude change without YaRN's extrapolation
        let o = RopeOverrides {
            ext_factor: Some(0.0),
            ..o
        };
        let lin = plain().resolve(&o, "test").unwrap();
        assert!((lin.tables(head, 2).0[0] - 1.0).abs() < 1e-7);
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        let bad = [
            RopeOverrides {
                freq_scale: Some(0.0),
                ..Default::default()
            },
            RopeOverrides {
                freq_base: Some(f32::NAN),
                ..Default::default()
            },
            RopeOverrides {
                orig_ctx: Some(0),
                ..Default::default()
            },
            RopeOverrides {
                ext_factor: Some(2.0),
                ..Default::default()
            },
            RopeOverrides {
                beta_fast: Some(-1.0),
                ..Default::default()
            },
        ];
        for o in bad {
            assert!(plain().resolve(&o, "test").is_err(), "{o:?}");
        }
    }
}
