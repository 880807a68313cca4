//! Data-parallel training: one process per GPU, each on its shard of every global batch,
//! the gradients summed across processes before the (identical) optimizer step.
//!
//! - [`DistEnv`]: who this process is, from the environment a launcher set (tuneloop's
//!   own `--nproc-per-node`, torchrun's `RANK`/`WORLD_SIZE`/…, or Slurm's `SLURM_PROCID`/
//!   `SLURM_NTASKS`).
//! - [`launch`]: `--nproc-per-node N` starts the N workers of this node and watches them.
//! - [`rendezvous`]: rank 0 listens on `MASTER_ADDR:MASTER_PORT`; the others connect and
//!   receive 128 bytes from it (NCCL's unique id).
//! - [`collective`]: the [`Collective`] the trainer sums gradients through: NCCL on the
//!   CUDA backend, the rendezvous' TCP connections on the CPU backend, nothing at all for
//!   a single process.

pub mod collective;
pub mod launch;
pub mod nccl;
pub mod rendezvous;

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};

pub use collective::{Collective, Single, TcpGroup};

/// The port torchrun uses when none is given.
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// How long ranks wait for each other to arrive at the rendezvous, and for each other's
/// gradients at every step, unless `TUNELOOP_DIST_TIMEOUT` (seconds) says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// This process's place in a data-parallel run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world_size: usize,
    /// Rank within this node: the GPU this process uses.
    pub local_rank: usize,
    pub local_world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// Rendezvous and collective timeout.
    pub timeout: Duration,
    /// Whether a launcher set this up (so even a world of one goes through the
    /// rendezvous and the collective), rather than a plain single-process run.
    pub launched: bool,
}

impl DistEnv {
    /// A plain single-process run.
    pub fn single() -> Self {
        Self {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            local_world_size: 1,
            master_addr: "127.0.0.1".into(),
            master_port: DEFAULT_MASTER_PORT,
            timeout: DEFAULT_TIMEOUT,
            launched: false,
        }
    }

    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// Reads the process environment: torchrun's variables when `WORLD_SIZE` is set,
    /// else Slurm's when `SLURM_NTASKS` and `SLURM_PROCID` are, else a single process.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`from_env`](Self::from_env) over any variable lookup (for tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let num = |k: &str| -> Result<Option<usize>> {
            match var(k) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse::<usize>()
                    .map(Some)
                    .with_context(|| format!("{k}={v:?} is not a non-negative integer")),
            }
        };
        let port = || -> Result<u16> {
            match var("MASTER_PORT") {
                None => Ok(DEFAULT_MASTER_PORT),
                Some(v) => {
                    v.trim().parse::<u16>().with_context(|| format!("MASTER_PORT={v:?} is not a port number"))
                }
            }
        };
        let timeout = match var("TUNELOOP_DIST_TIMEOUT") {
            None => DEFAULT_TIMEOUT,
            Some(v) => {
                let s: f64 =
                    v.trim().parse().ok().filter(|s: &f64| *s > 0.0 && s.is_finite()).with_context(|| {
                        format!("TUNELOOP_DIST_TIMEOUT={v:?} is not a positive number of seconds")
                    })?;
                Duration::from_secs_f64(s)
            }
        };
        let mut env = if let Some(world) = num("WORLD_SIZE")? {
            let Some(rank) = num("RANK")? else { bail!("WORLD_SIZE is set but RANK is not") };
            let local_rank = num("LOCAL_RANK")?.unwrap_or(rank);
            Self {
                rank,
                world_size: world,
                local_rank,
                local_world_size: num("LOCAL_WORLD_SIZE")?.unwrap_or(world),
                master_addr: var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
                master_port: port()?,
                timeout,
                launched: true,
            }
        } else if let (Some(world), Some(rank)) = (num("SLURM_NTASKS")?, num("SLURM_PROCID")?) {
            let master_addr = match var("MASTER_ADDR") {
                Some(a) => a,
                None => {
                    let list = var("SLURM_STEP_NODELIST").or_else(|| var("SLURM_JOB_NODELIST"));
                    match list.as_deref().map(first_slurm_host).transpose()? {
                        Some(h) => h,
                        None if world == 1 => "127.0.0.1".into(),
                        None => bail!(
                            "Slurm run of {world} tasks: set MASTER_ADDR, or run inside a job \
                             (SLURM_JOB_NODELIST names the first node)"
                        ),
                    }
                }
            };
            Self {
                rank,
                world_size: world,
                local_rank: num("SLURM_LOCALID")?.unwrap_or(0),
                local_world_size: num("SLURM_NTASKS_PER_NODE")?.unwrap_or(world),
                master_addr,
                master_port: port()?,
                timeout,
                // a lone task in an interactive allocation is just a single process
                launched: world > 1,
            }
        } else {
            return Ok(Self { timeout, ..Self::single() });
        };
        ensure!(env.world_size >= 1, "WORLD_SIZE must be at least 1");
        ensure!(env.rank < env.world_size, "rank {} is outside a world of {}", env.rank, env.world_size);
        if env.master_addr.trim().is_empty() {
            env.master_addr = "127.0.0.1".into();
        }
        Ok(env)
    }
}

/// Prints `[rank N] message` to stderr in one write, so the lines of several ranks
/// sharing a terminal do not interleave.
pub fn say(rank: usize, msg: impl std::fmt::Display) {
    use std::io::Write;
    let line = format!("[rank {rank}] {msg}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// The first host of a Slurm node list: `gpu[03-06,09],login1` -> `gpu03`.
pub fn first_slurm_host(list: &str) -> Result<String> {
    let list = list.trim();
    let first_item_end = {
        // the first comma outside brackets
        let mut depth = 0i32;
        list.char_indices()
            .find(|&(_, c)| {
                match c {
                    '[' => depth += 1,
                    ']' => depth -= 1,
                    _ => {}
                }
                c == ',' && depth == 0
            })
            .map_or(list.len(), |(i, _)| i)
    };
    let item = &list[..first_item_end];
    let host = match item.find('[') {
        None => item.to_string(),
        Some(open) => {
            let close = item.find(']').with_context(|| format!("Slurm node list {list:?}: unclosed ["))?;
            ensure!(close > open + 1, "Slurm node list {list:?}: empty []");
            let first = item[open + 1..close].split(',').next().unwrap_or_default();
            let first = first.split('-').next().unwrap_or_default();
            format!("{}{}{}", &item[..open], first, &item[close + 1..])
        }
    };
    ensure!(!host.is_empty(), "Slurm node list {list:?} names no host");
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<DistEnv> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        DistEnv::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn torchrun_variables() {
        let e = env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank, e.local_world_size), (3, 8, 1, 2));
        assert_eq!((e.master_addr.as_str(), e.master_port, e.launched), ("node0", 1234, true));
    }

    #[test]
    fn slurm_variables_and_node_lists() {
        let e = env(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "gpu[03-06,09]"),
        ])
        .unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank), (5, 16, 1));
        assert_eq!((e.master_addr.as_str(), e.master_port), ("gpu03", DEFAULT_MASTER_PORT));
        assert_eq!(first_slurm_host("login1,gpu[1-2]").unwrap(), "login1");
        assert_eq!(first_slurm_host("rack[7-8]-n[1-4]").unwrap(), "rack7-n[1-4]");
        assert!(first_slurm_host("gpu[1-2").is_err());
        // one task in an interactive allocation is a plain run
        assert!(!env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")]).unwrap().launched);
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = env(&[("RANK", "x"), ("WORLD_SIZE", "2")]).unwrap_err();
        assert!(format!("{e:#}").contains("RANK=\"x\""), "{e:#}");
        let e = env(&[("RANK", "2"), ("WORLD_SIZE", "2")]).unwrap_err();
        assert!(format!("{e:#}").contains("rank 2 is outside a world of 2"), "{e:#}");
        let e = env(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "99999")]).unwrap_err();
        assert!(format!("{e:#}").contains("MASTER_PORT"), "{e:#}");
        let e = env(&[("WORLD_SIZE", "2")]).unwrap_err();
        assert!(format!("{e:#}").contains("RANK is not"), "{e:#}");
        assert_eq!(env(&[]).unwrap(), DistEnv::single());
    }
}
