//! The activation arena: one device region per process, laid out once for a training
//! micro-step of each shape, that the step's tensors are placed in on every later step.
//!
//! A micro-step (forward, loss and backward of one micro-batch: `train_step`) asks for
//! the same buffers in the same order each time it runs on a batch of the same shape;
//! what changes is only their contents. So the first run of a shape (its *key*) is
//! recorded: each allocation's size, and when it was made and dropped, on a clock that
//! ticks at every allocation and drop. At its end the buffers that were dropped inside
//! it are given offsets in one region so that buffers alive at the same time never
//! share a byte (largest first, each at the lowest offset where it fits among those
//! already placed that overlap it in time: the greedy-by-size layout of TFLite's memory
//! planner), and the region is made that large. Every later run with that key takes its
//! `i`-th allocation from the plan's `i`-th slot: no allocator runs, and the step's
//! device memory is the plan's size, known after the first step.
//!
//! Nothing relies on a later run repeating the recorded one for correctness. An
//! allocation takes a slot only if the slot's size is the one asked for (looked for a
//! few slots ahead, so a skipped allocation costs nothing more) and no buffer of the
//! region that is still alive overlaps it; otherwise it comes from the stream-ordered
//! pool as every allocation outside a planned step does. A run that needed the pool is
//! recorded again the next time (at most [`MAX_RECORDS`] times a key). Buffers that
//! outlive the step (what it returns) are never planned. Reuse within the region is safe
//! in stream order: every kernel that touches an activation runs on the one compute
//! stream, so the next tensor's first writer queues behind the last reader of the one
//! before it, as with `cuMemFreeAsync`.
//!
//! `TUNELOOP_ARENA=off` turns the arena off (every buffer from the pool);
//! `TUNELOOP_ARENA_POISON=1` fills each placed buffer with NaNs (all bits set) before
//! its first use, so a kernel that reads what no one wrote shows NaNs, as the CUDA
//! emulator's fresh allocations do.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{Context, Result};
use cudarc::driver::CudaSlice;

use super::runtime::Runtime;
use crate::ops::ArenaStats;

/// Every slot starts at a multiple of this many bytes (`cudaMalloc`'s alignment, which
/// cuBLASLt's fastest algorithms and the kernels' 16-byte accesses expect).
pub const ALIGN: u64 = 256;

/// How many slots past the next one an allocation looks for a slot of its size.
const LOOK_AHEAD: usize = 64;

/// Times one key is recorded (its first run and runs that needed the pool) before its
/// last plan is kept as it is.
pub const MAX_RECORDS: u32 = 3;

/// A buffer's life on a recorded step's clock: made at `start`, dropped at `end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Life {
    pub bytes: u64,
    pub start: u64,
    pub end: u64,
}

impl Life {
    fn meets(&self, o: &Life) -> bool {
        self.start < o.end && o.start < self.end
    }
}

/// Offsets for buffers that must not share a byte while both are alive: the largest
/// first (ties: the earlier made), each at the lowest multiple of [`ALIGN`] where it fits
/// beside those already placed that are alive with it. Returns the offsets and the size
/// of the region they need.
pub fn lay_out(lives: &[Life]) -> (Vec<u64>, u64) {
    let mut order: Vec<usize> = (0..lives.len()).collect();
    order.sort_by_key(|&i| (Reverse(lives[i].bytes), lives[i].start));
    let mut offsets = vec![0u64; lives.len()];
    let mut placed: Vec<usize> = Vec::with_capacity(lives.len());
    let mut size = 0u64;
    let mut busy: Vec<(u64, u64)> = Vec::new();
    for i in order {
        let me = lives[i];
        let len = me.bytes.div_ceil(ALIGN) * ALIGN;
        busy.clear();
        busy.extend(
            placed
                .iter()
                .filter(|&&j| lives[j].meets(&me))
                .map(|&j| (offsets[j], offsets[j] + lives[j].bytes)),
        );
        busy.sort_unstable();
        let mut at = 0u64;
        for &(s, e) in &busy {
            if s >= at + len {
                break;
            }
            at = at.max(e.div_ceil(ALIGN) * ALIGN);
        }
        offsets[i] = at;
        size = size.max(at + len);
        placed.push(i);
    }
    (offsets, size)
}

/// The most bytes alive at once: no layout of these buffers needs less.
pub fn live_peak(lives: &[Life]) -> u64 {
    let mut events: Vec<(u64, i128)> = Vec::with_capacity(2 * lives.len());
    for l in lives {
        let len = (l.bytes.div_ceil(ALIGN) * ALIGN) as i128;
        events.push((l.start, len));
        events.push((l.end, -len));
    }
    // drops before allocations at the same tick (a tick has one event anyway)
    events.sort_unstable_by_key(|&(t, d)| (t, d));
    let (mut now, mut peak) = (0i128, 0i128);
    for (_, d) in events {
        now += d;
        peak = peak.max(now);
    }
    peak as u64
}

/// One allocation of a recorded step: its size and, if the step dropped it, its place.
#[derive(Clone, Copy, Debug)]
struct Slot {
    bytes: u64,
    offset: Option<u64>,
}

struct Plan {
    slots: Vec<Slot>,
    size: u64,
    live_peak: u64,
    records: u32,
    /// A run with this plan needed the pool: record the key again.
    stale: bool,
}

/// A recorded allocation: its size, and the ticks it was made and dropped at.
struct Recorded {
    bytes: u64,
    start: u64,
    end: Option<u64>,
}

enum Scope {
    None,
    Recording { key: u64, allocs: Vec<Recorded>, clock: u64 },
    Replaying { key: u64, next: usize, missed: bool },
}

struct State {
    enabled: bool,
    poison: bool,
    depth: u32,
    epoch: u64,
    scope: Scope,
    plans: HashMap<u64, Plan>,
    region: Option<(CudaSlice<u8>, u64)>,
    region_len: u64,
    /// The region's buffers alive now: offset -> end.
    live: BTreeMap<u64, u64>,
    placed: u64,
    pooled: u64,
}

/// Whether `[off, off + len)` is free of every live buffer of the region (`live`: offset
/// -> end; they never overlap one another, so the one starting last below `off + len`
/// ends last).
fn unused(live: &BTreeMap<u64, u64>, off: u64, len: u64) -> bool {
    live.range(..off + len).next_back().is_none_or(|(_, &end)| end <= off)
}

/// A buffer's tie to the arena; dropping it tells the arena the buffer is gone.
pub struct Tie {
    state: Arc<Mutex<State>>,
    kind: TieKind,
}

enum TieKind {
    /// A pool buffer made while its step was recorded (allocation `idx` of `epoch`).
    Recorded { epoch: u64, idx: usize },
    /// A buffer of the region at `offset`.
    Placed { offset: u64 },
}

impl Drop for Tie {
    fn drop(&mut self) {
        let mut s = lock(&self.state);
        match self.kind {
            TieKind::Recorded { epoch, idx } => {
                if s.epoch == epoch {
                    if let Scope::Recording { allocs, clock, .. } = &mut s.scope {
                        allocs[idx].end = Some(*clock);
                        *clock += 1;
                    }
                }
            }
            TieKind::Placed { offset } => {
                s.live.remove(&offset);
            }
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where an allocation's bytes are: the region's (its address, with the tie that frees
/// them), or the pool's, possibly tied to a step being recorded.
pub enum Placement {
    Region { ptr: u64, tie: Tie },
    Pool { tie: Option<Tie> },
}

pub struct Arena {
    state: Arc<Mutex<State>>,
}

fn env_flag(name: &str) -> Option<String> {
    std::env::var(name).ok().map(|v| v.trim().to_ascii_lowercase())
}

impl Arena {
    /// An arena as the environment says (see the module's notes).
    pub fn from_env() -> Self {
        let enabled = !matches!(env_flag("TUNELOOP_ARENA").as_deref(), Some("off" | "0" | "false" | "no"));
        let poison =
            matches!(env_flag("TUNELOOP_ARENA_POISON").as_deref(), Some("1" | "on" | "true" | "yes"));
        Self {
            state: Arc::new(Mutex::new(State {
                enabled,
                poison,
                depth: 0,
                epoch: 0,
                scope: Scope::None,
                plans: HashMap::new(),
                region: None,
                region_len: 0,
                live: BTreeMap::new(),
                placed: 0,
                pooled: 0,
            })),
        }
    }

    /// Whether placed buffers are to be filled with NaNs first.
    pub fn poison(&self) -> bool {
        lock(&self.state).poison
    }

    /// Starts a planned step with `key` (nested calls join the outer step).
    pub fn begin(&self, rt: &Runtime, key: u64) -> Result<()> {
        let mut s = lock(&self.state);
        s.depth += 1;
        if !s.enabled || s.depth > 1 {
            return Ok(());
        }
        s.epoch += 1;
        let plan = s.plans.get(&key).filter(|p| !p.stale).map(|p| p.size);
        s.scope = match plan {
            Some(size) => {
                grow(&mut s, rt, size)?;
                Scope::Replaying { key, next: 0, missed: false }
            }
            None => Scope::Recording { key, allocs: Vec::new(), clock: 0 },
        };
        Ok(())
    }

    /// Ends the planned step: a recorded one becomes its key's plan.
    pub fn end(&self, rt: &Runtime) -> Result<()> {
        let mut s = lock(&self.state);
        s.depth = s.depth.saturating_sub(1);
        if s.depth > 0 {
            return Ok(());
        }
        match std::mem::replace(&mut s.scope, Scope::None) {
            Scope::None => {}
            Scope::Replaying { key, missed, .. } => {
                if let Some(p) = s.plans.get_mut(&key) {
                    p.stale = missed && p.records < MAX_RECORDS;
                }
            }
            Scope::Recording { key, allocs, .. } => {
                let dropped: Vec<(usize, Life)> = allocs
                    .iter()
                    .enumerate()
                    .filter_map(|(i, a)| a.end.map(|end| (i, Life { bytes: a.bytes, start: a.start, end })))
                    .collect();
                let lives: Vec<Life> = dropped.iter().map(|&(_, l)| l).collect();
                let (offsets, size) = lay_out(&lives);
                let mut slots: Vec<Slot> =
                    allocs.iter().map(|a| Slot { bytes: a.bytes, offset: None }).collect();
                for (&(i, _), off) in dropped.iter().zip(offsets) {
                    slots[i].offset = Some(off);
                }
                let records = s.plans.get(&key).map_or(0, |p| p.records) + 1;
                let live_peak = live_peak(&lives);
                s.plans.insert(key, Plan { slots, size, live_peak, records, stale: false });
                grow(&mut s, rt, size)?;
            }
        }
        Ok(())
    }

    /// Where a buffer of `bytes` goes.
    pub fn place(&self, bytes: u64) -> Placement {
        let mut s = lock(&self.state);
        let epoch = s.epoch;
        let state = &mut *s;
        match &mut state.scope {
            Scope::None => Placement::Pool { tie: None },
            Scope::Recording { allocs, clock, .. } => {
                let idx = allocs.len();
                allocs.push(Recorded { bytes, start: *clock, end: None });
                *clock += 1;
                state.pooled += 1;
                Placement::Pool {
                    tie: Some(Tie { state: self.state.clone(), kind: TieKind::Recorded { epoch, idx } }),
                }
            }
            Scope::Replaying { key, next, missed } => {
                let slots = &state.plans[key].slots;
                let end = slots.len().min(*next + LOOK_AHEAD);
                let found = (*next..end).find(|&k| slots[k].bytes == bytes);
                let at = found.and_then(|k| {
                    *next = k + 1;
                    slots[k].offset
                });
                let len = bytes.div_ceil(ALIGN) * ALIGN;
                let fits = |off: u64| off + len <= state.region_len && unused(&state.live, off, len);
                match (at.filter(|&off| fits(off)), &state.region) {
                    (Some(off), Some((_, base))) => {
                        let ptr = base + off;
                        state.live.insert(off, off + len);
                        state.placed += 1;
                        Placement::Region {
                            ptr,
                            tie: Tie { state: self.state.clone(), kind: TieKind::Placed { offset: off } },
                        }
                    }
                    _ => {
                        // a buffer the plan has no room for, or one that outlives the step
                        // (slots without an offset): only the former is a miss
                        if found.is_none() || at.is_some() {
                            *missed = true;
                        }
                        state.pooled += 1;
                        Placement::Pool { tie: None }
                    }
                }
            }
        }
    }

    pub fn stats(&self) -> ArenaStats {
        let s = lock(&self.state);
        let largest = s.plans.values().max_by_key(|p| p.size);
        ArenaStats {
            region_bytes: s.region_len,
            plans: s.plans.len(),
            plan_bytes: largest.map_or(0, |p| p.size),
            plan_live_peak: largest.map_or(0, |p| p.live_peak),
            placed: s.placed,
            pooled: s.pooled,
        }
    }
}

/// Makes the region at least `size` bytes, when none of its buffers is alive (else a
/// plan larger than the region places what fits and sends the rest to the pool). The
/// old region and what the pool keeps of freed buffers (the recorded step's, which it
/// would otherwise hold on to beside the region) go back to the driver first.
fn grow(s: &mut State, rt: &Runtime, size: u64) -> Result<()> {
    if size <= s.region_len || !s.live.is_empty() {
        return Ok(());
    }
    s.region = None;
    s.region_len = 0;
    rt.sync()?;
    rt.trim_pool()?;
    let bytes = usize::try_from(size).context("arena size")?;
    // SAFETY: u8 has no invalid bit patterns; every buffer placed in it is written
    // before it is read (as a pool buffer would be).
    let slice = unsafe { rt.stream.alloc::<u8>(bytes) }.with_context(|| {
        format!("CUDA allocation of the {:.2} GiB activation arena", size as f64 / (1u64 << 30) as f64)
    })?;
    let base = rt.ptr(&slice);
    s.region = Some((slice, base));
    s.region_len = size;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn life(bytes: u64, start: u64, end: u64) -> Life {
        Life { bytes, start, end }
    }

    /// Checks that no two buffers alive together share a byte, and every offset is aligned.
    fn check(lives: &[Life], offsets: &[u64], size: u64) {
        for (i, a) in lives.iter().enumerate() {
            assert_eq!(offsets[i] % ALIGN, 0);
            assert!(offsets[i] + a.bytes <= size);
            for (j, b) in lives.iter().enumerate().skip(i + 1) {
                if a.meets(b) {
                    let (x, y) = (offsets[i], offsets[j]);
                    assert!(x + a.bytes <= y || y + b.bytes <= x, "buffers {i} and {j} overlap");
                }
            }
        }
    }

    #[test]
    fn buffers_alive_together_never_share_bytes_and_dead_ones_are_reused() {
        // a forward keeping three activations, a temporary per layer, then a backward
        // that drops them in reverse
        let lives = [
            life(1000, 0, 20),
            life(4096, 1, 3), // temporary
            life(1000, 2, 18),
            life(4096, 4, 6), // temporary: the first's bytes again
            life(1000, 5, 16),
            life(512, 7, 15),
        ];
        let (off, size) = lay_out(&lives);
        check(&lives, &off, size);
        assert_eq!(off[1], off[3], "the second temporary reuses the first's bytes");
        // the temporaries (4096) and three 1000-byte activations (1024 each aligned)
        assert_eq!(size, 4096 + 3 * 1024);
        assert_eq!(live_peak(&lives), 4096 + 3 * 1024);
    }

    #[test]
    fn random_lives_are_laid_out_without_overlap_and_near_their_peak() {
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..20 {
            let n = 200;
            let mut lives = Vec::new();
            for t in 0..n {
                let bytes = 1 + rand(1 << 20);
                lives.push(life(bytes, 2 * t, 2 * t + 1 + rand(60)));
            }
            let (off, size) = lay_out(&lives);
            check(&lives, &off, size);
            let peak = live_peak(&lives);
            assert!(size >= peak);
            assert!((size as f64) < 1.5 * peak as f64, "size {size} for a peak of {peak}");
        }
    }

    #[test]
    fn a_gap_between_live_buffers_is_used_when_it_fits() {
        // a and c alive throughout; b between them dies, then d (no larger than b) comes
        let lives =
            [life(ALIGN * 4, 0, 10), life(ALIGN * 2, 1, 3), life(ALIGN * 4, 2, 10), life(ALIGN, 4, 9)];
        let (off, size) = lay_out(&lives);
        check(&lives, &off, size);
        assert_eq!(size, ALIGN * 10);
    }
}
