//! The Llama / Qwen2 decoder, forward and manual backward, written once against
//! [`Ops`]. Reads top to bottom like HF's `LlamaDecoderLayer`:
//!
//! ```text
//! h   = x + o_proj(attn(rope(q_proj(n1)), rope(k_proj(n1)), v_proj(n1)))   n1 = rmsnorm(x)
//! out = h + down_proj(silu(gate_proj(n2)) * up_proj(n2))                     n2 = rmsnorm(h)
//! ```
//!
//! The forward keeps what the backward needs ([`LayerActs`]); the backward walks the
//! layers in reverse and accumulates gradients into [`Grads`]: the LoRA tensors' in a
//! LoRA run, where the base weights get none, and every model tensor's in a full
//! fine-tuning run.

use anyhow::{ensure, Context, Result};

use super::generate::KvCache;
use super::lora::{Adapter, Proj};
use super::rope::Rope;
use super::weights::Model;
use crate::ops::{AttnLayout, AttnShape, Dropout, InputGrad, LinearGradRef, LoraRef, Ops};

/// Where a backward accumulates (`+=`) its gradients, each buffer shaped like the
/// tensor it is the gradient of: the adapter's LoRA tensors, the model's own tensors
/// (full fine-tuning), or both. A part left `None` costs nothing: without `model` the
/// backward does no weight-gradient products and stops before the embedding.
pub struct Grads<'a, T> {
    pub adapter: Option<&'a mut Adapter<T>>,
    pub model: Option<&'a mut Model<T>>,
}

impl<'a, T> Grads<'a, T> {
    pub fn adapter(g: &'a mut Adapter<T>) -> Self {
        Self { adapter: Some(g), model: None }
    }

    pub fn model(g: &'a mut Model<T>) -> Self {
        Self { adapter: None, model: Some(g) }
    }

    /// Decoder layers these gradients cover.
    pub fn n_layers(&self) -> usize {
        match (&self.adapter, &self.model) {
            (Some(a), _) => a.layers.len(),
            (None, Some(m)) => m.layers.len(),
            (None, None) => 0,
        }
    }

    /// The gradient buffers of decoder layer `l`: its LoRA pairs (A, B by projection),
    /// then, for the model's own, its two norms and each projection's weight and bias.
    pub fn layer(&self, l: usize) -> Vec<&T> {
        let mut out = Vec::new();
        if let Some(layer) = self.adapter.as_deref().and_then(|a| a.layers.get(l)) {
            out.extend(layer.iter().flatten().flat_map(|p| [&p.a, &p.b]));
        }
        if let Some(layer) = self.model.as_deref().and_then(|m| m.layers.get(l)) {
            out.extend([&layer.input_layernorm, &layer.post_attention_layernorm]);
            for lin in &layer.proj {
                out.push(&lin.w);
                out.extend(lin.b.as_ref());
            }
        }
        out
    }
}

/// Called by the backward with each decoder layer's index as soon as that layer's
/// gradients are complete (layers in reverse order), with the gradient buffers: a data
/// parallel step starts summing them over the ranks while the backward goes on.
pub type LayerDone<'a, T> = &'a dyn Fn(usize, &Grads<'_, T>) -> Result<()>;

/// What one forward runs on: token ids with their positions and the attention layout.
pub struct StepInputs<O: Ops> {
    pub ids: O::Ids,
    pub n_tokens: usize,
    pub cos: O::Tensor,
    pub sin: O::Tensor,
    pub layout: AttnLayout,
    /// With a KV cache: `(first row of this step, cache row, rows)` runs to append.
    pub cache_writes: Vec<(usize, usize, usize)>,
}

impl<O: Ops> StepInputs<O> {
    pub fn new(ops: &O, rope: &Rope, ids: &[u32], positions: &[u32], layout: AttnLayout) -> Result<Self> {
        ensure!(ids.len() == positions.len(), "{} ids but {} positions", ids.len(), positions.len());
        let (cos, sin) = rope.tables(positions);
        let half = cos.len() / ids.len().max(1);
        Ok(Self {
            ids: ops.upload_ids(ids)?,
            n_tokens: ids.len(),
            cos: ops.upload(&cos, &[ids.len(), half])?,
            sin: ops.upload(&sin, &[ids.len(), half])?,
            layout,
            cache_writes: Vec::new(),
        })
    }
}

/// What a decoder layer's backward needs from its forward.
pub struct LayerActs<T> {
    /// The layer's input (the residual stream).
    pub x_in: T,
    /// The normed inputs of the attention and MLP projections and the SwiGLU output:
    /// `None` in the activations a forward keeps for the backward, which recomputes
    /// them from `x_in`, `h`, `gate` and `up` (the same bits; the SwiGLU output, where
    /// down_proj's gradients need it, in the SwiGLU backward's pass: `Ops::swiglu_bwd_h`)
    /// rather than hold 2·hidden + intermediate values per token and layer.
    pub n1: Option<T>,
    pub rstd1: T,
    /// After RoPE.
    pub q: T,
    pub k: T,
    pub v: T,
    pub attn: T,
    pub lse: T,
    /// The residual stream after attention.
    pub h: T,
    pub n2: Option<T>,
    pub rstd2: T,
    pub gate: T,
    pub up: T,
    pub act: Option<T>,
    /// `x·Aᵀ` of each LoRA projection, by `Proj as usize`.
    pub xa: [Option<T>; 7],
}

/// Which layers' activations a training forward recomputes in the backward instead of
/// keeping them (activation checkpointing): such a layer keeps only its input, and the
/// backward runs its forward again (the same dropout masks, the same bits) first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Recompute {
    /// Every layer keeps its activations.
    #[default]
    Off,
    /// Layers 0, k, 2k, ... are recomputed (torchtune's selective checkpointing): 1 is
    /// every layer, 2 every other one. Each recomputed layer trades its kept activations
    /// for one more forward of it.
    Every(usize),
}

impl Recompute {
    /// Every `k`-th layer; `None` for 0, which names no layer interval.
    pub fn every(k: usize) -> Option<Self> {
        (k >= 1).then_some(Recompute::Every(k))
    }

    /// Whether layer `l` is recomputed.
    pub fn layer(self, l: usize) -> bool {
        match self {
            Recompute::Off => false,
            Recompute::Every(k) => k > 0 && l % k == 0,
        }
    }

    /// How many of `n` layers are recomputed.
    pub fn count(self, n: usize) -> usize {
        (0..n).filter(|&l| self.layer(l)).count()
    }

    /// For reports: "off", "every layer", "every 2nd layer (8 of 16)".
    pub fn describe(self, n: usize) -> String {
        match self {
            Recompute::Off | Recompute::Every(0) => "off".into(),
            Recompute::Every(1) => "every layer".into(),
            Recompute::Every(k) => {
                let nth = match (k % 10, k % 100) {
                    (1, r) if r != 11 => "st",
                    (2, r) if r != 12 => "nd",
                    (3, r) if r != 13 => "rd",
                    _ => "th",
                };
                format!("every {k}{nth} layer ({} of {n})", self.count(n))
            }
        }
    }
}

/// What a training forward keeps of one layer for the backward.
pub enum Kept<T> {
    Acts(LayerActs<T>),
    /// Only the layer's input: the backward recomputes the rest.
    Input(T),
}

impl<T> Kept<T> {
    /// The layer's input (the residual stream before it).
    pub fn x_in(&self) -> &T {
        match self {
            Kept::Acts(a) => &a.x_in,
            Kept::Input(x) => x,
        }
    }
}

pub struct ForwardState<T> {
    /// What every layer kept, for a forward that keeps activations (empty otherwise).
    pub layers: Vec<Kept<T>>,
    /// The last layer's output.
    pub x_out: T,
    pub final_norm: T,
    pub final_rstd: T,
}

impl<T> ForwardState<T> {
    /// The output of decoder layer `i` (the input of layer `i + 1`).
    pub fn layer_out(&self, i: usize) -> &T {
        self.layers.get(i + 1).map(Kept::x_in).unwrap_or(&self.x_out)
    }
}

pub struct Decoder<'a, O: Ops> {
    pub ops: &'a O,
    pub model: &'a Model<O::Tensor>,
    pub adapter: Option<&'a Adapter<O::Tensor>>,
    pub rope: Rope,
    /// LoRA dropout for a training step: probability and the step's seed (each
    /// layer and projection draws its own mask from it).
    pub lora_dropout: Option<Dropout>,
    /// Activation recompute: which layers a forward for a backward keeps only the
    /// input of, their forward run again in the backward. Less memory for more compute.
    pub recompute: Recompute,
    /// Told when the backward has finished each layer's gradients.
    pub layer_done: Option<LayerDone<'a, O::Tensor>>,
}

impl<'a, O: Ops> Decoder<'a, O> {
    pub fn new(ops: &'a O, model: &'a Model<O::Tensor>, adapter: Option<&'a Adapter<O::Tensor>>) -> Self {
        Self {
            ops,
            model,
            adapter,
            rope: Rope::new(&model.cfg),
            lora_dropout: None,
            recompute: Recompute::Off,
            layer_done: None,
        }
    }

    pub fn attn_shape(&self) -> AttnShape {
        let c = &self.model.cfg;
        AttnShape { n_heads: c.num_attention_heads, n_kv_heads: c.num_key_value_heads, head_dim: c.head_dim }
    }

    /// The LoRA path of projection `p` in layer `l`, with this step's dropout mask.
    fn lora(&self, l: usize, p: Proj) -> Option<LoraRef<'a, O::Tensor>> {
        let mut lora = self.adapter.and_then(|a| a.lora_ref(l, p))?;
        lora.dropout = self.lora_dropout.filter(|d| d.p > 0.0).map(|d| Dropout {
            p: d.p,
            seed: d.seed ^ ((l as u64) << 8 | p as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93),
        });
        Some(lora)
    }

    /// The largest LoRA rank among projections `ps` of layer `l` (0 without any): the
    /// room [`Ops::rmsnorm_fwd`] and [`Ops::swiglu_fwd`] leave for their LoRA paths.
    fn lora_rank(&self, l: usize, ps: &[Proj]) -> usize {
        let rank = |p: Proj| self.adapter.and_then(|a| a.pair(l, p)).map(|pair| self.ops.shape(&pair.a)[0]);
        ps.iter().filter_map(|&p| rank(p)).max().unwrap_or(0)
    }

    /// Projection `p` of layer `l` on `x`, added to `residual` when given.
    fn linear_fwd(
        &self,
        l: usize,
        p: Proj,
        x: &O::Tensor,
        residual: Option<&O::Tensor>,
    ) -> Result<(O::Tensor, Option<O::Tensor>)> {
        let lin = &self.model.layers[l].proj[p as usize];
        let lora = self.lora(l, p);
        self.ops.linear_fwd(x, &lin.w, lin.b.as_ref(), lora, residual)
    }

    #[allow(clippy::too_many_arguments)]
    fn linear_bwd(
        &self,
        l: usize,
        p: Proj,
        dy: &O::Tensor,
        x: &O::Tensor,
        acts: &LayerActs<O::Tensor>,
        grads: &mut Grads<O::Tensor>,
        dx_to: InputGrad<O::Tensor>,
    ) -> Result<Option<O::Tensor>> {
        let lin = &self.model.layers[l].proj[p as usize];
        let lora = self.lora(l, p);
        let g = grads.adapter.as_deref_mut().and_then(|g| g.grad_ref(l, p));
        let wg = grads.model.as_deref_mut().map(|m| m.layers[l].proj[p as usize].grad_ref());
        self.ops.linear_bwd(dy, x, &lin.w, lora, acts.xa[p as usize].as_ref(), g, wg, dx_to)
    }

    /// Forward over all layers. With a cache, this step's K/V rows are appended to it
    /// and attention reads the cache (the layout's key spans index cache rows).
    /// `keep` keeps every layer's activations for a backward; without it only the
    /// final norm's output is meaningful.
    pub fn forward(
        &self,
        inp: &StepInputs<O>,
        mut cache: Option<&mut KvCache<O::Tensor>>,
        keep: bool,
    ) -> Result<ForwardState<O::Tensor>> {
        let ops = self.ops;
        let c = &self.model.cfg;
        let mut x = ops.embedding_fwd(&self.model.embed_tokens, &inp.ids)?;
        let mut layers = Vec::with_capacity(if keep { c.num_hidden_layers } else { 0 });
        for l in 0..c.num_hidden_layers {
            let _span = tracing::trace_span!("layer_fwd", l).entered();
            let (out, acts) = self.layer_forward(l, x, inp, cache.as_deref_mut())?;
            x = out;
            if keep && self.recompute.layer(l) {
                layers.push(Kept::Input(acts.x_in));
            } else if keep {
                layers.push(Kept::Acts(LayerActs { n1: None, n2: None, act: None, ..acts }));
            }
        }
        let (final_norm, final_rstd) = ops.rmsnorm_fwd(&x, &self.model.norm, c.rms_norm_eps, 0)?;
        Ok(ForwardState { layers, x_out: x, final_norm, final_rstd })
    }

    /// Decoder layer `l` on its input `x`: its output and its activations (`x` among
    /// them, as `x_in`).
    fn layer_forward(
        &self,
        l: usize,
        x: O::Tensor,
        inp: &StepInputs<O>,
        cache: Option<&mut KvCache<O::Tensor>>,
    ) -> Result<(O::Tensor, LayerActs<O::Tensor>)> {
        let ops = self.ops;
        let c = &self.model.cfg;
        let shape = self.attn_shape();
        let layer = &self.model.layers[l];
        let mut xa: [Option<O::Tensor>; 7] = Default::default();
        let tail = self.lora_rank(l, &[Proj::Q, Proj::K, Proj::V]);
        let (n1, rstd1) = ops.rmsnorm_fwd(&x, &layer.input_layernorm, c.rms_norm_eps, tail)?;
        let (mut q, xa_q) = self.linear_fwd(l, Proj::Q, &n1, None)?;
        let (mut k, xa_k) = self.linear_fwd(l, Proj::K, &n1, None)?;
        let (v, xa_v) = self.linear_fwd(l, Proj::V, &n1, None)?;
        (xa[Proj::Q as usize], xa[Proj::K as usize], xa[Proj::V as usize]) = (xa_q, xa_k, xa_v);
        ops.rope_fwd(&mut q, &mut k, &inp.cos, &inp.sin, c.head_dim)?;
        let tail = self.lora_rank(l, &[Proj::O]);
        let (attn, lse) = match cache {
            None => ops.attention_fwd(&q, &k, &v, shape, &inp.layout, tail)?,
            Some(cache) => {
                for &(src, dst, n) in &inp.cache_writes {
                    ops.copy_rows(&mut cache.k[l], dst, &k, src, n)?;
                    ops.copy_rows(&mut cache.v[l], dst, &v, src, n)?;
                }
                ops.attention_fwd(&q, &cache.k[l], &cache.v[l], shape, &inp.layout, tail)?
            }
        };
        // the residual adds happen in the projections' products
        let (h, xa_o) = self.linear_fwd(l, Proj::O, &attn, Some(&x))?;
        xa[Proj::O as usize] = xa_o;
        let tail = self.lora_rank(l, &[Proj::Gate, Proj::Up]);
        let (n2, rstd2) = ops.rmsnorm_fwd(&h, &layer.post_attention_layernorm, c.rms_norm_eps, tail)?;
        let (gate, xa_g) = self.linear_fwd(l, Proj::Gate, &n2, None)?;
        let (up, xa_u) = self.linear_fwd(l, Proj::Up, &n2, None)?;
        let act = ops.swiglu_fwd(&gate, &up, self.lora_rank(l, &[Proj::Down]))?;
        let (out, xa_d) = self.linear_fwd(l, Proj::Down, &act, Some(&h))?;
        (xa[Proj::Gate as usize], xa[Proj::Up as usize], xa[Proj::Down as usize]) = (xa_g, xa_u, xa_d);
        let (n1, n2, act) = (Some(n1), Some(n2), Some(act));
        Ok((out, LayerActs { x_in: x, n1, rstd1, q, k, v, attn, lse, h, n2, rstd2, gate, up, act, xa }))
    }

    /// `[rows, vocab]` logits of the given rows of the final norm's output (all rows
    /// when `rows` is None).
    pub fn logits(&self, state: &ForwardState<O::Tensor>, rows: Option<&[usize]>) -> Result<O::Tensor> {
        let gathered;
        let x = match rows {
            None => &state.final_norm,
            Some(r) => {
                gathered = self.ops.gather_rows(&state.final_norm, r)?;
                &gathered
            }
        };
        Ok(self.ops.linear_fwd(x, self.model.lm_head(), None, None, None)?.0)
    }

    /// Backward from `dlogits [N, V]` through every layer; gradients are accumulated
    /// (`+=`) into `grads`.
    pub fn backward(
        &self,
        inp: &StepInputs<O>,
        state: &ForwardState<O::Tensor>,
        dlogits: &O::Tensor,
        mut grads: Grads<O::Tensor>,
    ) -> Result<()> {
        let dnorm = self.head_backward(&state.final_norm, dlogits, &mut grads)?;
        self.backward_from_norm(inp, state, &dnorm, grads)
    }

    /// The lm_head's backward for rows `x` of the final norm's output: returns their
    /// gradient, and with model gradients accumulates the lm_head's (`+=`).
    pub fn head_backward(
        &self,
        x: &O::Tensor,
        dlogits: &O::Tensor,
        grads: &mut Grads<O::Tensor>,
    ) -> Result<O::Tensor> {
        self.check_grads(grads)?;
        let head_grad = grads.model.as_deref_mut().map(|g| LinearGradRef { dw: g.lm_head_mut(), db: None });
        self.ops
            .linear_bwd(dlogits, x, self.model.lm_head(), None, None, None, head_grad, InputGrad::New)?
            .context("lm_head backward gave no input gradient")
    }

    fn check_grads(&self, grads: &Grads<O::Tensor>) -> Result<()> {
        if let Some(g) = grads.model.as_deref() {
            // a tied model's lm_head gradient goes into the embedding's: the buffers
            // must be tied the same way
            ensure!(
                g.layers.len() == self.model.layers.len()
                    && g.lm_head.is_some() == self.model.lm_head.is_some(),
                "model gradients are not shaped like the model"
            );
        }
        Ok(())
    }

    /// Backward from `dnorm`, the gradient of the final norm's output (what
    /// [`Decoder::head_backward`] gives), through every layer; gradients are accumulated
    /// (`+=`) into `grads`.
    pub fn backward_from_norm(
        &self,
        inp: &StepInputs<O>,
        state: &ForwardState<O::Tensor>,
        dnorm: &O::Tensor,
        mut grads: Grads<O::Tensor>,
    ) -> Result<()> {
        let ops = self.ops;
        let c = &self.model.cfg;
        let shape = self.attn_shape();
        ensure!(
            state.layers.len() == c.num_hidden_layers,
            "backward needs a forward that kept its activations"
        );
        self.check_grads(&grads)?;
        let full = grads.model.is_some();
        let dw = grads.model.as_deref_mut().map(|g| &mut g.norm);
        // the gradient of the current layer's output, one buffer down the residual stream
        // (with room for the LoRA paths of o_proj and down_proj, which read it); None once
        // a LoRA run's first layer has no input gradient to give
        let tail = (0..c.num_hidden_layers).map(|l| self.lora_rank(l, &[Proj::O, Proj::Down])).max();
        let tail = tail.unwrap_or(0);
        let mut dx = Some(ops.rmsnorm_bwd(
            dnorm,
            &state.x_out,
            &self.model.norm,
            &state.final_rstd,
            dw,
            None,
            tail,
        )?);
        for l in (0..c.num_hidden_layers).rev() {
            let dx_out = dx.take().context("backward past a layer that gave no input gradient")?;
            let _span = tracing::trace_span!("layer_bwd", l).entered();
            let recomputed;
            let a = match &state.layers[l] {
                Kept::Acts(a) => a,
                Kept::Input(x) => {
                    let _range = crate::profiling::range(c"recompute");
                    let rows: Vec<usize> = (0..crate::ops::rows_cols(ops.shape(x)).0).collect();
                    recomputed = self.layer_forward(l, ops.gather_rows(x, &rows)?, inp, None)?.1;
                    &recomputed
                }
            };
            let layer = &self.model.layers[l];
            let need = |o: Option<O::Tensor>| o.context("linear backward gave no input gradient");
            // MLP: out = h + down(swiglu(gate(n2), up(n2)))
            let eps = c.rms_norm_eps;
            // down_proj's input act = swiglu(gate, up), when not kept, is read only by its
            // LoRA or weight gradient. Then the SwiGLU backward writes it beside dgate and
            // dup (one pass over gate and up, not two): down_proj's input gradient comes
            // first, its own gradients after. Its input gradient alone reads only the
            // input's shape, gate's.
            let gu_rank = self.lora_rank(l, &[Proj::Gate, Proj::Up]);
            let act_read =
                grads.model.is_some() || (grads.adapter.is_some() && self.lora(l, Proj::Down).is_some());
            let (dgate, dup) = match (&a.act, act_read) {
                (None, true) => {
                    let no_grads = &mut Grads { adapter: None, model: None };
                    let dact =
                        self.linear_bwd(l, Proj::Down, &dx_out, &a.gate, a, no_grads, InputGrad::New)?;
                    let (dgate, dup, act) = ops.swiglu_bwd_h(&need(dact)?, &a.gate, &a.up, gu_rank)?;
                    self.linear_bwd(l, Proj::Down, &dx_out, &act, a, &mut grads, InputGrad::Skip)?;
                    (dgate, dup)
                }
                (act, _) => {
                    let x = act.as_ref().unwrap_or(&a.gate);
                    let dact =
                        need(self.linear_bwd(l, Proj::Down, &dx_out, x, a, &mut grads, InputGrad::New)?)?;
                    ops.swiglu_bwd(&dact, &a.gate, &a.up, gu_rank)?
                }
            };
            let dn2 = {
                let mut slot = None;
                let n2 = kept_or(&a.n2, &mut slot, || {
                    Ok(ops.rmsnorm_fwd(&a.h, &layer.post_attention_layernorm, eps, 0)?.0)
                })?;
                // the two input gradients summed in the second product
                let dn2 = need(self.linear_bwd(l, Proj::Gate, &dgate, n2, a, &mut grads, InputGrad::New)?)?;
                need(self.linear_bwd(l, Proj::Up, &dup, n2, a, &mut grads, InputGrad::AddTo(dn2))?)?
            };
            drop((dgate, dup));
            let dw = grads.model.as_deref_mut().map(|g| &mut g.layers[l].post_attention_layernorm);
            // dh = dx_out (the residual stream's) + the norm's, in one pass
            let dh =
                ops.rmsnorm_bwd(&dn2, &a.h, &layer.post_attention_layernorm, &a.rstd2, dw, Some(dx_out), 0)?;
            // attention: h = x + o(attn(q, k, v))
            let dattn = need(self.linear_bwd(l, Proj::O, &dh, &a.attn, a, &mut grads, InputGrad::New)?)?;
            let qkv_rank = self.lora_rank(l, &[Proj::Q, Proj::K, Proj::V]);
            let (mut dq, mut dk, dv) =
                ops.attention_bwd(&dattn, &a.q, &a.k, &a.v, &a.attn, &a.lse, shape, &inp.layout, qkv_rank)?;
            ops.rope_bwd(&mut dq, &mut dk, &inp.cos, &inp.sin, c.head_dim)?;
            // The first layer's input gradient only feeds the embedding, which a LoRA
            // run does not train.
            let need_dx = l > 0 || full;
            let dn1 = {
                let mut slot = None;
                let n1 = kept_or(&a.n1, &mut slot, || {
                    Ok(ops.rmsnorm_fwd(&a.x_in, &layer.input_layernorm, eps, 0)?.0)
                })?;
                // q's, k's and v's input gradients summed in the products
                let first = if need_dx { InputGrad::New } else { InputGrad::Skip };
                let dn1 = self.linear_bwd(l, Proj::Q, &dq, n1, a, &mut grads, first)?;
                let then = |dn1: Option<O::Tensor>| dn1.map_or(InputGrad::Skip, InputGrad::AddTo);
                let dn1 = self.linear_bwd(l, Proj::K, &dk, n1, a, &mut grads, then(dn1))?;
                self.linear_bwd(l, Proj::V, &dv, n1, a, &mut grads, then(dn1))?
            };
            if need_dx {
                let dn1 = need(dn1)?;
                let dw = grads.model.as_deref_mut().map(|g| &mut g.layers[l].input_layernorm);
                // dx = dh (the residual stream's) + the norm's, in one pass
                dx = Some(ops.rmsnorm_bwd(
                    &dn1,
                    &a.x_in,
                    &layer.input_layernorm,
                    &a.rstd1,
                    dw,
                    Some(dh),
                    0,
                )?);
            }
            if let Some(done) = self.layer_done {
                done(l, &grads)?;
            }
        }
        if let Some(g) = grads.model.as_deref_mut() {
            // dx is now the gradient of the embedding's output
            let dx = dx.context("full fine-tuning's backward gave no embedding gradient")?;
            ops.embedding_bwd(&dx, &inp.ids, &mut g.embed_tokens)?;
        }
        Ok(())
    }
}

/// The activation a forward kept, or else `recompute`'s, held in `slot` for the caller's
/// scope (the backward's recomputed activations live only while one layer needs them).
fn kept_or<'t, T>(
    kept: &'t Option<T>,
    slot: &'t mut Option<T>,
    recompute: impl FnOnce() -> Result<T>,
) -> Result<&'t T> {
    match kept {
        Some(t) => Ok(t),
        None => Ok(slot.insert(recompute()?)),
    }
}

/// HF's causal-LM shift inside each sequence: the target of token t is the label of
/// token t + 1; a sequence's last token has none (-100).
pub fn shift_labels(labels: &[i64], layout: &AttnLayout) -> Vec<i64> {
    let mut targets = vec![-100; labels.len()];
    for s in &layout.seqs {
        for t in 0..s.q_len.saturating_sub(1) {
            targets[s.q_start + t] = labels[s.q_start + t + 1];
        }
    }
    targets
}
