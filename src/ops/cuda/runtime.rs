//! The CUDA runtime around the kernels: probing for the driver libraries before any
//! cudarc call that would panic on their absence, the context and its one stream, the
//! fatbin's functions, and launch helpers.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
use cudarc::driver::{
    result, CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig,
    PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use crate::kernels::{FATBIN, KERNEL_NAMES};
use crate::ops::KernelClock;

/// What to tell a user whose loader cannot find a CUDA library.
const LIBRARY_HELP: &str = "put the folder that holds it on LD_LIBRARY_PATH (scripts/gpu-check.sh \
     shows how on a machine where cuBLAS/NCCL come inside Python packages)";

/// Checks that the NVIDIA driver library and cuBLASLt can be loaded. cudarc loads them
/// lazily and *panics* when one is missing, so this runs before any cudarc call.
pub fn probe_libraries() -> Result<()> {
    // SAFETY: these only try to dlopen the libraries by name.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        bail!(
            "no CUDA driver: libcuda.so could not be loaded (no NVIDIA driver on this machine, or \
             it is not on the loader path); {LIBRARY_HELP}"
        );
    }
    if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
        bail!("cuBLASLt (libcublasLt.so, part of CUDA 13's cuBLAS) could not be loaded; {LIBRARY_HELP}");
    }
    Ok(())
}

/// Checks that NCCL can be loaded (only multi-GPU training needs it). NCCL ships as
/// `libnccl.so.2`, a name cudarc does not try: link it as `libnccl.so`.
pub fn probe_nccl() -> Result<()> {
    // SAFETY: only tries to dlopen the library by name.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        bail!("NCCL (libnccl.so) could not be loaded; {LIBRARY_HELP}");
    }
    Ok(())
}

/// What [`Runtime::memset`] repeats: a byte, or a 2- or 4-byte word.
#[derive(Clone, Copy, Debug)]
pub enum Pattern {
    U8(u8),
    U16(u16),
    U32(u32),
}

/// A kernel of the fatbin, and the dynamic shared memory it has been allowed so far.
struct Kernel {
    f: CudaFunction,
    limits: KernelLimits,
    shared_allowed: AtomicU32,
}

/// What the driver says a kernel of the fatbin can be launched with on this GPU.
#[derive(Clone, Copy, Debug)]
pub struct KernelLimits {
    /// Threads a block: its `__launch_bounds__`, and what its registers allow.
    pub max_threads: u32,
    /// Registers a thread.
    pub registers: u32,
    /// Bytes of static shared memory.
    pub static_shared: u32,
    /// Bytes of dynamic shared memory a launch gets without opting in (48 KiB less the
    /// static part).
    pub default_dynamic_shared: u32,
}

impl KernelLimits {
    fn of(f: &CudaFunction) -> Result<Self> {
        use cudarc::driver::sys::CUfunction_attribute_enum as A;
        let get = |attribute: A| -> Result<u32> {
            // SAFETY: `f` is a function of a loaded module.
            let v = unsafe {
                cudarc::driver::result::function::get_function_attribute(f.cu_function(), attribute)
            }
            .with_context(|| format!("reading the kernel attribute {attribute:?}"))?;
            u32::try_from(v).with_context(|| format!("kernel attribute {attribute:?} is {v}"))
        };
        Ok(Self {
            max_threads: get(A::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK)?,
            registers: get(A::CU_FUNC_ATTRIBUTE_NUM_REGS)?,
            static_shared: get(A::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)?,
            default_dynamic_shared: get(A::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)?,
        })
    }
}

/// The context, its stream and every kernel of the fatbin.
pub struct Runtime {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    functions: HashMap<&'static str, Kernel>,
    /// While on (`Some`): every launch, GEMM and memset with the events on the stream
    /// before and after it ([`Runtime::clocked`]).
    clock: Mutex<Option<Vec<ClockedLaunch>>>,
    /// How many times the host has waited for the stream ([`Runtime::sync`]).
    waits: AtomicU64,
}

/// A launch's name and the events before and after it.
type ClockedLaunch = (String, CudaEvent, CudaEvent);

impl Runtime {
    pub fn new(ordinal: usize) -> Result<Self> {
        let Some(fatbin) = FATBIN else { bail!("{}", crate::kernels::NO_KERNELS_HELP) };
        probe_libraries()?;
        let count = CudaContext::device_count().context("cannot count CUDA devices")?;
        ensure!(
            (ordinal as i64) < count as i64,
            "CUDA device {ordinal} requested but {count} device(s) are visible"
        );
        let ctx = CudaContext::new(ordinal).with_context(|| format!("cannot open CUDA device {ordinal}"))?;
        keep_freed_memory(&ctx)?;
        // One compute stream, synchronised by hand: no per-buffer events. (NCCL's
        // all-reduces run on a stream of their own, ordered with explicit events.)
        // SAFETY: called before any buffer exists; the only other stream orders itself.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        // cuModuleLoadData wants the image aligned; a Vec<u8> of this size is (malloc
        // aligns to 16 bytes).
        let module = ctx
            .load_module(Ptx::from_binary(fatbin.to_vec()))
            .context("cannot load the kernels' fatbin (was it built for this GPU's architecture?)")?;
        let mut functions = HashMap::new();
        for &name in KERNEL_NAMES {
            let f =
                module.load_function(name).with_context(|| format!("kernel {name} is not in the fatbin"))?;
            let limits = KernelLimits::of(&f).with_context(|| format!("kernel {name}"))?;
            let shared_allowed = AtomicU32::new(limits.default_dynamic_shared);
            functions.insert(name, Kernel { f, limits, shared_allowed });
        }
        Ok(Self { ctx, stream, functions, clock: Mutex::new(None), waits: AtomicU64::new(0) })
    }

    fn kernel(&self, name: &str) -> Result<&Kernel> {
        self.functions.get(name).with_context(|| format!("no kernel named {name}"))
    }

    /// What kernel `name` can be launched with.
    pub fn kernel_limits(&self, name: &str) -> Result<KernelLimits> {
        Ok(self.kernel(name)?.limits)
    }

    /// The raw device address of a buffer, for kernel arguments and cuBLASLt.
    pub fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        // Event tracking is off, so the returned guard records nothing.
        s.device_ptr(&self.stream).0
    }

    /// Waits for the work queued on the stream (counted: [`Runtime::waits`]).
    pub fn sync(&self) -> Result<()> {
        self.waits.fetch_add(1, Ordering::Relaxed);
        self.stream.synchronize().context("CUDA stream synchronisation failed (a kernel faulted?)")
    }

    /// How many times the host has waited for the stream so far.
    pub fn waits(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }

    /// A buffer's values on the host, after the work queued before them.
    pub fn download<T: DeviceRepr + Default + Clone>(&self, src: &CudaSlice<T>) -> Result<Vec<T>> {
        let mut host = vec![T::default(); src.len()];
        self.copy_dtoh(&mut host, self.ptr(src))?;
        Ok(host)
    }

    /// Several buffers' values on the host, after the work queued before them, with one
    /// wait for all.
    pub fn download_all<T: DeviceRepr + Default + Clone>(
        &self,
        srcs: &[&CudaSlice<T>],
    ) -> Result<Vec<Vec<T>>> {
        self.ctx.bind_to_thread().context("binding the CUDA context")?;
        let mut host: Vec<Vec<T>> = srcs.iter().map(|s| vec![T::default(); s.len()]).collect();
        for (dst, src) in host.iter_mut().zip(srcs) {
            // SAFETY: `dst` holds `src.len()` values; the synchronize below (also on an
            // error) keeps every `dst` alive until the copies queued so far have landed.
            let queued = unsafe { result::memcpy_dtoh_async(dst, self.ptr(*src), self.stream.cu_stream()) };
            if let Err(e) = queued {
                self.sync()?;
                return Err(e).context("device-to-host copy");
            }
        }
        self.sync()?;
        Ok(host)
    }

    /// Gives the pool's unused memory back to the driver (after a [`Runtime::sync`], so
    /// that what was freed in stream order is unused).
    pub fn trim_pool(&self) -> Result<()> {
        let Some(pool) = default_pool(&self.ctx)? else { return Ok(()) };
        // SAFETY: the pool is the device's own; keeping 0 bytes releases what is unused.
        unsafe { cudarc::driver::sys::cuMemPoolTrimTo(pool, 0) }
            .result()
            .context("trimming the memory pool")?;
        Ok(())
    }

    /// Sets `n` elements from `ptr` to `value`'s bits, in stream order: bytes, or 2- or
    /// 4-byte words (cuMemsetD8/D16/D32; `ptr` aligned to the word).
    pub fn memset(&self, ptr: u64, value: Pattern, n: usize) -> Result<()> {
        use cudarc::driver::sys;
        self.ctx.bind_to_thread().context("binding the CUDA context")?;
        let stream = self.stream.cu_stream();
        self.clocked(
            || "memset".to_string(),
            // SAFETY: the caller's buffer holds `n` elements of the pattern's size from `ptr`.
            || {
                unsafe {
                    match value {
                        Pattern::U8(v) => sys::cuMemsetD8Async(ptr, v, n, stream),
                        Pattern::U16(v) => sys::cuMemsetD16Async(ptr, v, n, stream),
                        Pattern::U32(v) => sys::cuMemsetD32Async(ptr, v, n, stream),
                    }
                }
                .result()
                .context("memset")
            },
        )
    }

    /// Copies `bytes` bytes from `src` to `dst` (device addresses), in stream order.
    pub fn copy_dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.ctx.bind_to_thread().context("binding the CUDA context")?;
        // SAFETY: the caller's buffers hold `bytes` bytes from each address.
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }
            .context("device-to-device copy")
    }

    /// Copies `src` to the device at `dst`. Pageable host memory is staged before the call
    /// returns, so `src` may go at once.
    pub fn copy_htod<T: DeviceRepr>(&self, dst: u64, src: &[T]) -> Result<()> {
        self.ctx.bind_to_thread().context("binding the CUDA context")?;
        // SAFETY: the caller's buffer holds `size_of_val(src)` bytes from `dst`.
        unsafe { result::memcpy_htod_async(dst, src, self.stream.cu_stream()) }.context("host-to-device copy")
    }

    /// `dst.len()` values from the device at `src`, after the work queued before them.
    pub fn copy_dtoh<T: DeviceRepr>(&self, dst: &mut [T], src: u64) -> Result<()> {
        self.ctx.bind_to_thread().context("binding the CUDA context")?;
        // SAFETY: the caller's buffer holds `size_of_val(dst)` bytes from `src`; the
        // synchronize below keeps `dst` borrowed until the copy has landed.
        unsafe { result::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }
            .context("device-to-host copy")?;
        self.sync()
    }

    fn clock_events(&self) -> Result<MutexGuard<'_, Option<Vec<ClockedLaunch>>>> {
        self.clock.lock().map_err(|_| anyhow::anyhow!("the kernel clock's lock is poisoned"))
    }

    /// Starts timing every launch, GEMM and memset (`on`), or stops and forgets.
    pub fn kernel_clock(&self, on: bool) -> Result<()> {
        *self.clock_events()? = on.then(Vec::new);
        Ok(())
    }

    /// Per kernel name, the launches since [`Runtime::kernel_clock`] and the time between
    /// each one's events, longest first; the clock starts again from nothing. A launch
    /// the GPU reaches before the host has queued it also counts the host's latency, so
    /// the figures hold for kernels longer than a launch (microseconds).
    pub fn kernel_times(&self) -> Result<Vec<KernelClock>> {
        let mut clock = self.clock_events()?;
        let Some(events) = clock.as_mut() else { return Ok(vec![]) };
        let mut by_name: BTreeMap<String, (u64, f64)> = BTreeMap::new();
        for (name, start, end) in events.drain(..) {
            let ms =
                start.elapsed_ms(&end).context("timing a kernel between CUDA events (a kernel faulted?)")?;
            let e = by_name.entry(name).or_default();
            e.0 += 1;
            e.1 += ms as f64 / 1e3;
        }
        let mut out: Vec<KernelClock> = by_name
            .into_iter()
            .map(|(kernel, (calls, seconds))| KernelClock { kernel, calls, seconds })
            .collect();
        out.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        Ok(out)
    }

    /// Runs `f`, which queues one piece of work on the stream, between two events when
    /// the kernel clock is on (`name` is only built then).
    pub fn clocked<R>(&self, name: impl FnOnce() -> String, f: impl FnOnce() -> Result<R>) -> Result<R> {
        if self.clock_events()?.is_none() {
            return f();
        }
        let event = || self.stream.record_event(Some(CU_EVENT_DEFAULT)).context("recording a CUDA event");
        let start = event()?;
        let r = f()?;
        let end = event()?;
        if let Some(events) = self.clock_events()?.as_mut() {
            events.push((name(), start, end));
        }
        Ok(r)
    }
}

pub const BLOCK: u32 = 256;

/// A 1-D launch over `n` elements for the grid-stride kernels.
pub fn grid_1d(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, 65_535) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// `v` as a kernel's `int`, or an error naming it.
pub fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| anyhow::anyhow!("{what} = {v} does not fit a kernel's 32-bit int"))
}

/// One kernel argument: a device pointer or `size_t`/`unsigned long long` (u64), an
/// `int` (i32), a `float` (f32) or a `double` (f64).
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    U64(u64),
    I32(i32),
    F32(f32),
    F64(f64),
}

impl From<u64> for Arg {
    fn from(v: u64) -> Self {
        Arg::U64(v)
    }
}
impl From<i32> for Arg {
    fn from(v: i32) -> Self {
        Arg::I32(v)
    }
}
impl From<f32> for Arg {
    fn from(v: f32) -> Self {
        Arg::F32(v)
    }
}
impl From<f64> for Arg {
    fn from(v: f64) -> Self {
        Arg::F64(v)
    }
}

/// Buffers come from the device's stream-ordered memory pool (cuMemAllocAsync), whose
/// default returns freed memory to the driver at every synchronize, so that each step
/// would map its activations afresh. A release threshold of "never" keeps it pooled, as
/// PyTorch's caching allocator does; device memory in use then includes the pool.
fn keep_freed_memory(ctx: &CudaContext) -> Result<()> {
    let Some(pool) = default_pool(ctx)? else { return Ok(()) };
    let mut threshold = u64::MAX;
    // SAFETY: the attribute takes a u64 by pointer.
    unsafe {
        cudarc::driver::sys::cuMemPoolSetAttribute(
            pool,
            cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
    }
    .result()
    .context("setting the memory pool's release threshold")?;
    Ok(())
}

/// The device's stream-ordered pool, where it has one.
fn default_pool(ctx: &CudaContext) -> Result<Option<cudarc::driver::sys::CUmemoryPool>> {
    use cudarc::driver::sys;
    let pools = ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED)
        .context("asking whether the GPU has memory pools")?;
    if pools == 0 {
        return Ok(None);
    }
    let mut pool = std::ptr::null_mut();
    // SAFETY: `pool` is written by the driver.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
        .result()
        .context("the default memory pool")?;
    Ok(Some(pool))
}

impl Runtime {
    /// Launches kernel `name` on the stream. The caller has checked every shape, and
    /// `args` match the kernel's parameters in kernels/*.cu in order and type.
    pub fn launch(&self, name: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        if cfg.grid_dim.0 == 0 || cfg.grid_dim.1 == 0 {
            return Ok(());
        }
        let k = self.kernel(name)?;
        if cfg.shared_mem_bytes > k.shared_allowed.load(Ordering::Relaxed) {
            // beyond 48 KiB a kernel must opt in (up to 227 KiB on Hopper, 163 on A100),
            // once per size it grows to
            let bytes = i32::try_from(cfg.shared_mem_bytes).context("dynamic shared memory size")?;
            k.f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes,
            )
            .with_context(|| format!("kernel {name}: allowing {bytes} bytes of dynamic shared memory"))?;
            k.shared_allowed.fetch_max(cfg.shared_mem_bytes, Ordering::Relaxed);
        }
        let mut builder = self.stream.launch_builder(&k.f);
        for a in args {
            match a {
                Arg::U64(v) => builder.arg(v),
                Arg::I32(v) => builder.arg(v),
                Arg::F32(v) => builder.arg(v),
                Arg::F64(v) => builder.arg(v),
            };
        }
        // SAFETY: see above; pointers come from live buffers of the sizes the kernel
        // indexes (checked by the launchers).
        self.clocked(
            || name.to_string(),
            || {
                unsafe { builder.launch(cfg) }.map(|_| ()).with_context(|| {
                    let (x, y, z) = cfg.block_dim;
                    let l = &k.limits;
                    format!(
                        "launching kernel {name} with {} threads a block and {} bytes of dynamic shared \
                         memory (it allows {} threads at {} registers a thread, and has {} bytes of static \
                         shared memory)",
                        x * y * z,
                        cfg.shared_mem_bytes,
                        l.max_threads,
                        l.registers,
                        l.static_shared
                    )
                })
            },
        )
    }
}

/// `[a, b, ...]` as kernel arguments.
macro_rules! args {
    ($($a:expr),* $(,)?) => { &[$($crate::ops::cuda::runtime::Arg::from($a)),*] };
}
pub(crate) use args;
