//! SIGINT and SIGTERM (Ctrl-C, `kill`, a scheduler's preemption): the first asks a
//! training run to stop after the step it is in, with a checkpoint, so that nothing
//! trained is lost; a second ends the process at once (exit status 130), as the default
//! would have.
//!
//! Data-parallel ranks agree on the step: each adds its own request to the sums of the
//! step's all-reduce (`global_batch_gradients`), so all stop after the first step whose
//! sum sees one. A launcher (`--nproc-per-node`, `loop --nproc-per-node`) keeps its
//! workers in their own process group, passes the first signal on to them as SIGTERM,
//! waits for them to stop, and kills them on the second.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Once;

use anyhow::{Context, Result};

/// The exit status of a run stopped by a signal (128 + SIGINT, as a shell reports one).
pub const EXIT_STATUS: u8 = 130;

static SIGNALS: AtomicUsize = AtomicUsize::new(0);
/// Whether a second signal ends the process (else the launcher's watch loop handles it).
static EXIT_ON_SECOND: AtomicBool = AtomicBool::new(true);
static INSTALL: Once = Once::new();

/// What the first signal prints at once (a step, or the data preparation before the
/// first, can take a while).
const FIRST: &[u8] =
    b"\nsignal: stopping after the current training step, with a checkpoint (again: stop now)\n";

/// Writes `msg` to stderr from a signal handler (write(2) is async-signal-safe).
fn say(msg: &[u8]) {
    #[cfg(unix)]
    // SAFETY: the pointer and length are a live static slice's.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
    }
    #[cfg(not(unix))]
    let _ = msg;
}

/// Installs the handlers of SIGINT and SIGTERM (once a process; later calls do nothing).
pub fn install() -> Result<()> {
    let mut result = Ok(());
    INSTALL.call_once(|| {
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            // SAFETY: the handler does only async-signal-safe things: atomic operations,
            // write(2) and `_exit`.
            let r = unsafe {
                signal_hook::low_level::register(sig, || {
                    let n = SIGNALS.fetch_add(1, Ordering::SeqCst) + 1;
                    if n == 1 {
                        say(FIRST);
                    } else if EXIT_ON_SECOND.load(Ordering::SeqCst) {
                        signal_hook::low_level::exit(EXIT_STATUS as i32);
                    }
                })
            };
            if let Err(e) = r {
                result = Err(e).context("installing the SIGINT/SIGTERM handlers");
                return;
            }
        }
    });
    result
}

/// Whether a signal asked this process to stop.
pub fn requested() -> bool {
    signals() > 0
}

/// How many signals arrived.
pub fn signals() -> usize {
    SIGNALS.load(Ordering::SeqCst)
}

/// While the guard lives, a second signal does not end the process: its owner (a
/// launcher watching its workers) handles it.
pub struct SecondSignalHandled(bool);

impl SecondSignalHandled {
    pub fn new() -> Self {
        Self(EXIT_ON_SECOND.swap(false, Ordering::SeqCst))
    }
}

impl Default for SecondSignalHandled {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for SecondSignalHandled {
    fn drop(&mut self) {
        EXIT_ON_SECOND.store(self.0, Ordering::SeqCst);
    }
}

/// A run stopped by a signal, its work kept: what stopped and where it is.
#[derive(Debug, thiserror::Error)]
#[error(
    "interrupted: {what}; the same command continues from there (`finetune` with --resume; \
     `loop` resumes the cycle by itself)"
)]
pub struct Interrupted {
    pub what: String,
}
