//! The writers' lock: an OS advisory lock (`flock` on Unix, `LockFileEx` on Windows)
//! on `<agent>/.lock`.
//!
//! The OS drops the lock when its holder's file is closed, which includes the holder
//! being killed, so a crashed writer never leaves the next one waiting: the lock file
//! itself may stay behind and means nothing. `flock` locks belong to the open file,
//! not the process, so two threads of one process that each open the file exclude each
//! other as two processes do.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Held for as long as it lives; dropping it (or the process dying) releases it.
pub struct WriterLock {
    file: File,
    path: PathBuf,
}

impl WriterLock {
    /// Blocks until this process holds the exclusive lock on `path` (created if absent).
    pub fn acquire(path: &Path) -> Result<Self> {
        // Never truncate: the file's content is irrelevant, and truncating a file
        // another writer holds locked would be a pointless write.
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("opening the lock file {}", path.display()))?;
        // Called through the trait on purpose: `File::lock` in std (Rust 1.89+) would
        // shadow it and raise the minimum Rust version.
        fs4::FileExt::lock(&file)
            .with_context(|| format!("locking {} (does this file system support locks?)", path.display()))?;
        Ok(Self { file, path: path.to_path_buf() })
    }

    /// Whether another holder has the lock right now (for diagnostics and tests).
    pub fn is_held(path: &Path) -> Result<bool> {
        if !path.exists() {
            return Ok(false);
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("opening the lock file {}", path.display()))?;
        match fs4::FileExt::try_lock(&file) {
            Ok(()) => {
                let _ = fs4::FileExt::unlock(&file);
                Ok(false)
            }
            Err(fs4::TryLockError::WouldBlock) => Ok(true),
            Err(fs4::TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("probing the lock {}", path.display()))
            }
        }
    }
}

impl Drop for WriterLock {
    fn drop(&mut self) {
        // Closing the file releases the lock anyway; unlocking first just makes the
        // release not depend on when the descriptor is closed.
        if let Err(e) = fs4::FileExt::unlock(&self.file) {
            tracing::warn!("unlocking {}: {e}", self.path.display());
        }
    }
}
