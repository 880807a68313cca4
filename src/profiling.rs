//! NVTX ranges around every op and step phase, so `nsys profile` shows where a step's
//! time goes. Built with the `profiling` feature (NVIDIA's `nvtx` crate, NVTX3: it needs
//! no library at run time); without it a range is an empty guard the compiler removes.

/// An open NVTX range on this thread; it ends when dropped.
#[must_use = "the range ends when this guard is dropped"]
pub struct Range {
    #[cfg(feature = "profiling")]
    _inner: nvtx::LocalRange,
}

/// Opens a range named `name` (a C string literal, `c"attention_fwd"`: NVTX takes
/// it without a copy) until the guard drops.
#[inline(always)]
pub fn range(name: &'static std::ffi::CStr) -> Range {
    #[cfg(feature = "profiling")]
    {
        Range { _inner: nvtx::LocalRange::new(name) }
    }
    #[cfg(not(feature = "profiling"))]
    {
        let _ = name;
        Range {}
    }
}
