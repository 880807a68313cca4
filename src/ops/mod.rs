//! The one seam between the model and the hardware.
//!
//! The decoder (`model::decoder`) is written once as a sequence of calls on [`Ops`].
//! Every op has a forward that returns what its backward needs and a backward that
//! consumes it, as in llm.c. Activations are rows of a `[tokens, width]` matrix: a
//! batch is flattened into one token axis and sequences are described by an
//! [`AttnLayout`], so packed and padded batches go through the same code.

pub mod backend;
pub mod cpu;
pub mod cuda;

use anyhow::Result;

/// One sequence as attention sees it: its queries are rows `q_start..q_start+q_len` of
/// Q, its keys/values rows `k_start..k_start+k_len` of K/V. Queries are the *last*
/// `q_len` positions of the sequence, so query `i` sees keys `0..=i + k_len - q_len`
/// (bottom-right causal alignment: training has `q_len == k_len`, a decode step with a
/// KV cache has `q_len == 1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqSpan {
    pub q_start: usize,
    pub q_len: usize,
    pub k_start: usize,
    pub k_len: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AttnLayout {
    pub seqs: Vec<SeqSpan>,
}

impl AttnLayout {
    /// Self-attention over consecutive sequences of the given lengths (a packed or a
    /// plain `[batch, seq]` batch), queries and keys on the same rows.
    pub fn packed(lens: &[usize]) -> Self {
        let mut start = 0;
        let seqs = lens
            .iter()
            .map(|&len| {
                let s = SeqSpan { q_start: start, q_len: len, k_start: start, k_len: len };
                start += len;
                s
            })
            .collect();
        Self { seqs }
    }

    pub fn q_rows(&self) -> usize {
        self.seqs.iter().map(|s| s.q_start + s.q_len).max().unwrap_or(0)
    }

    /// Whether the spans' query rows (`keys`: their key rows) cover rows `0..n`, each
    /// exactly once: a kernel that writes every row of every span then leaves no row of
    /// an `n`-row output unwritten (and writes none twice).
    pub fn covers_rows(&self, n: usize, keys: bool) -> bool {
        let mut ranges: Vec<(usize, usize)> = (self.seqs.iter())
            .map(|s| if keys { (s.k_start, s.k_len) } else { (s.q_start, s.q_len) })
            .filter(|&(_, len)| len > 0)
            .collect();
        ranges.sort_unstable();
        let mut end = 0;
        for (start, len) in ranges {
            if start != end {
                return false;
            }
            end += len;
        }
        end == n
    }
}

/// `(rows, width of the last axis)` of a row-major shape.
pub fn rows_cols(shape: &[usize]) -> (usize, usize) {
    let cols = shape.last().copied().unwrap_or(1);
    (shape.iter().product::<usize>().checked_div(cols).unwrap_or(0), cols)
}

/// Checks q/k/v shapes against the geometry and every span against the rows: what
/// each backend's attention needs before it indexes anything.
pub fn check_attention(
    q: &[usize],
    k: &[usize],
    v: &[usize],
    s: AttnShape,
    layout: &AttnLayout,
) -> Result<()> {
    anyhow::ensure!(
        s.n_kv_heads > 0 && s.n_heads % s.n_kv_heads == 0,
        "attention: {} heads over {} kv heads",
        s.n_heads,
        s.n_kv_heads
    );
    let ((nq, wq), (nk, wk)) = (rows_cols(q), rows_cols(k));
    anyhow::ensure!(
        wq == s.n_heads * s.head_dim,
        "attention: q width {wq} for {} heads of {}",
        s.n_heads,
        s.head_dim
    );
    anyhow::ensure!(wk == s.n_kv_heads * s.head_dim && k == v, "attention: k/v shapes {k:?} {v:?}");
    for sp in &layout.seqs {
        anyhow::ensure!(
            sp.q_start + sp.q_len <= nq && sp.k_start + sp.k_len <= nk,
            "attention: span {sp:?} outside q rows {nq} / k rows {nk}"
        );
        anyhow::ensure!(sp.q_len <= sp.k_len, "attention: span {sp:?} has more queries than keys");
    }
    Ok(())
}

/// Attention geometry: query heads, key/value heads (GQA when fewer), head width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// The low-rank path of a LoRA linear: `y += scale · (drop(x)·Aᵀ)·Bᵀ`, A `[r, in]`,
/// B `[out, r]`.
pub struct LoraRef<'a, T> {
    pub a: &'a T,
    pub b: &'a T,
    pub scale: f32,
    /// Dropout on the low-rank path's input (PEFT's `lora_dropout`), training only.
    pub dropout: Option<Dropout>,
}

impl<T> LoraRef<'_, T> {
    /// The rank r, once A `[r, in]` and B `[out, r]` are checked against the projection's
    /// input and output widths (`shape` gives a tensor's shape).
    pub fn rank<'s>(&'s self, shape: impl Fn(&'s T) -> &'s [usize], inp: usize, out: usize) -> Result<usize> {
        let (a, b) = (shape(self.a), shape(self.b));
        let (r, a_in) = rows_cols(a);
        anyhow::ensure!(a_in == inp && b == [out, r], "linear: LoRA shapes {a:?} {b:?} for [{out}, {inp}]");
        Ok(r)
    }
}

/// Inverted dropout whose mask is a pure function of `(seed, element index)`, so the
/// backward regenerates it instead of storing it, and every backend draws the same one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
}

impl Dropout {
    /// The factor element `i` of the input is multiplied by: 0 or `1 / (1 − p)`.
    pub fn factor(&self, i: u64) -> f32 {
        // splitmix64 of (seed, i): a counter-based generator, identical on any backend
        let mut z = self.seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let u = (z >> 40) as f32 / (1u64 << 24) as f32; // uniform in [0, 1)
        if u < self.p {
            0.0
        } else {
            1.0 / (1.0 - self.p)
        }
    }
}

/// Where a linear backward puts its input gradient `dx`.
pub enum InputGrad<T> {
    /// Not needed (the first layer's input in a LoRA run): no product for it at all.
    Skip,
    /// A new tensor.
    New,
    /// Added (`+=`) into this tensor, shaped like the input, which is returned: the
    /// input gradients of projections that share an input (q/k/v, gate/up) summed in
    /// the products themselves, without a separate pass.
    AddTo(T),
}

/// Gradient buffers of one LoRA pair, accumulated into (`+=`), so micro-batches sum.
pub struct LoraGradRef<'a, T> {
    pub da: &'a mut T,
    pub db: &'a mut T,
}

/// Gradient buffers of a linear layer's own weight `[out, in]` and bias `[out]`, for
/// full fine-tuning; accumulated into (`+=`) like [`LoraGradRef`].
pub struct LinearGradRef<'a, T> {
    pub dw: &'a mut T,
    pub db: Option<&'a mut T>,
}

/// `torch.optim.AdamW` hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWParams {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl AdamWParams {
    /// `(lr / (1 − β1^step), sqrt(1 − β2^step))`, computed in f64 and rounded once, as
    /// every backend's update uses them: `p −= step_size · m / (sqrt(v) / bc2_sqrt + eps)`.
    pub fn bias_corrections(&self, step: u64) -> Result<(f32, f32)> {
        let step = i32::try_from(step).map_err(|_| anyhow::anyhow!("adamw: step count {step} too large"))?;
        let bc1 = 1.0 - (self.beta1 as f64).powi(step);
        let bc2 = 1.0 - (self.beta2 as f64).powi(step);
        Ok(((self.lr as f64 / bc1) as f32, bc2.sqrt() as f32))
    }
}

/// What AdamW multiplies every gradient by as it reads it ([`Ops::adamw_step`]).
pub enum GradScale<'a, C> {
    /// A coefficient the host knows (1 for none).
    By(f32),
    /// The clip's coefficient of an [`Ops::grad_clip`], read where the backend keeps it;
    /// the step then changes nothing when the gradients' norm is not finite.
    Clip(&'a C),
}

impl<C> Clone for GradScale<'_, C> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<C> Copy for GradScale<'_, C> {}

impl GradScale<'_, ClipStats> {
    /// For a backend that keeps the clip on the host: the coefficient, or `None` when
    /// the step must change nothing (the norm is not finite).
    pub fn on_host(self) -> Option<f32> {
        match self {
            GradScale::By(s) => Some(s),
            GradScale::Clip(c) => c.norm.is_finite().then_some(c.scale),
        }
    }
}

/// The gradients' global L2 norm and the clip's coefficient for it, on the host.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClipStats {
    pub norm: f64,
    /// [`clip_scale`] of the norm.
    pub scale: f32,
}

impl ClipStats {
    pub fn new(norm: f64, max_norm: Option<f64>) -> Self {
        Self { norm, scale: clip_scale(norm, max_norm) }
    }
}

/// `torch.nn.utils.clip_grad_norm_`'s coefficient for gradients of global norm `norm`:
/// `max / (norm + 1e-6)` when that is below 1, else 1 (no clip). AdamW multiplies the
/// gradients by it as it reads them, instead of a pass that scales them first: the same
/// bits.
pub fn clip_scale(norm: f64, max_norm: Option<f64>) -> f32 {
    match max_norm {
        Some(max) if max / (norm + 1e-6) < 1.0 => (max / (norm + 1e-6)) as f32,
        _ => 1.0,
    }
}

/// A model tensor as stored in a checkpoint, before it goes to a backend.
pub struct HostWeight<'a> {
    pub name: &'a str,
    pub shape: Vec<usize>,
    pub dtype: safetensors::Dtype,
    /// Little-endian element bytes; need not be aligned (they come from an mmap).
    pub bytes: &'a [u8],
}

/// Every op the decoder needs, with its backward. Shapes are row-major; `[N, d]`
/// means N token rows of width d.
pub trait Ops {
    /// A device tensor of f32 values (the backend decides how it stores them).
    type Tensor: Send + Sync;
    /// Token ids / positions on the device.
    type Ids: Send + Sync;
    /// A running sum of loss statistics where the backend computes
    /// ([`Ops::cross_entropy_into`]), so that a step queues its chunks' losses without
    /// waiting for them; [`Ops::read_loss`] brings it to the host.
    type LossSums: Send;
    /// The gradients' global norm and the clip's coefficient where the backend computes
    /// ([`Ops::grad_clip`]): AdamW reads the coefficient there ([`GradScale::Clip`]), so
    /// a step need not wait for the norm before its update.
    type GradClip: Send;

    fn name(&self) -> &'static str;

    // ---- memory ----
    fn upload(&self, data: &[f32], shape: &[usize]) -> Result<Self::Tensor>;
    /// A model weight as a checkpoint stores it; the backend converts from the
    /// checkpoint dtype into its base-weight type (bf16 in a bf16 mode). It is frozen in
    /// a LoRA run.
    fn upload_weight(&self, w: &HostWeight) -> Result<Self::Tensor>;
    /// A model weight that a full fine-tuning run trains: an f32 master copy whatever the
    /// checkpoint's dtype or the backend's mode (AdamW updates it; the forward and
    /// backward read its [`Ops::compute_copy`]).
    fn upload_master(&self, w: &HostWeight) -> Result<Self::Tensor> {
        self.upload(&crate::model::safetensors_io::decode_f32(w)?, &w.shape)
    }
    fn upload_ids(&self, ids: &[u32]) -> Result<Self::Ids>;
    fn download(&self, t: &Self::Tensor) -> Result<Vec<f32>>;
    fn shape<'a>(&self, t: &'a Self::Tensor) -> &'a [usize];
    fn zeros(&self, shape: &[usize]) -> Result<Self::Tensor>;
    /// Zeros of `t`'s shape and element type (an activation-type accumulator; [`Ops::zeros`]
    /// gives f32 ones, as gradients and optimizer states are).
    fn zeros_like(&self, t: &Self::Tensor) -> Result<Self::Tensor> {
        self.zeros(self.shape(t))
    }
    fn fill_zero(&self, t: &mut Self::Tensor) -> Result<()>;
    /// Copy `n` rows of `src` starting at `src_row` into `dst` at `dst_row`.
    fn copy_rows(
        &self,
        dst: &mut Self::Tensor,
        dst_row: usize,
        src: &Self::Tensor,
        src_row: usize,
        n: usize,
    ) -> Result<()>;
    /// `[rows.len(), d]` made of the given rows of `x`.
    fn gather_rows(&self, x: &Self::Tensor, rows: &[usize]) -> Result<Self::Tensor>;
    /// `a += b`
    fn add_assign(&self, a: &mut Self::Tensor, b: &Self::Tensor) -> Result<()>;

    // ---- embedding ----
    /// `table [V, d]`, `ids [N]` -> `[N, d]`. Errors on an id outside the table.
    fn embedding_fwd(&self, table: &Self::Tensor, ids: &Self::Ids) -> Result<Self::Tensor>;
    /// `dtable[ids[i]] += dy[i]`
    fn embedding_bwd(&self, dy: &Self::Tensor, ids: &Self::Ids, dtable: &mut Self::Tensor) -> Result<()>;

    // ---- RMSNorm (HF LlamaRMSNorm: y = w · x / sqrt(mean(x²) + eps)) ----
    /// Returns `(y, rstd [N])`. `tail` is the largest LoRA rank among the projections
    /// that read y (0 for none): a backend that folds the LoRA path into the frozen
    /// product (see [`Ops::reserve_lora_tail`]) leaves that much room after y's rows. The
    /// values are the same either way.
    fn rmsnorm_fwd(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        eps: f32,
        tail: usize,
    ) -> Result<(Self::Tensor, Self::Tensor)>;
    /// Returns `dx`, or `residual + dx` with `residual` (the gradient that reaches `x`
    /// along the residual stream, added in the same pass); accumulates the weight
    /// gradient into `dw` when given. `tail`: as [`Ops::rmsnorm_fwd`]'s, for the
    /// projections whose backward reads dx (a new dx only: with `residual`, dx is that
    /// tensor, room and all).
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_bwd(
        &self,
        dy: &Self::Tensor,
        x: &Self::Tensor,
        w: &Self::Tensor,
        rstd: &Self::Tensor,
        dw: Option<&mut Self::Tensor>,
        residual: Option<Self::Tensor>,
        tail: usize,
    ) -> Result<Self::Tensor>;

    // ---- linear with the LoRA path ----
    /// `y = x·Wᵀ + b + scale·(x·Aᵀ)·Bᵀ (+ residual)`; W `[out, in]`. Returns
    /// `(y, x·Aᵀ)`, the second kept for the backward when there is a LoRA path. The
    /// residual (`[N, out]`, the residual stream a projection is added to) is added in
    /// the product itself where the backend can.
    fn linear_fwd(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        lora: Option<LoraRef<Self::Tensor>>,
        residual: Option<&Self::Tensor>,
    ) -> Result<(Self::Tensor, Option<Self::Tensor>)>;
    /// Returns `dx` as `dx_to` asks (None for [`InputGrad::Skip`]) and accumulates the
    /// LoRA gradients into `grads`. W and b get a gradient only when `weight_grads` is
    /// given (`dW += dyᵀ·x`, `db += Σ_rows dy`); a LoRA step leaves it out and pays
    /// nothing for it.
    #[allow(clippy::too_many_arguments)]
    fn linear_bwd(
        &self,
        dy: &Self::Tensor,
        x: &Self::Tensor,
        w: &Self::Tensor,
        lora: Option<LoraRef<Self::Tensor>>,
        xa: Option<&Self::Tensor>,
        grads: Option<LoraGradRef<Self::Tensor>>,
        weight_grads: Option<LinearGradRef<Self::Tensor>>,
        dx_to: InputGrad<Self::Tensor>,
    ) -> Result<Option<Self::Tensor>>;

    /// Gives a frozen weight `w [out, in]` room for a rank-`r` LoRA path (r more columns
    /// and r more rows), where the backend folds the low-rank update into the frozen
    /// product: `linear_fwd` on an input with as much room (from [`Ops::rmsnorm_fwd`]'s
    /// or [`Ops::swiglu_fwd`]'s `tail`) then computes `[x | s·x·Aᵀ]·[W | B]ᵀ` in one
    /// product, and `linear_bwd` on an output gradient with room (from
    /// [`Ops::rmsnorm_bwd`]'s or [`Ops::swiglu_bwd`]'s `tail`) `[dy | dxa]·[W ; A]`. W's
    /// values and every result stay the same; by default nothing happens.
    fn reserve_lora_tail(&self, _w: &mut Self::Tensor, _r: usize) -> Result<()> {
        Ok(())
    }

    // ---- RoPE (rotate-half convention, as HF) ----
    /// Rotates every head of `q [N, heads·head_dim]` and of `k [N, kv_heads·head_dim]` in
    /// place by the angles whose cosine and sine are `cos, sin [N, head_dim/2]` (both in
    /// one pass where the backend can).
    fn rope_fwd(
        &self,
        q: &mut Self::Tensor,
        k: &mut Self::Tensor,
        cos: &Self::Tensor,
        sin: &Self::Tensor,
        head_dim: usize,
    ) -> Result<()>;
    /// The transpose rotation, applied in place to the gradients of q and k.
    fn rope_bwd(
        &self,
        dq: &mut Self::Tensor,
        dk: &mut Self::Tensor,
        cos: &Self::Tensor,
        sin: &Self::Tensor,
        head_dim: usize,
    ) -> Result<()>;

    // ---- causal grouped-query attention ----
    /// `q [Nq, H·hd]`, `k, v [Nk, Hkv·hd]` -> `(out [Nq, H·hd], lse [Nq, H])`;
    /// softmax scale `1/sqrt(hd)`. `tail`: o_proj's LoRA rank, as [`Ops::rmsnorm_fwd`]'s.
    fn attention_fwd(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        shape: AttnShape,
        layout: &AttnLayout,
        tail: usize,
    ) -> Result<(Self::Tensor, Self::Tensor)>;
    /// Returns `(dq, dk, dv)`. `tail`: the largest LoRA rank of q/k/v_proj, as
    /// [`Ops::rmsnorm_fwd`]'s, for their backward (after [`Ops::rope_bwd`] on dq and dk).
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd(
        &self,
        dout: &Self::Tensor,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        out: &Self::Tensor,
        lse: &Self::Tensor,
        shape: AttnShape,
        layout: &AttnLayout,
        tail: usize,
    ) -> Result<(Self::Tensor, Self::Tensor, Self::Tensor)>;

    // ---- SwiGLU: h = silu(gate) · up ----
    /// `tail`: down_proj's LoRA rank, as [`Ops::rmsnorm_fwd`]'s.
    fn swiglu_fwd(&self, gate: &Self::Tensor, up: &Self::Tensor, tail: usize) -> Result<Self::Tensor>;
    /// Returns `(dgate, dup)`. `tail`: gate_proj's and up_proj's LoRA rank, as
    /// [`Ops::rmsnorm_fwd`]'s, for their backward.
    fn swiglu_bwd(
        &self,
        dh: &Self::Tensor,
        gate: &Self::Tensor,
        up: &Self::Tensor,
        tail: usize,
    ) -> Result<(Self::Tensor, Self::Tensor)>;
    /// [`Ops::swiglu_bwd`] and the forward's `h` (without room), for a backward that did
    /// not keep h and needs it after dh (down_proj's LoRA or weight gradient): in one pass
    /// where the backend can.
    fn swiglu_bwd_h(
        &self,
        dh: &Self::Tensor,
        gate: &Self::Tensor,
        up: &Self::Tensor,
        tail: usize,
    ) -> Result<(Self::Tensor, Self::Tensor, Self::Tensor)> {
        let (dgate, dup) = self.swiglu_bwd(dh, gate, up, tail)?;
        Ok((dgate, dup, self.swiglu_fwd(gate, up, 0)?))
    }

    // ---- loss ----
    /// Cross-entropy of `logits [N, V]` against `targets [N]` (`-100` = not counted).
    /// Adds the *sum* of the counted tokens' losses, how many were counted and how many
    /// of them were predicted right (argmax) into `sums`, and returns, when `grad_scale`
    /// is given, `dlogits = (softmax − onehot) · grad_scale` on counted rows (0
    /// elsewhere). Nothing waits for the device.
    fn cross_entropy_into(
        &self,
        logits: &Self::Tensor,
        targets: &[i64],
        grad_scale: Option<f32>,
        sums: &mut Self::LossSums,
    ) -> Result<Option<Self::Tensor>>;
    /// [`argmax`] of every row of `x` `[N, V]`, on the host: greedy decoding's next
    /// tokens, without bringing the `[N, V]` logits over.
    fn argmax_rows(&self, x: &Self::Tensor) -> Result<Vec<u32>> {
        let width = self.shape(x).last().copied().unwrap_or(0);
        anyhow::ensure!(width > 0, "argmax_rows: rows without values");
        Ok(self.download(x)?.chunks(width).map(|r| argmax(r) as u32).collect())
    }
    /// Zeroed loss sums for [`Ops::cross_entropy_into`].
    fn loss_sums(&self) -> Result<Self::LossSums>;
    /// What `sums` holds, on the host (waits for the work queued so far).
    fn read_loss(&self, sums: &Self::LossSums) -> Result<LossStats>;
    /// [`Ops::cross_entropy_into`] of one batch, its statistics read at once.
    fn cross_entropy(
        &self,
        logits: &Self::Tensor,
        targets: &[i64],
        grad_scale: Option<f32>,
    ) -> Result<(LossStats, Option<Self::Tensor>)> {
        let mut sums = self.loss_sums()?;
        let dlogits = self.cross_entropy_into(logits, targets, grad_scale, &mut sums)?;
        Ok((self.read_loss(&sums)?, dlogits))
    }

    // ---- optimizer ----
    /// Σ x² over all tensors, in f64.
    fn sum_squares(&self, ts: &[&Self::Tensor]) -> Result<f64>;
    /// Queues the global L2 norm of `grads` (the square root of [`Ops::sum_squares`])
    /// and [`clip_scale`] of it for `max_norm`, without waiting for them;
    /// [`Ops::read_clip`] brings them to the host.
    fn grad_clip(&self, grads: &[&Self::Tensor], max_norm: Option<f64>) -> Result<Self::GradClip>;
    /// What `clip` holds, on the host (waits for the work queued so far).
    fn read_clip(&self, clip: &Self::GradClip) -> Result<ClipStats>;
    /// [`Ops::read_loss`] and [`Ops::read_clip`] together: one wait where the backend
    /// has to wait.
    fn read_step(&self, sums: &Self::LossSums, clip: &Self::GradClip) -> Result<(LossStats, ClipStats)> {
        Ok((self.read_loss(sums)?, self.read_clip(clip)?))
    }
    /// One `torch.optim.AdamW` step over all tensors; `step` counts from 1. Every
    /// gradient is multiplied by `scale` as it is read (the clip's coefficient, 1 without
    /// one): the same bits as scaling the gradients first, without a pass. With
    /// [`GradScale::Clip`] and a norm that is not finite (a NaN or an infinity in a
    /// gradient), the parameters and moments stay as they were.
    #[allow(clippy::too_many_arguments)]
    fn adamw_step(
        &self,
        params: &mut [&mut Self::Tensor],
        grads: &[&Self::Tensor],
        m: &mut [&mut Self::Tensor],
        v: &mut [&mut Self::Tensor],
        step: u64,
        hp: AdamWParams,
        scale: GradScale<'_, Self::GradClip>,
    ) -> Result<()>;

    /// `t` in the type this backend computes with, where that differs from how `t` is
    /// kept (the CUDA backend's bf16 mode: an f32 LoRA master as bf16); `None` where it
    /// does not. A training step takes such copies of the adapter once, instead of every
    /// op converting the masters again; the results are the same bits.
    fn compute_copy(&self, _t: &Self::Tensor) -> Result<Option<Self::Tensor>> {
        Ok(None)
    }
    /// [`Ops::compute_copy`] of many tensors, in one launch where the backend can: all
    /// the copies, or `None` as soon as one tensor needs none.
    fn compute_copies(&self, ts: &[&Self::Tensor]) -> Result<Option<Vec<Self::Tensor>>> {
        let mut out = Vec::with_capacity(ts.len());
        for t in ts {
            match self.compute_copy(t)? {
                Some(c) => out.push(c),
                None => return Ok(None),
            }
        }
        Ok(Some(out))
    }
    /// [`Ops::fill_zero`] of many tensors, in one launch where the backend can.
    fn fill_zero_all(&self, ts: &mut [&mut Self::Tensor]) -> Result<()> {
        ts.iter_mut().try_for_each(|t| self.fill_zero(t))
    }

    // ---- timing and memory (benchmarks) ----
    /// Waits until all work queued on the backend so far has finished (nothing to wait
    /// for on a synchronous backend).
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    /// Runs `f`, which queues work on this backend, and returns its result with the
    /// seconds that work took. By default: the host's clock from a [`synchronize`]
    /// before `f` to one after it.
    ///
    /// [`synchronize`]: Ops::synchronize
    fn timed<R>(&self, f: impl FnOnce() -> Result<R>) -> Result<(R, f64)> {
        self.synchronize()?;
        let t0 = std::time::Instant::now();
        let r = f()?;
        self.synchronize()?;
        Ok((r, t0.elapsed().as_secs_f64()))
    }
    /// How [`timed`](Ops::timed) measures, for reports.
    fn clock(&self) -> &'static str {
        "host wall clock between synchronizes"
    }
    /// Bytes of device memory in use now, where the backend keeps tensors on a device
    /// that can say (None for the host's memory).
    fn memory_in_use(&self) -> Option<u64> {
        None
    }
    /// How many times the host has waited for the device so far (downloads and
    /// synchronizes), where there is a device to wait for.
    fn host_waits(&self) -> Option<u64> {
        None
    }
    /// Bytes of one element of the activations this backend computes (the outputs of
    /// its ops): 4 in f32, 2 in the CUDA backend's bf16 mode.
    fn activation_bytes(&self) -> usize {
        4
    }
    /// Starts timing each kernel the backend queues (`on`: each between two events on
    /// its stream), or stops. Returns false, and does nothing, where ops are not kernels
    /// (the CPU).
    fn kernel_clock(&self, _on: bool) -> Result<bool> {
        Ok(false)
    }
    /// The kernels queued since [`Ops::kernel_clock`] started, per name (GEMMs per
    /// shape), longest first; empty where ops are not kernels. Starts it again from
    /// nothing.
    fn kernel_times(&self) -> Result<Vec<KernelClock>> {
        Ok(vec![])
    }

    // ---- memory planning ----
    /// Runs `f`, one training or validation micro-step, as a step whose buffers the
    /// backend may plan: runs with the same `key` ask for the same buffers in the same
    /// order, at sizes that follow their tokens. The CUDA backend lays the first run's
    /// buffers out in its activation arena, places every later run's there, and lays it
    /// out again, large enough for both, after a run that did not fit; elsewhere this is
    /// `f()`.
    fn planned<R>(&self, _key: u64, f: impl FnOnce() -> Result<R>) -> Result<R> {
        f()
    }
    /// What the backend's activation arena holds, where it has one.
    fn arena_stats(&self) -> Option<ArenaStats> {
        None
    }
}

/// What a backend's activation arena holds ([`Ops::arena_stats`]; the CUDA backend's is
/// `ops/cuda/arena.rs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ArenaStats {
    /// Bytes of the region.
    pub region_bytes: u64,
    /// Keys with a plan.
    pub plans: usize,
    /// The size of the largest plan, and the most bytes its step had alive at once.
    pub plan_bytes: u64,
    pub plan_live_peak: u64,
    /// Allocations of planned steps placed in the region, and those that went to the pool.
    pub placed: u64,
    pub pooled: u64,
}

/// The time the launches of one kernel (or GEMM shape, or memset) took: see
/// [`Ops::kernel_times`].
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct KernelClock {
    pub kernel: String,
    pub calls: u64,
    pub seconds: f64,
}

/// Loss statistics of some tokens: what a training or validation step measured.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossStats {
    /// Sum of the counted tokens' losses.
    pub loss_sum: f64,
    pub n_counted: usize,
    pub n_correct: usize,
}

impl LossStats {
    /// The mean loss over the counted tokens (0 without any).
    pub fn mean(&self) -> f64 {
        self.loss_sum / self.n_counted.max(1) as f64
    }

    pub fn add(&mut self, other: LossStats) {
        self.loss_sum += other.loss_sum;
        self.n_counted += other.n_counted;
        self.n_correct += other.n_correct;
    }
}

/// Index of the largest value; the first one on ties, as `torch.argmax`. A NaN is
/// passed over unless it comes first.
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::{AttnLayout, SeqSpan};

    #[test]
    fn covers_rows_only_when_the_spans_tile_every_row_once() {
        let packed = AttnLayout::packed(&[3, 0, 5]);
        assert!(packed.covers_rows(8, false) && packed.covers_rows(8, true));
        // more rows than the spans reach (padding after them)
        assert!(!packed.covers_rows(9, false));
        let span = |q_start, q_len, k_start, k_len| SeqSpan { q_start, q_len, k_start, k_len };
        // a gap between the spans; then two spans over the same rows
        assert!(!AttnLayout { seqs: vec![span(0, 2, 0, 2), span(3, 2, 3, 2)] }.covers_rows(5, false));
        assert!(!AttnLayout { seqs: vec![span(0, 4, 0, 4), span(2, 2, 2, 2)] }.covers_rows(4, true));
        // listed out of order; queries on the last rows of their keys (a decode step)
        let decode = AttnLayout { seqs: vec![span(1, 1, 4, 4), span(0, 1, 0, 4)] };
        assert!(decode.covers_rows(2, false) && decode.covers_rows(8, true));
        assert!(!decode.covers_rows(8, false));
    }
}
