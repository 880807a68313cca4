//! The CUDA backend's collective: NCCL, over cudarc's `nccl::result`/`sys` layer (its
//! safe `Comm` panics in `Drop` when an abort fails, and hides the handle that the
//! asynchronous error check needs).
//!
//! Rank 0 makes the unique id and hands its 128 bytes out through the TCP rendezvous;
//! every rank then joins the communicator on its own GPU. The all-reduces run on a stream
//! of their own, each bucket of gradients as soon as the compute stream has finished it
//! ([`Collective::start_bucket`]: a layer's gradients, while the backward of the layers
//! below goes on); the compute stream waits for them only before it reads the sums. An
//! all-reduce that does not finish within the timeout, or that NCCL reports failed (a
//! peer died), aborts the communicator, so the process exits instead of hanging.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::{CudaSlice, CudaStream};
use cudarc::nccl::{result, sys};

use super::rendezvous::{self, PAYLOAD};
use super::{Collective, DistEnv};
use crate::ops::cuda::{probe_nccl, CudaBuf, CudaOps, CudaTensor, DType};

pub struct NcclGroup {
    comm: sys::ncclComm_t,
    rank: usize,
    world_size: usize,
    timeout: Duration,
    aborted: Cell<bool>,
    seq: Cell<u64>,
    /// The stream the all-reduces run on, beside the compute stream.
    comm_stream: Arc<CudaStream>,
    /// One fused buffer per bucket of a step, kept from step to step.
    buckets: RefCell<Vec<Bucket>>,
    /// Buckets started since the last `all_reduce_sum`.
    started: Cell<usize>,
}

/// Gradients packed end to end for one all-reduce.
struct Bucket {
    buf: CudaSlice<f32>,
    /// The device address and length of each gradient in it, in order.
    members: Vec<(u64, usize)>,
}

fn nccl_error(what: &str, e: result::NcclError) -> anyhow::Error {
    anyhow::anyhow!("{what}: NCCL error {:?}", e.0)
}

impl NcclGroup {
    /// Meets the other ranks of `env` and joins the NCCL communicator on `ops`' GPU.
    pub fn join(ops: &CudaOps, env: &DistEnv) -> Result<Self> {
        probe_nccl()?;
        let payload = if env.is_root() {
            let id = result::get_uniqueid().map_err(|e| nccl_error("ncclGetUniqueId", e))?;
            let mut bytes = [0u8; PAYLOAD];
            for (b, c) in bytes.iter_mut().zip(id.internal.iter()) {
                *b = *c as u8;
            }
            Some(bytes)
        } else {
            None
        };
        let rv = rendezvous::join(env, payload)?;
        let mut internal = [0 as std::ffi::c_char; PAYLOAD];
        for (c, b) in internal.iter_mut().zip(rv.payload.iter()) {
            *c = *b as std::ffi::c_char;
        }
        let id = sys::ncclUniqueId { internal };
        ops.runtime().ctx.bind_to_thread().context("binding the CUDA context")?;
        let t0 = Instant::now();
        let mut comm = MaybeUninit::uninit();
        let world = i32::try_from(env.world_size).context("world size")?;
        let rank = i32::try_from(env.rank).context("rank")?;
        // SAFETY: `comm` is written by NCCL on success and read only then.
        let comm = unsafe {
            result::comm_init_rank(comm.as_mut_ptr(), world, id, rank)
                .map_err(|e| nccl_error(&format!("rank {}: ncclCommInitRank", env.rank), e))?;
            comm.assume_init()
        };
        let version = result::get_nccl_version().unwrap_or(0);
        super::say(
            env.rank,
            format_args!(
                "NCCL {}.{}.{} communicator: rank {} of {} on GPU {} ({:.2} s)",
                version / 10000,
                version / 100 % 100,
                version % 100,
                env.rank,
                env.world_size,
                env.local_rank,
                t0.elapsed().as_secs_f64()
            ),
        );
        let comm_stream = ops.runtime().ctx.new_stream().context("creating the all-reduce stream")?;
        Ok(Self {
            comm,
            rank: env.rank,
            world_size: env.world_size,
            timeout: env.timeout,
            aborted: Cell::new(false),
            seq: Cell::new(0),
            comm_stream,
            buckets: RefCell::new(Vec::new()),
            started: Cell::new(0),
        })
    }

    fn abort(&self) {
        if !self.aborted.replace(true) {
            // SAFETY: the communicator is live until Drop, which skips it once aborted.
            let _ = unsafe { result::comm_abort(self.comm) };
        }
    }

    /// Waits for the stream's work (the all-reduces just queued) while watching NCCL's
    /// asynchronous error state and the clock.
    fn wait(&self, ops: &CudaOps, seq: u64) -> Result<()> {
        let stream = &ops.runtime().stream;
        let done = stream.record_event(None).context("recording a CUDA event")?;
        let deadline = Instant::now() + self.timeout;
        loop {
            match done.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    self.abort();
                    bail!("rank {}: all-reduce {seq} failed on the GPU: {e:?}", self.rank);
                }
            }
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: a live communicator and a valid out pointer.
            let _ = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
            if !matches!(state, sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress) {
                self.abort();
                bail!(
                    "rank {}: NCCL reports {state:?} during all-reduce {seq}: a peer failed or left",
                    self.rank
                );
            }
            if Instant::now() >= deadline {
                self.abort();
                bail!(
                    "rank {}: all-reduce {seq} did not complete within {:.0} s: a rank hangs or died \
                     (raise TUNELOOP_DIST_TIMEOUT if its steps are that slow)",
                    self.rank,
                    self.timeout.as_secs_f64()
                );
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Queues an in-place all-reduce on the all-reduce stream, after the work queued so
    /// far on the compute stream.
    fn all_reduce_raw(
        &self,
        ops: &CudaOps,
        ptr: u64,
        count: usize,
        dtype: sys::ncclDataType_t,
    ) -> Result<()> {
        let ready = ops.runtime().stream.record_event(None).context("recording a CUDA event")?;
        self.comm_stream.wait(&ready).context("ordering the all-reduce after the compute stream")?;
        let stream = &self.comm_stream;
        // SAFETY: `ptr` addresses `count` elements of `dtype` on this communicator's GPU,
        // alive until the caller has waited for the stream.
        unsafe {
            result::all_reduce(
                ptr as *const std::ffi::c_void,
                ptr as *mut std::ffi::c_void,
                count,
                dtype,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(|e| nccl_error(&format!("rank {}: ncclAllReduce", self.rank), e))?;
        Ok(())
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        if !self.aborted.get() {
            // SAFETY: the communicator is live and no work is queued on it (every
            // all-reduce was waited for).
            let _ = unsafe { result::comm_destroy(self.comm) };
        }
    }
}

impl Collective<CudaOps> for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn kind(&self) -> &'static str {
        "nccl"
    }

    fn all_reduce_sum(&self, ops: &CudaOps, tensors: &mut [&mut CudaTensor], host: &mut [f64]) -> Result<()> {
        let seq = self.seq.get();
        self.seq.set(seq + 1);
        let stream = ops.runtime().stream.clone();
        // the gradients no bucket has taken yet, as one more bucket (the same on every rank)
        let taken: std::collections::HashSet<u64> = self.buckets.borrow()[..self.started.get()]
            .iter()
            .flat_map(|b| b.members.iter().map(|&(p, _)| p))
            .collect();
        let mut rest = Vec::new();
        for t in tensors.iter() {
            if !taken.contains(&f32_buf(t)?.ptr()) {
                rest.push(&**t);
            }
        }
        if rest.iter().any(|t| t.numel() > 0) {
            self.start_bucket(ops, &rest)?;
        }
        let host_dev = if host.is_empty() {
            None
        } else {
            let d = stream.clone_htod(&*host).context("host-to-device copy")?;
            self.all_reduce_raw(ops, ops.runtime().ptr(&d), host.len(), sys::ncclDataType_t::ncclFloat64)?;
            Some(d)
        };
        // the compute stream waits for every all-reduce; the host for the compute stream
        stream.join(&self.comm_stream).context("waiting for the all-reduce stream")?;
        self.wait(ops, seq)?;
        let mut by_ptr = HashMap::new();
        for t in tensors.iter() {
            let buf = f32_buf(t)?;
            by_ptr.insert(buf.ptr(), buf.len());
        }
        for b in &self.buckets.borrow()[..self.started.replace(0)] {
            let (base, mut off) = (ops.runtime().ptr(&b.buf), 0);
            for &(ptr, n) in &b.members {
                let len =
                    by_ptr.get(&ptr).context("all-reduce: a started gradient is not among the tensors")?;
                ensure!(n <= *len, "all-reduce: a gradient shrank since its bucket started");
                ops.runtime()
                    .copy_dtod(ptr, base + (off * 4) as u64, n * 4)
                    .context("unpacking the gradients")?;
                off += n;
            }
        }
        if let Some(d) = host_dev {
            let v = ops.runtime().download(&d)?;
            host.copy_from_slice(&v[..host.len()]);
        }
        Ok(())
    }

    /// Packs `tensors` into this step's next fused buffer on the compute stream and queues
    /// its all-reduce on the all-reduce stream.
    fn start_bucket(&self, ops: &CudaOps, tensors: &[&CudaTensor]) -> Result<()> {
        let stream = &ops.runtime().stream;
        let total: usize = tensors.iter().map(|t| t.numel()).sum();
        let idx = self.started.get();
        let mut buckets = self.buckets.borrow_mut();
        if buckets.len() == idx {
            let buf = stream.alloc_zeros::<f32>(total.max(1)).context("CUDA allocation")?;
            buckets.push(Bucket { buf, members: Vec::new() });
        }
        let b = &mut buckets[idx];
        if b.buf.len() < total {
            b.buf = stream.alloc_zeros::<f32>(total).context("CUDA allocation")?;
        }
        b.members.clear();
        let mut off = 0;
        let base = ops.runtime().ptr(&b.buf);
        for t in tensors {
            let (src, n) = (f32_buf(t)?, t.numel());
            ensure!(n <= src.len(), "all-reduce: a gradient of {n} values in a buffer of {}", src.len());
            ops.runtime()
                .copy_dtod(base + (off * 4) as u64, src.ptr(), n * 4)
                .context("packing the gradients")?;
            b.members.push((src.ptr(), n));
            off += n;
        }
        self.started.set(idx + 1);
        if total > 0 {
            self.all_reduce_raw(ops, ops.runtime().ptr(&b.buf), total, sys::ncclDataType_t::ncclFloat32)?;
        }
        Ok(())
    }
}

/// The f32 buffer of a dense gradient (gradients are f32 in both modes).
fn f32_buf(t: &CudaTensor) -> Result<&CudaBuf> {
    ensure!(t.dtype() == DType::F32, "all-reduce: a bf16 gradient (gradients are f32)");
    ensure!(t.is_dense(), "all-reduce: a gradient with room after its rows");
    Ok(&t.buf)
}
