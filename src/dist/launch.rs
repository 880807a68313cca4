//! `--nproc-per-node N`: this process becomes the launcher of its node's N workers. Each
//! worker is the same command line without the launcher's flags, with torchrun's
//! variables set (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`,
//! `MASTER_PORT`), so a worker cannot tell this launcher from torchrun or Slurm.
//!
//! When a worker fails, the others get a grace period to notice on their own (they lose
//! its connection, or their collective times out), then are killed; the launcher's error
//! names the rank that failed first.
//!
//! The workers run in a process group of their own, so Ctrl-C at a terminal reaches the
//! launcher alone: it passes the first SIGINT or SIGTERM on to every worker as SIGTERM
//! (they stop after the same step, with a checkpoint: [`crate::interrupt`]) and kills
//! them on the second. A worker whose launcher dies gets SIGTERM too (Linux).

use std::ffi::OsString;
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use super::DEFAULT_MASTER_PORT;

/// The launcher's flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchArgs {
    pub nproc_per_node: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: Option<String>,
    pub master_port: Option<u16>,
}

/// The flags [`strip_launcher_flags`] removes, each with one value.
pub const LAUNCHER_FLAGS: [&str; 5] =
    ["--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port"];

/// How long the other workers get to exit on their own after one fails.
const GRACE: Duration = Duration::from_secs(30);

/// `argv` without the launcher's flags (`--flag value` and `--flag=value`).
pub fn strip_launcher_flags(argv: &[OsString]) -> Vec<OsString> {
    let mut out = Vec::with_capacity(argv.len());
    let mut skip_next = false;
    for a in argv {
        if skip_next {
            skip_next = false;
            continue;
        }
        let s = a.to_string_lossy();
        if LAUNCHER_FLAGS.contains(&s.as_ref()) {
            skip_next = true;
        } else if !LAUNCHER_FLAGS.iter().any(|f| s.starts_with(&format!("{f}="))) {
            out.push(a.clone());
        }
    }
    out
}

/// Environment variables, as `(name, value)`.
pub type Vars = Vec<(String, String)>;

/// The environment of each of this node's workers: `(local rank, variables)`.
pub fn worker_envs(args: &LaunchArgs) -> Result<Vec<(usize, Vars)>> {
    ensure!(args.nproc_per_node >= 1, "--nproc-per-node must be at least 1");
    ensure!(args.nnodes >= 1, "--nnodes must be at least 1");
    ensure!(
        args.node_rank < args.nnodes,
        "--node-rank {} is outside --nnodes {}",
        args.node_rank,
        args.nnodes
    );
    let master_addr = match (&args.master_addr, args.nnodes) {
        (Some(a), _) => a.clone(),
        (None, 1) => "127.0.0.1".to_string(),
        (None, n) => bail!("a run over {n} nodes needs --master-addr (the address of node 0)"),
    };
    let master_port = match (args.master_port, args.nnodes) {
        (Some(p), _) => p,
        // one node: any free port, so two runs on one machine do not collide
        (None, 1) => std::net::TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .context("finding a free port for the rendezvous")?,
        (None, _) => DEFAULT_MASTER_PORT,
    };
    let world = args.nnodes * args.nproc_per_node;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    Ok((0..args.nproc_per_node)
        .map(|local| {
            let rank = args.node_rank * args.nproc_per_node + local;
            let mut vars = vec![
                ("RANK".to_string(), rank.to_string()),
                ("WORLD_SIZE".to_string(), world.to_string()),
                ("LOCAL_RANK".to_string(), local.to_string()),
                ("LOCAL_WORLD_SIZE".to_string(), args.nproc_per_node.to_string()),
                ("MASTER_ADDR".to_string(), master_addr.clone()),
                ("MASTER_PORT".to_string(), master_port.to_string()),
            ];
            // workers on the CPU backend share this node's cores
            if std::env::var_os("RAYON_NUM_THREADS").is_none() {
                vars.push((
                    "RAYON_NUM_THREADS".to_string(),
                    (threads / args.nproc_per_node).max(1).to_string(),
                ));
            }
            (local, vars)
        })
        .collect())
}

/// Runs this node's workers to the end. `argv` is this process's command line (the
/// program first); the workers run it again without the launcher's flags.
pub fn launch(args: &LaunchArgs, argv: &[OsString]) -> Result<()> {
    ensure!(
        std::env::var_os("WORLD_SIZE").is_none(),
        "--nproc-per-node under a launcher that already set WORLD_SIZE: use one or the other"
    );
    let exe = std::env::current_exe().context("finding the tuneloop executable")?;
    let worker_argv = strip_launcher_flags(argv.get(1..).unwrap_or_default());
    run_workers(args, &exe, &worker_argv, Output::Inherit)
}

/// Where the workers' standard output goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Inherit,
    /// To this process's standard error (its standard output stays its own).
    Stderr,
}

/// Runs this node's workers of `exe worker_argv` to the end, each with its rank's
/// variables ([`worker_envs`]).
pub fn run_workers(args: &LaunchArgs, exe: &Path, worker_argv: &[OsString], output: Output) -> Result<()> {
    let envs = worker_envs(args)?;
    let world = args.nnodes * args.nproc_per_node;
    eprintln!(
        "launching {} worker(s) on node {} of {} (world size {world})",
        args.nproc_per_node, args.node_rank, args.nnodes
    );
    let mut workers: Vec<(usize, Child)> = Vec::with_capacity(envs.len());
    for (local, vars) in envs {
        let rank = args.node_rank * args.nproc_per_node + local;
        let mut cmd = Command::new(exe);
        cmd.args(worker_argv).envs(vars);
        own_group_and_parent_death_signal(&mut cmd);
        if output == Output::Stderr {
            cmd.stdout(std::io::stderr());
        }
        match cmd.spawn() {
            Ok(c) => workers.push((rank, c)),
            Err(e) => {
                stop_all(&mut workers);
                return Err(e).with_context(|| format!("starting rank {rank} ({})", exe.display()));
            }
        }
    }
    let _second = crate::interrupt::SecondSignalHandled::new();
    watch(workers)
}

#[cfg(unix)]
fn own_group_and_parent_death_signal(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
    #[cfg(target_os = "linux")]
    // SAFETY: prctl is async-signal-safe, and the closure touches nothing else.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(unix))]
fn own_group_and_parent_death_signal(_cmd: &mut Command) {}

/// Sends SIGTERM to each worker still running.
fn terminate(workers: &[(usize, Child)]) {
    #[cfg(unix)]
    for (_, c) in workers {
        if let Ok(pid) = libc::pid_t::try_from(c.id()) {
            // SAFETY: kill has no memory-safety preconditions; the pid is our child's,
            // not yet waited for, so it names that process.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
}

/// A worker that stopped on a signal with its checkpoint ([`crate::interrupt`]).
fn stopped_on_signal(status: &ExitStatus) -> bool {
    status.code() == Some(i32::from(crate::interrupt::EXIT_STATUS))
}

/// Waits for every worker; after the first failure, gives the rest [`GRACE`] and kills
/// what is left.
fn watch(mut workers: Vec<(usize, Child)>) -> Result<()> {
    let mut first_failure: Option<(usize, ExitStatus)> = None;
    let mut failed_at: Option<Instant> = None;
    let (mut forwarded, mut stopped) = (false, 0usize);
    while !workers.is_empty() {
        match crate::interrupt::signals() {
            0 => {}
            1 if !forwarded => {
                eprintln!("signal: asking the workers to stop after this step, with a checkpoint");
                terminate(&workers);
                forwarded = true;
            }
            1 => {}
            _ => {
                eprintln!("second signal: killing the workers");
                stop_all(&mut workers);
                bail!(crate::interrupt::Interrupted {
                    what: "killed by a second signal; the last checkpoint is intact".into()
                });
            }
        }
        let mut i = 0;
        while i < workers.len() {
            match workers[i].1.try_wait() {
                Ok(Some(status)) => {
                    let (rank, _) = workers.remove(i);
                    if stopped_on_signal(&status) {
                        stopped += 1;
                    } else if !status.success() && first_failure.is_none() {
                        eprintln!("rank {rank} failed ({status}); stopping the other ranks");
                        first_failure = Some((rank, status));
                        failed_at = Some(Instant::now());
                    }
                }
                Ok(None) => i += 1,
                Err(e) => {
                    let rank = workers[i].0;
                    stop_all(&mut workers);
                    return Err(e).with_context(|| format!("waiting for rank {rank}"));
                }
            }
        }
        if failed_at.is_some_and(|t| t.elapsed() > GRACE) {
            stop_all(&mut workers);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match first_failure {
        None if stopped > 0 => bail!(crate::interrupt::Interrupted {
            what: format!(
                "{stopped} worker(s) stopped by a signal after the same step, rank 0 with a checkpoint"
            )
        }),
        None => Ok(()),
        Some((rank, status)) => {
            bail!("rank {rank} failed ({status}); the run stopped (its last checkpoint is intact)")
        }
    }
}

fn stop_all(workers: &mut Vec<(usize, Child)>) {
    for (_, c) in workers.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
    workers.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launcher_flags_are_stripped_in_both_spellings() {
        let argv: Vec<OsString> = [
            "finetune",
            "-c",
            "r.yaml",
            "--nproc-per-node",
            "2",
            "--master-port=1234",
            "--resume",
            "--peft.r=4",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let want: Vec<OsString> =
            ["finetune", "-c", "r.yaml", "--resume", "--peft.r=4"].iter().map(OsString::from).collect();
        assert_eq!(strip_launcher_flags(&argv), want);
    }

    #[test]
    fn ranks_follow_the_node() {
        let args = LaunchArgs {
            nproc_per_node: 4,
            nnodes: 2,
            node_rank: 1,
            master_addr: Some("10.0.0.1".into()),
            master_port: None,
        };
        let envs = worker_envs(&args).unwrap();
        let get = |vars: &[(String, String)], k: &str| vars.iter().find(|(n, _)| n == k).unwrap().1.clone();
        assert_eq!(envs.len(), 4);
        assert_eq!(get(&envs[2].1, "RANK"), "6");
        assert_eq!(get(&envs[2].1, "LOCAL_RANK"), "2");
        assert_eq!(get(&envs[2].1, "WORLD_SIZE"), "8");
        assert_eq!(get(&envs[2].1, "MASTER_PORT"), DEFAULT_MASTER_PORT.to_string());
        let e = worker_envs(&LaunchArgs { master_addr: None, ..args.clone() }).unwrap_err();
        assert!(format!("{e:#}").contains("--master-addr"), "{e:#}");
        let e = worker_envs(&LaunchArgs { node_rank: 2, ..args }).unwrap_err();
        assert!(format!("{e:#}").contains("--node-rank 2"), "{e:#}");
    }
}
