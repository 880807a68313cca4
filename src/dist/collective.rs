//! The one collective data parallelism needs: an all-reduce (sum) of the gradients, as
//! one fused buffer, with a few host numbers (loss sums, token counts) alongside.
//!
//! The trainer scales every rank's gradient by the *global* batch's token count before
//! the sum, so the sum is the global batch's mean-loss gradient: the same gradient one
//! process computes over the whole batch, whatever the world size.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};

use super::rendezvous::{self, Rendezvous};
use super::DistEnv;
use crate::ops::Ops;

pub trait Collective<O: Ops> {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Sums `tensors` element-wise over all ranks, in place, and `host` with them; every
    /// rank ends with the same values. Every rank must call it with the same shapes. The
    /// tensors that [`Collective::start_bucket`] started since the last call are only
    /// waited for and written back.
    fn all_reduce_sum(&self, ops: &O, tensors: &mut [&mut O::Tensor], host: &mut [f64]) -> Result<()>;
    /// Starts summing `tensors` over the ranks while the caller queues more work: a data
    /// parallel step starts each layer's gradients as its last micro-batch's backward
    /// finishes that layer, so the sums overlap the backward of the layers below. Every
    /// rank must start the same buckets in the same order. By default nothing starts
    /// early and `all_reduce_sum` sums everything.
    fn start_bucket(&self, _ops: &O, _tensors: &[&O::Tensor]) -> Result<()> {
        Ok(())
    }
    /// What it runs over, for logs: `single`, `tcp`, `nccl`.
    fn kind(&self) -> &'static str;
}

/// One process: nothing to exchange.
pub struct Single;

impl<O: Ops> Collective<O> for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _: &O, _: &mut [&mut O::Tensor], _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn kind(&self) -> &'static str {
        "single"
    }
}

/// The all-reduce over the rendezvous' TCP connections, for the CPU backend (NCCL needs
/// GPUs): every rank sends its buffer to rank 0, which adds them up in rank order (so the
/// result does not depend on who arrives first) and sends the sum back.
///
/// A rank that exits closes its connection, and the others fail at once naming it; one
/// that hangs is named when the timeout runs out.
pub struct TcpGroup {
    rank: usize,
    world_size: usize,
    /// The connections, and the sequence number of the next all-reduce (to catch ranks
    /// that fell out of step).
    links: Mutex<(Vec<TcpStream>, u64)>,
    timeout: Duration,
}

const MSG_MAGIC: &[u8; 4] = b"TLAR";

impl TcpGroup {
    /// Meets the other ranks of `env` (see [`rendezvous::join`]).
    pub fn join(env: &DistEnv) -> Result<Self> {
        let rv = rendezvous::join(env, env.is_root().then_some([0u8; rendezvous::PAYLOAD]))?;
        Self::from_rendezvous(rv, env.timeout)
    }

    pub fn from_rendezvous(rv: Rendezvous, timeout: Duration) -> Result<Self> {
        for l in &rv.links {
            l.set_read_timeout(Some(timeout)).context("collective socket")?;
            l.set_write_timeout(Some(timeout)).context("collective socket")?;
        }
        Ok(Self { rank: rv.rank, world_size: rv.world_size, links: Mutex::new((rv.links, 0)), timeout })
    }

    /// Sums `f32s` and `f64s` over the ranks, in place.
    pub fn all_reduce_host(&self, f32s: &mut [f32], f64s: &mut [f64]) -> Result<()> {
        let mut guard = self.links.lock().unwrap_or_else(|e| e.into_inner());
        let (links, next) = &mut *guard;
        let seq = *next;
        *next += 1;
        if self.world_size == 1 {
            return Ok(());
        }
        if self.rank == 0 {
            let mut other32 = vec![0f32; f32s.len()];
            let mut other64 = vec![0f64; f64s.len()];
            for (i, link) in links.iter_mut().enumerate() {
                let peer = i + 1;
                self.recv(link, peer, seq, &mut other32, &mut other64)?;
                for (a, b) in f32s.iter_mut().zip(&other32) {
                    *a += b;
                }
                for (a, b) in f64s.iter_mut().zip(&other64) {
                    *a += b;
                }
            }
            let msg = encode(seq, f32s, f64s);
            for (i, link) in links.iter_mut().enumerate() {
                link.write_all(&msg).map_err(|e| self.link_error(e, i + 1, seq, "sending the sum to"))?;
            }
        } else {
            let link = &mut links[0];
            link.write_all(&encode(seq, f32s, f64s))
                .map_err(|e| self.link_error(e, 0, seq, "sending gradients to"))?;
            self.recv(link, 0, seq, f32s, f64s)?;
        }
        Ok(())
    }

    fn recv(
        &self,
        link: &mut TcpStream,
        peer: usize,
        seq: u64,
        f32s: &mut [f32],
        f64s: &mut [f64],
    ) -> Result<()> {
        let mut head = [0u8; 28];
        link.read_exact(&mut head).map_err(|e| self.link_error(e, peer, seq, "waiting for"))?;
        let word = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().unwrap_or_default());
        ensure!(&head[..4] == MSG_MAGIC, "rank {}: garbled message from rank {peer}", self.rank);
        let (their_seq, n32, n64) = (word(4), word(12) as usize, word(20) as usize);
        ensure!(
            their_seq == seq && n32 == f32s.len() && n64 == f64s.len(),
            "rank {}: rank {peer} is out of step (all-reduce {their_seq} of {n32}+{n64} values, here {seq} of \
             {}+{}): were the ranks started with the same recipe?",
            self.rank,
            f32s.len(),
            f64s.len()
        );
        let mut body = vec![0u8; n32 * 4 + n64 * 8];
        link.read_exact(&mut body).map_err(|e| self.link_error(e, peer, seq, "waiting for"))?;
        let (b32, b64) = body.split_at(n32 * 4);
        for (v, c) in f32s.iter_mut().zip(b32.chunks_exact(4)) {
            *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        for (v, c) in f64s.iter_mut().zip(b64.chunks_exact(8)) {
            *v = f64::from_le_bytes(c.try_into().unwrap_or_default());
        }
        Ok(())
    }

    fn link_error(&self, e: std::io::Error, peer: usize, seq: u64, doing: &str) -> anyhow::Error {
        let me = self.rank;
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => anyhow::anyhow!(
                "rank {me}: rank {peer} did not respond within {:.0} s (all-reduce {seq}, {doing} rank {peer}): \
                 it hangs or died; raise TUNELOOP_DIST_TIMEOUT if its steps are that slow",
                self.timeout.as_secs_f64()
            ),
            ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe => anyhow::anyhow!(
                "rank {me}: lost rank {peer} (all-reduce {seq}, {doing} rank {peer}): it exited or crashed"
            ),
            _ => anyhow::Error::new(e).context(format!("rank {me}: all-reduce {seq}, {doing} rank {peer}")),
        }
    }
}

fn encode(seq: u64, f32s: &[f32], f64s: &[f64]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(28 + f32s.len() * 4 + f64s.len() * 8);
    msg.extend_from_slice(MSG_MAGIC);
    for w in [seq, f32s.len() as u64, f64s.len() as u64] {
        msg.extend_from_slice(&w.to_le_bytes());
    }
    for v in f32s {
        msg.extend_from_slice(&v.to_le_bytes());
    }
    for v in f64s {
        msg.extend_from_slice(&v.to_le_bytes());
    }
    msg
}

impl<O: Ops> Collective<O> for TcpGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn all_reduce_sum(&self, ops: &O, tensors: &mut [&mut O::Tensor], host: &mut [f64]) -> Result<()> {
        // one fused buffer
        let mut flat = Vec::new();
        let mut sizes = Vec::with_capacity(tensors.len());
        for t in tensors.iter() {
            let v = ops.download(t)?;
            sizes.push(v.len());
            flat.extend_from_slice(&v);
        }
        self.all_reduce_host(&mut flat, host)?;
        let mut off = 0;
        for (t, n) in tensors.iter_mut().zip(sizes) {
            let shape = ops.shape(t).to_vec();
            **t = ops.upload(&flat[off..off + n], &shape)?;
            off += n;
        }
        if off != flat.len() {
            bail!("all-reduce: {} values came back for {off}", flat.len());
        }
        Ok(())
    }
    fn kind(&self) -> &'static str {
        "tcp"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    fn env(rank: usize, world: usize, port: u16, timeout_s: f64) -> DistEnv {
        DistEnv {
            rank,
            world_size: world,
            local_rank: rank,
            local_world_size: world,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            timeout: Duration::from_secs_f64(timeout_s),
            launched: true,
        }
    }

    #[test]
    fn sums_in_rank_order_on_every_rank() {
        let port = free_port();
        let world = 3;
        let handles: Vec<_> = (0..world)
            .map(|r| {
                std::thread::spawn(move || {
                    let g = TcpGroup::join(&env(r, world, port, 20.0)).unwrap();
                    let mut out = vec![];
                    for round in 0..3 {
                        let mut a: Vec<f32> = (0..5).map(|i| (r * 10 + i + round) as f32).collect();
                        let mut h = vec![r as f64 + 0.5, 1.0];
                        g.all_reduce_host(&mut a, &mut h).unwrap();
                        out.push((a, h));
                    }
                    out
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for round in 0..3 {
            let want: Vec<f32> =
                (0..5).map(|i| (0..world).map(|r| (r * 10 + i + round) as f32).sum()).collect();
            for res in &results {
                assert_eq!(res[round].0, want);
                assert_eq!(res[round].1, vec![0.5 + 1.5 + 2.5, 3.0]);
            }
        }
    }

    #[test]
    fn a_rank_that_leaves_is_named() {
        let port = free_port();
        let leaver = std::thread::spawn(move || {
            let g = TcpGroup::join(&env(1, 2, port, 20.0)).unwrap();
            drop(g);
        });
        let g = TcpGroup::join(&env(0, 2, port, 20.0)).unwrap();
        leaver.join().unwrap();
        let e = g.all_reduce_host(&mut [1.0], &mut []).unwrap_err();
        assert!(format!("{e:#}").contains("lost rank 1"), "{e:#}");
    }

    #[test]
    fn a_rank_that_hangs_is_named_after_the_timeout() {
        let port = free_port();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let hanger = std::thread::spawn(move || {
            let _g = TcpGroup::join(&env(1, 2, port, 20.0)).unwrap();
            rx.recv().ok(); // holds the connection open, sends nothing
        });
        let g = TcpGroup::join(&env(0, 2, port, 0.5)).unwrap();
        let e = g.all_reduce_host(&mut [1.0], &mut []).unwrap_err();
        assert!(format!("{e:#}").contains("rank 1 did not respond within"), "{e:#}");
        tx.send(()).unwrap();
        hanger.join().unwrap();
    }

    #[test]
    fn missing_ranks_are_named() {
        let port = free_port();
        let e = TcpGroup::join(&env(0, 3, port, 0.3)).err().unwrap();
        assert!(format!("{e:#}").contains("rank(s) 1, 2 of 3 did not arrive"), "{e:#}");
        let e = TcpGroup::join(&env(2, 3, free_port(), 0.3)).err().unwrap();
        assert!(format!("{e:#}").contains("rank 2: could not reach rank 0's rendezvous"), "{e:#}");
    }

    #[test]
    fn a_mismatched_world_is_refused() {
        let port = free_port();
        let joiner =
            std::thread::spawn(move || TcpGroup::join(&env(1, 4, port, 5.0)).err().map(|e| format!("{e:#}")));
        let e = TcpGroup::join(&env(0, 2, port, 5.0)).err().unwrap();
        assert!(format!("{e:#}").contains("expects a world of 4"), "{e:#}");
        let je = joiner.join().unwrap().unwrap();
        assert!(je.contains("refused") || je.contains("closed"), "{je}");
    }
}
