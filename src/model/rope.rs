//! Rotary position embedding frequencies, computed as HF transformers does (f32
//! inverse frequencies, f32 angles), for the `default` and `llama3` rope types.

use super::config::{ModelConfig, RopeScaling};

pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(c: &ModelConfig) -> Self {
        let dim = c.head_dim;
        let mut inv_freq: Vec<f32> = (0..dim / 2)
            .map(|i| {
                let exponent = (2 * i) as f32 / dim as f32;
                1.0 / (c.rope_theta.powf(exponent as f64) as f32)
            })
            .collect();
        if let RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } = c.rope_scaling
        {
            let low_freq_wavelen = old / low_freq_factor;
            let high_freq_wavelen = old / high_freq_factor;
            for f in inv_freq.iter_mut() {
                let inv = *f as f64;
                let wavelen = 2.0 * std::f64::consts::PI / inv;
                let scaled = if wavelen > low_freq_wavelen { inv / factor } else { inv };
                let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                *f = if medium {
                    let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    ((1.0 - smooth) * scaled / factor + smooth * scaled) as f32
                } else {
                    scaled as f32
                };
            }
        }
        Self { inv_freq }
    }

    /// `cos, sin [positions.len(), head_dim/2]` for the given positions.
    pub fn tables(&self, positions: &[u32]) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let angle = (p as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        (cos, sin)
    }
}
