//! The activation arena: one device region per process, laid out for the training (and
//! validation) micro-steps, that their tensors are placed in.
//!
//! A micro-step (forward, loss and backward of one micro-batch: `train_step`) asks for
//! the same buffers in the same order each time it runs the same ops (its *key*: the
//! kind of step and its number of lm_head chunks), each as large as its tokens make it.
//! So every planned step is recorded: each allocation's size, and when it was made and
//! dropped, on a clock that ticks at every allocation and drop. At the end of a key's
//! first step its buffers that were dropped inside it are given offsets in one region
//! so that buffers alive at the same time never share a byte (largest first, each at
//! the lowest offset where it fits among those already placed that overlap it in time:
//! the greedy-by-size layout of TFLite's memory planner), and the region is made that
//! large. Every later step with that key takes its `i`-th allocation from the plan's
//! `i`-th slot when it is no larger: no allocator runs, and the step's device memory is
//! the plan's size. A step that did not fit (more tokens than any before it) lays the
//! plan out again from its own record, each slot as large as the larger of the two, so
//! the plan grows to the largest micro-batch after a few steps (at most [`MAX_LAYOUTS`]
//! layouts a key).
//!
//! Nothing relies on a step repeating the recorded one for correctness. An allocation
//! takes a slot only if it is no larger than the slot (or, to step over a buffer this
//! step skipped, has a later slot's exact size a few slots on) and no buffer of the
//! region that is still alive overlaps it; otherwise it comes from the stream-ordered
//! pool, as every allocation outside a planned step does. Buffers that outlive their
//! step (what it returns) are never planned. Reuse within the region is safe in stream
//! order: every kernel that touches an activation runs on the one compute stream, so
//! the next tensor's first writer queues behind the last reader of the one before it,
//! as with `cuMemFreeAsync`.
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

/// `bytes` rounded up to a multiple of [`ALIGN`].
fn aligned(bytes: u64) -> u64 {
    bytes.div_ceil(ALIGN) * ALIGN
}

/// How many slots past the next one an allocation looks for a slot of its size.
const LOOK_AHEAD: usize = 64;

/// Times one key's plan is laid out (from its first step, then from steps that did not
/// fit it) before it is kept as it is.
pub const MAX_LAYOUTS: u32 = 8;

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
        let len = aligned(me.bytes);
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
            at = at.max(aligned(e));
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
        let len = aligned(l.bytes) as i128;
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

/// One allocation of a planned step: the most bytes it has asked for and, if the step
/// dropped it, its place.
#[derive(Clone, Copy, Debug)]
struct Slot {
    bytes: u64,
    offset: Option<u64>,
}

struct Plan {
    slots: Vec<Slot>,
    size: u64,
    live_peak: u64,
    /// Times it was laid out (its key's first step, then steps that did not fit).
    layouts: u32,
}

/// An allocation of the step under way: its size, and the ticks it was made and
/// dropped at.
struct Recorded {
    bytes: u64,
    start: u64,
    end: Option<u64>,
}

/// The planned step under way: every allocation is recorded; with a plan, each is placed
/// by it where it fits (`next`: the slot the next allocation is matched with first).
struct Scope {
    key: u64,
    allocs: Vec<Recorded>,
    clock: u64,
    replay: Option<Replay>,
}

struct Replay {
    next: usize,
    /// An allocation the plan had no room for (larger than its slot, or no slot).
    missed: bool,
}

struct State {
    depth: u32,
    epoch: u64,
    scope: Option<Scope>,
    plans: HashMap<u64, Plan>,
    /// The region and its address.
    region: Option<(CudaSlice<u8>, u64)>,
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

impl State {
    fn region_len(&self) -> u64 {
        self.region.as_ref().map_or(0, |(slice, _)| slice.len() as u64)
    }
}

/// A buffer's tie to the arena: allocation `idx` of planned step `epoch`, at `offset`
/// in the region if it was placed there. Dropping it frees that place and records the
/// drop's tick, while its step is under way.
pub struct Tie {
    state: Arc<Mutex<State>>,
    epoch: u64,
    idx: usize,
    offset: Option<u64>,
}

impl Drop for Tie {
    fn drop(&mut self) {
        let mut s = lock(&self.state);
        if let Some(off) = self.offset {
            s.live.remove(&off);
        }
        let epoch = s.epoch;
        if let Some(sc) = s.scope.as_mut().filter(|_| epoch == self.epoch) {
            sc.allocs[self.idx].end = Some(sc.clock);
            sc.clock += 1;
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where an allocation's bytes are: the region's (its address, with the tie that frees
/// them), or the pool's, tied to the step under way if there is one.
pub enum Placement {
    Region { ptr: u64, tie: Tie },
    Pool { tie: Option<Tie> },
}

pub struct Arena {
    state: Arc<Mutex<State>>,
    enabled: bool,
    /// Placed buffers are filled with NaNs first.
    pub poison: bool,
}

fn env_flag(name: &str) -> Option<String> {
    std::env::var(name).ok().map(|v| v.trim().to_ascii_lowercase())
}

/// A plan for the step recorded in `allocs`: its buffers dropped inside the step laid
/// out, each slot as large as the larger of this step's buffer and `old`'s slot when
/// `old` has as many (the same structure at another size), so that the plan covers
/// both steps.
fn plan_of(allocs: &[Recorded], old: Option<&Plan>) -> Plan {
    let same = old.filter(|p| p.slots.len() == allocs.len());
    let bytes = |i: usize| same.map_or(allocs[i].bytes, |p| p.slots[i].bytes.max(allocs[i].bytes));
    let dropped: Vec<(usize, Life)> = (allocs.iter().enumerate())
        .filter_map(|(i, a)| a.end.map(|end| (i, Life { bytes: bytes(i), start: a.start, end })))
        .collect();
    let lives: Vec<Life> = dropped.iter().map(|&(_, l)| l).collect();
    let (offsets, size) = lay_out(&lives);
    let mut slots: Vec<Slot> = (0..allocs.len()).map(|i| Slot { bytes: bytes(i), offset: None }).collect();
    for (&(i, _), off) in dropped.iter().zip(offsets) {
        slots[i].offset = Some(off);
    }
    Plan { slots, size, live_peak: live_peak(&lives), layouts: old.map_or(0, |p| p.layouts) + 1 }
}

impl Arena {
    /// An arena as the environment says (see the module's notes).
    pub fn from_env() -> Self {
        let enabled = !matches!(env_flag("TUNELOOP_ARENA").as_deref(), Some("off" | "0" | "false" | "no"));
        let poison =
            matches!(env_flag("TUNELOOP_ARENA_POISON").as_deref(), Some("1" | "on" | "true" | "yes"));
        Self {
            state: Arc::new(Mutex::new(State {
                depth: 0,
                epoch: 0,
                scope: None,
                plans: HashMap::new(),
                region: None,
                live: BTreeMap::new(),
                placed: 0,
                pooled: 0,
            })),
            enabled,
            poison,
        }
    }

    /// Starts a planned step with `key` (nested calls join the outer step).
    pub fn begin(&self, rt: &Runtime, key: u64) -> Result<()> {
        let mut s = lock(&self.state);
        s.depth += 1;
        if !self.enabled || s.depth > 1 {
            return Ok(());
        }
        s.epoch += 1;
        let size = s.plans.get(&key).map(|p| p.size);
        if let Some(size) = size {
            grow(&mut s, rt, size)?;
        }
        let replay = size.map(|_| Replay { next: 0, missed: false });
        s.scope = Some(Scope { key, allocs: Vec::new(), clock: 0, replay });
        Ok(())
    }

    /// Ends the planned step. The first step of a key becomes its plan; a later one that
    /// did not fit its plan lays it out again, from both (at most [`MAX_LAYOUTS`] times a
    /// key).
    pub fn end(&self, rt: &Runtime) -> Result<()> {
        let mut s = lock(&self.state);
        s.depth = s.depth.saturating_sub(1);
        if s.depth > 0 {
            return Ok(());
        }
        let Some(sc) = s.scope.take() else { return Ok(()) };
        let old = s.plans.get(&sc.key);
        let again = match (&sc.replay, old) {
            (None, _) | (_, None) => true,
            (Some(r), Some(p)) => r.missed && p.layouts < MAX_LAYOUTS,
        };
        if again {
            let plan = plan_of(&sc.allocs, old);
            let size = plan.size;
            s.plans.insert(sc.key, plan);
            grow(&mut s, rt, size)?;
        }
        Ok(())
    }

    /// Where a buffer of `bytes` goes.
    pub fn place(&self, bytes: u64) -> Placement {
        let mut s = lock(&self.state);
        let (epoch, state) = (s.epoch, &mut *s);
        let region_len = state.region_len();
        let Some(sc) = state.scope.as_mut() else { return Placement::Pool { tie: None } };
        let idx = sc.allocs.len();
        sc.allocs.push(Recorded { bytes, start: sc.clock, end: None });
        sc.clock += 1;
        let tie = |offset| Tie { state: self.state.clone(), epoch, idx, offset };
        let Some(replay) = sc.replay.as_mut() else {
            state.pooled += 1;
            return Placement::Pool { tie: Some(tie(None)) };
        };
        // The next slot if this fits it, else the first of the same size a few further
        // on (a buffer this step skipped); slots without an offset hold buffers that
        // outlive the step.
        let slots = &state.plans[&sc.key].slots;
        let k = (slots.get(replay.next).filter(|sl| bytes <= sl.bytes).map(|_| replay.next)).or_else(|| {
            (replay.next..slots.len().min(replay.next + LOOK_AHEAD)).find(|&k| slots[k].bytes == bytes)
        });
        if let Some(k) = k {
            replay.next = k + 1;
        }
        let len = aligned(bytes);
        let at = k.and_then(|k| slots[k].offset);
        let fits = |off: u64| off + len <= region_len && unused(&state.live, off, len);
        match (at.filter(|&off| fits(off)), &state.region) {
            (Some(off), Some((_, base))) => {
                state.live.insert(off, off + len);
                state.placed += 1;
                Placement::Region { ptr: base + off, tie: tie(Some(off)) }
            }
            _ => {
                if k.is_none() || at.is_some() {
                    replay.missed = true;
                }
                state.pooled += 1;
                Placement::Pool { tie: Some(tie(None)) }
            }
        }
    }

    pub fn stats(&self) -> ArenaStats {
        let s = lock(&self.state);
        let largest = s.plans.values().max_by_key(|p| p.size);
        ArenaStats {
            region_bytes: s.region_len(),
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
    if size <= s.region_len() || !s.live.is_empty() {
        return Ok(());
    }
    s.region = None;
    rt.sync()?;
    rt.trim_pool()?;
    let bytes = usize::try_from(size).context("arena size")?;
    // SAFETY: u8 has no invalid bit patterns; every buffer placed in it is written
    // before it is read (as a pool buffer would be).
    let slice = unsafe { rt.stream.alloc::<u8>(bytes) }.with_context(|| {
        format!("CUDA allocation of the {:.2} GiB activation arena", crate::util::gib(size))
    })?;
    let base = rt.ptr(&slice);
    s.region = Some((slice, base));
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
    fn a_step_that_did_not_fit_lays_the_plan_out_for_the_larger_of_both() {
        // the same three buffers (the last outlives its step) at two sizes
        let step = |sizes: [u64; 3]| {
            let ends = [Some(3), Some(4), None];
            let starts = [0, 1, 2];
            (0..3).map(|i| Recorded { bytes: sizes[i], start: starts[i], end: ends[i] }).collect::<Vec<_>>()
        };
        let first = plan_of(&step([100, 5000, 64]), None);
        assert_eq!(first.layouts, 1);
        assert!(first.slots[2].offset.is_none(), "what outlives its step is not placed");
        let second = plan_of(&step([300, 4000, 64]), Some(&first));
        let bytes: Vec<u64> = second.slots.iter().map(|s| s.bytes).collect();
        assert_eq!(bytes, [300, 5000, 64]);
        assert_eq!(second.layouts, 2);
        let (a, b) = (second.slots[0].offset.unwrap(), second.slots[1].offset.unwrap());
        assert!(a + 300 <= b || b + 5000 <= a, "alive together, apart: {a} and {b}");
        assert_eq!(second.size, 5120 + 512);
        // another structure (a buffer more) starts afresh from its own sizes
        let mut other = step([10, 20, 64]);
        other.push(Recorded { bytes: 8, start: 5, end: Some(6) });
        assert_eq!(plan_of(&other, Some(&second)).slots[1].bytes, 20);
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
