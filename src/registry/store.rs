//! File-level work of the registry: copying an adapter in with hashes and fsyncs,
//! listing version directories, and cleaning what a killed writer left behind.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use super::lineage::FileHash;
use super::names::version_number;

/// Temp version directories start with this; readers never list them (they are not
/// `vN`), and the next writer, holding the lock, knows nobody is still filling them.
pub(crate) const TEMP_PREFIX: &str = ".tmp-";

/// Deeper than any adapter directory; stops a symlink cycle from recursing forever.
const MAX_DEPTH: usize = 16;

/// Every regular file under `dir`, as sorted relative paths. Symlinks are followed,
/// since HF cache snapshots are symlinks to blobs and the registry must hold the bytes.
pub(crate) fn list_files(dir: &Path) -> Result<Vec<PathBuf>> {
    fn walk(root: &Path, rel: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<()> {
        if depth > MAX_DEPTH {
            bail!("{}: nested more than {MAX_DEPTH} levels deep (a symlink loop?)", root.join(rel).display());
        }
        let here = root.join(rel);
        let entries = std::fs::read_dir(&here).with_context(|| format!("listing {}", here.display()))?;
        for e in entries {
            let e = e.with_context(|| format!("listing {}", here.display()))?;
            let path = e.path();
            let meta = std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?;
            let child = rel.join(e.file_name());
            if meta.is_dir() {
                walk(root, &child, depth + 1, out)?;
            } else if meta.is_file() {
                out.push(child);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, Path::new(""), 0, &mut out)?;
    out.sort();
    Ok(out)
}

/// `a/b.json` on every OS, for the names recorded in `lineage.json`.
pub(crate) fn rel_key(rel: &Path) -> String {
    rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/")
}

/// Copies every file of `src` into `dst` (which must not exist yet), hashing the bytes
/// as they stream through and syncing each file and directory, so that once the caller
/// renames `dst` into place the whole tree is on disk.
pub(crate) fn copy_tree(src: &Path, dst: &Path) -> Result<BTreeMap<String, FileHash>> {
    let files = list_files(src)?;
    std::fs::create_dir(dst).with_context(|| format!("creating {}", dst.display()))?;
    let mut hashes = BTreeMap::new();
    let mut dirs = vec![dst.to_path_buf()];
    let mut buf = vec![0u8; 1 << 20];
    for rel in files {
        let (from, to) = (src.join(&rel), dst.join(&rel));
        if let Some(parent) = to.parent() {
            if !parent.exists() {
                std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
                dirs.push(parent.to_path_buf());
            }
        }
        let mut r = File::open(&from).with_context(|| format!("opening {}", from.display()))?;
        let mut w = File::create(&to).with_context(|| format!("creating {}", to.display()))?;
        let mut h = Sha256::new();
        let mut n = 0u64;
        loop {
            let k = r.read(&mut buf).with_context(|| format!("reading {}", from.display()))?;
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
            w.write_all(&buf[..k]).with_context(|| format!("writing {}", to.display()))?;
            n += k as u64;
        }
        w.sync_all().with_context(|| format!("syncing {}", to.display()))?;
        let sha256 = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        hashes.insert(rel_key(&rel), FileHash { bytes: n, sha256 });
    }
    for d in dirs.iter().rev() {
        sync_dir(d)?;
    }
    Ok(hashes)
}

/// Makes a directory's entries (new files, renames) durable. Unix only: Windows cannot
/// open a directory as a file, and NTFS journals its metadata itself.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("syncing directory {}", dir.display()))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// The registered versions in `versions_dir`, by number. Anything else there (temp
/// dirs, stray files) is not a version.
pub(crate) fn version_dirs(versions_dir: &Path) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    if !versions_dir.is_dir() {
        return Ok(out);
    }
    let entries =
        std::fs::read_dir(versions_dir).with_context(|| format!("listing {}", versions_dir.display()))?;
    for e in entries {
        let e = e.with_context(|| format!("listing {}", versions_dir.display()))?;
        if let Some(n) = e.file_name().to_str().and_then(version_number) {
            if e.path().is_dir() {
                out.push(n);
            }
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Removes temp version dirs left by writers that died mid-copy. Only call this while
/// holding the writers' lock: then no live writer can own one of them.
pub(crate) fn clean_temps(versions_dir: &Path) -> Result<usize> {
    let mut n = 0;
    if !versions_dir.is_dir() {
        return Ok(0);
    }
    let entries =
        std::fs::read_dir(versions_dir).with_context(|| format!("listing {}", versions_dir.display()))?;
    for e in entries {
        let e = e.with_context(|| format!("listing {}", versions_dir.display()))?;
        if e.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            let p = e.path();
            let res = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
            res.with_context(|| format!("removing the stale temp {}", p.display()))?;
            tracing::info!("removed {}, left by an interrupted registration", p.display());
            n += 1;
        }
    }
    Ok(n)
}
