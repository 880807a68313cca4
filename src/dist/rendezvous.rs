//! The TCP rendezvous: rank 0 listens on `MASTER_ADDR:MASTER_PORT`, every other rank
//! connects and says who it is, and once all have arrived rank 0 sends each the same 128
//! bytes (NCCL's unique id on the CUDA backend). The connections stay open: the CPU
//! backend's collective runs over them.
//!
//! Wire format (little-endian): a joining rank sends `TLRV`, the protocol version, its
//! rank and the world size (u32 each); rank 0 answers `0` and the 128 bytes, or `1`, a
//! u32 length and a message saying why it refuses.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use super::DistEnv;

const MAGIC: &[u8; 4] = b"TLRV";
const VERSION: u32 = 1;
pub const PAYLOAD: usize = 128;

/// The outcome of a rendezvous.
pub struct Rendezvous {
    pub rank: usize,
    pub world_size: usize,
    /// On rank 0, the connection to rank `k` at index `k - 1`; elsewhere, the one
    /// connection to rank 0.
    pub links: Vec<TcpStream>,
    /// What rank 0 handed out.
    pub payload: [u8; PAYLOAD],
}

/// Meets the other ranks of `env`. Rank 0 gives `payload` (other ranks pass `None` and
/// receive it). Fails, naming who is missing, when not every rank arrives within
/// `env.timeout`.
pub fn join(env: &DistEnv, payload: Option<[u8; PAYLOAD]>) -> Result<Rendezvous> {
    let t0 = Instant::now();
    let rv = if env.is_root() {
        let payload = payload.context("rank 0 must bring the rendezvous payload")?;
        serve(env, payload)?
    } else {
        connect(env)?
    };
    if env.is_root() {
        super::say(
            0,
            format_args!(
                "rendezvous at {}:{}: all {} ranks arrived in {:.2} s",
                env.master_addr,
                env.master_port,
                env.world_size,
                t0.elapsed().as_secs_f64()
            ),
        );
    }
    Ok(rv)
}

fn listen(env: &DistEnv) -> Result<TcpListener> {
    let here = (env.master_addr.as_str(), env.master_port);
    match TcpListener::bind(here) {
        Ok(l) => Ok(l),
        // MASTER_ADDR may name this node by an address it cannot bind (a NAT or a
        // hostname resolving elsewhere): listen on every interface then.
        Err(e) if e.kind() == ErrorKind::AddrNotAvailable => TcpListener::bind(("0.0.0.0", env.master_port))
            .with_context(|| format!("rank 0: cannot listen on port {}", env.master_port)),
        Err(e) => Err(e).with_context(|| {
            format!(
                "rank 0: cannot listen on {}:{} (is another run using this MASTER_PORT?)",
                env.master_addr, env.master_port
            )
        }),
    }
}

fn serve(env: &DistEnv, payload: [u8; PAYLOAD]) -> Result<Rendezvous> {
    let listener = listen(env)?;
    listener.set_nonblocking(true).context("rendezvous socket")?;
    let deadline = Instant::now() + env.timeout;
    let mut links: Vec<Option<TcpStream>> = (1..env.world_size).map(|_| None).collect();
    while links.iter().any(Option::is_none) {
        let (mut stream, peer) = match listener.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> = links
                        .iter()
                        .enumerate()
                        .filter(|(_, l)| l.is_none())
                        .map(|(i, _)| (i + 1).to_string())
                        .collect();
                    bail!(
                        "rendezvous at {}:{}: rank(s) {} of {} did not arrive within {:.0} s",
                        env.master_addr,
                        env.master_port,
                        missing.join(", "),
                        env.world_size,
                        env.timeout.as_secs_f64()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(e).context("rendezvous: accept"),
        };
        stream.set_nonblocking(false).context("rendezvous socket")?;
        stream.set_read_timeout(Some(Duration::from_secs(30))).context("rendezvous socket")?;
        let hello =
            read_hello(&mut stream).with_context(|| format!("rendezvous: a bad greeting from {peer}"))?;
        let (rank, world) = match hello {
            Some(h) => h,
            // something else knocked on the port (a scanner, a health check): ignore it
            None => continue,
        };
        let refuse = |stream: &mut TcpStream, why: String| -> Result<()> {
            let mut msg = vec![1u8];
            msg.extend_from_slice(&(why.len() as u32).to_le_bytes());
            msg.extend_from_slice(why.as_bytes());
            // best effort: the refusal is also this rank's own error
            let _ = stream.write_all(&msg);
            bail!("{why}")
        };
        if world != env.world_size {
            refuse(
                &mut stream,
                format!(
                    "rendezvous: rank {rank} at {peer} expects a world of {world}, rank 0 one of {}",
                    env.world_size
                ),
            )?;
        }
        if rank == 0 || rank >= env.world_size {
            refuse(&mut stream, format!("rendezvous: {peer} claims rank {rank} in a world of {world}"))?;
        }
        if links[rank - 1].is_some() {
            refuse(
                &mut stream,
                format!("rendezvous: two processes claim rank {rank} (the second from {peer})"),
            )?;
        }
        stream.set_nodelay(true).context("rendezvous socket")?;
        links[rank - 1] = Some(stream);
    }
    let mut out = Vec::with_capacity(links.len());
    for (i, link) in links.into_iter().enumerate() {
        let mut link = link.context("rendezvous: a rank went missing")?;
        let mut msg = vec![0u8];
        msg.extend_from_slice(&payload);
        link.write_all(&msg)
            .with_context(|| format!("rendezvous: rank {} left before it was answered", i + 1))?;
        out.push(link);
    }
    Ok(Rendezvous { rank: 0, world_size: env.world_size, links: out, payload })
}

/// `Some((rank, world))`, or `None` when the peer does not speak this protocol.
fn read_hello(stream: &mut TcpStream) -> Result<Option<(usize, usize)>> {
    let mut buf = [0u8; 16];
    if stream.read_exact(&mut buf).is_err() || &buf[..4] != MAGIC {
        return Ok(None);
    }
    let word = |i: usize| u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    ensure!(word(4) == VERSION, "rendezvous protocol version {} (this build speaks {VERSION})", word(4));
    Ok(Some((word(8) as usize, word(12) as usize)))
}

fn resolve(env: &DistEnv) -> Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = (env.master_addr.as_str(), env.master_port)
        .to_socket_addrs()
        .with_context(|| format!("rank {}: cannot resolve MASTER_ADDR {:?}", env.rank, env.master_addr))?
        .collect();
    ensure!(!addrs.is_empty(), "rank {}: MASTER_ADDR {:?} resolves to no address", env.rank, env.master_addr);
    Ok(addrs)
}

fn connect(env: &DistEnv) -> Result<Rendezvous> {
    let deadline = Instant::now() + env.timeout;
    let addrs = resolve(env)?;
    let mut stream = 'outer: loop {
        for a in &addrs {
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(10));
            if let Ok(s) = TcpStream::connect_timeout(a, left.min(Duration::from_secs(5))) {
                break 'outer s;
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "rank {}: could not reach rank 0's rendezvous at {}:{} within {:.0} s (is rank 0 running, \
                 and MASTER_ADDR/MASTER_PORT the same for every rank?)",
                env.rank,
                env.master_addr,
                env.master_port,
                env.timeout.as_secs_f64()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut hello = Vec::with_capacity(16);
    hello.extend_from_slice(MAGIC);
    for w in [VERSION, env.rank as u32, env.world_size as u32] {
        hello.extend_from_slice(&w.to_le_bytes());
    }
    stream
        .write_all(&hello)
        .with_context(|| format!("rank {}: rendezvous: sending the greeting", env.rank))?;
    // rank 0 answers once everyone is there: wait as long as it waits
    stream
        .set_read_timeout(Some(deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(5)))
        .context("rendezvous socket")?;
    let mut status = [0u8; 1];
    stream.read_exact(&mut status).with_context(|| {
        format!("rank {}: rank 0 closed the rendezvous before every rank arrived", env.rank)
    })?;
    if status[0] != 0 {
        let mut len = [0u8; 4];
        stream.read_exact(&mut len).context("rendezvous: reading rank 0's refusal")?;
        let mut msg = vec![0u8; (u32::from_le_bytes(len) as usize).min(4096)];
        stream.read_exact(&mut msg).context("rendezvous: reading rank 0's refusal")?;
        bail!("rank {}: rank 0 refused: {}", env.rank, String::from_utf8_lossy(&msg));
    }
    let mut payload = [0u8; PAYLOAD];
    stream.read_exact(&mut payload).context("rendezvous: reading the payload from rank 0")?;
    stream.set_nodelay(true).context("rendezvous socket")?;
    Ok(Rendezvous { rank: env.rank, world_size: env.world_size, links: vec![stream], payload })
}
