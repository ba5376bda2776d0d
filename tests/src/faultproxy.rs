//! A fault-injecting TCP proxy for HTTP object stores: put between the agents and Garage, it
//! answers a share of connections with `503 Slow Down`, resets a share (at once, or after some
//! bytes of a request or response have passed: a connection reused for many requests is cut in
//! the middle of one), and stalls a share for a few seconds before serving them. The rest pass.
//!
//! Faults are drawn per connection from a seeded generator (the seed is printed), so a failing
//! run can be replayed with `WALVAULT_FAULT_SEED`. Counters say what was injected, so a test can
//! show its storm was real. A client that keeps its connections open makes few of them (a backup
//! writing a few packs), so luck alone may spare it: [`FaultProxy::fault_next`] makes sure the
//! next connections are faulted.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Shares of connections, in percent, that get each fault.
#[derive(Debug, Clone, Copy)]
pub struct Storm {
    pub error_503: u32,
    pub reset_at_once: u32,
    pub reset_midway: u32,
    pub stall: u32,
    /// How long a stalled connection waits before it is served.
    pub stall_for: Duration,
}

impl Storm {
    /// No faults: every connection passes (until [`FaultProxy::set_down`]).
    pub fn calm() -> Storm {
        Storm {
            error_503: 0,
            reset_at_once: 0,
            reset_midway: 0,
            stall: 0,
            stall_for: Duration::ZERO,
        }
    }

    /// A quarter of connections answered 503, and about as many reset or stalled.
    pub fn heavy() -> Storm {
        Storm {
            error_503: 25,
            reset_at_once: 8,
            reset_midway: 12,
            stall: 5,
            stall_for: Duration::from_secs(3),
        }
    }
}

/// What the proxy has done.
#[derive(Debug, Default)]
pub struct Injected {
    pub connections: AtomicU64,
    pub error_503: AtomicU64,
    pub resets: AtomicU64,
    pub stalls: AtomicU64,
}

impl Injected {
    pub fn summary(&self) -> String {
        format!(
            "{} connections: {} answered 503, {} reset, {} stalled",
            self.connections.load(Ordering::Relaxed),
            self.error_503.load(Ordering::Relaxed),
            self.resets.load(Ordering::Relaxed),
            self.stalls.load(Ordering::Relaxed)
        )
    }

    /// Faults injected so far.
    pub fn faults(&self) -> u64 {
        self.error_503.load(Ordering::Relaxed)
            + self.resets.load(Ordering::Relaxed)
            + self.stalls.load(Ordering::Relaxed)
    }
}

/// A running proxy; stops accepting when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    injected: Arc<Injected>,
    stop: Arc<AtomicBool>,
    /// Connections still to be answered 503 whatever the draw.
    forced: Arc<AtomicU64>,
    /// An outage: new connections are reset at once, open ones at their next byte.
    down: Arc<AtomicBool>,
}

enum Fate {
    Pass,
    Error503,
    ResetAtOnce,
    /// Cut after this many bytes in either direction.
    ResetAfter(u64),
    Stall,
}

impl FaultProxy {
    /// Listen on a free loopback port, forwarding to `upstream` (`host:port`).
    pub fn start(upstream: SocketAddr, storm: Storm) -> Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").context("fault proxy listen")?;
        let addr = listener.local_addr()?;
        let seed = std::env::var("WALVAULT_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random::<u64>);
        eprintln!("fault proxy {addr} -> {upstream}: seed {seed} (WALVAULT_FAULT_SEED replays it)");
        let proxy = FaultProxy {
            addr,
            injected: Arc::default(),
            stop: Arc::default(),
            forced: Arc::default(),
            down: Arc::default(),
        };
        let (s, injected, stop) = (storm, Arc::clone(&proxy.injected), Arc::clone(&proxy.stop));
        let forced = Arc::clone(&proxy.forced);
        let down = Arc::clone(&proxy.down);
        listener.set_nonblocking(true)?;
        thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(seed);
            while !stop.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    Err(_) => continue,
                };
                injected.connections.fetch_add(1, Ordering::Relaxed);
                let roll = rng.random_range(0..100u32);
                let force = forced
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok();
                let fate = if down.load(Ordering::Relaxed) {
                    Fate::ResetAtOnce
                } else if force || roll < s.error_503 {
                    Fate::Error503
                } else if roll < s.error_503 + s.reset_at_once {
                    Fate::ResetAtOnce
                } else if roll < s.error_503 + s.reset_at_once + s.reset_midway {
                    Fate::ResetAfter(rng.random_range(512..4 << 20))
                } else if roll < s.error_503 + s.reset_at_once + s.reset_midway + s.stall {
                    Fate::Stall
                } else {
                    Fate::Pass
                };
                let (injected, stall_for, down) = (Arc::clone(&injected), s.stall_for, Arc::clone(&down));
                thread::spawn(move || serve(client, upstream, fate, stall_for, &injected, &down));
            }
        });
        Ok(proxy)
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn injected(&self) -> &Injected {
        &self.injected
    }

    /// An outage of the store (`true`) until it ends (`false`): while it lasts, new connections
    /// are reset at once and open ones as soon as a byte tries to pass.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Relaxed);
    }

    /// Answer the next `n` connections `503 Slow Down`, whatever the draw.
    pub fn fault_next(&self, n: u64) {
        self.forced.fetch_add(n, Ordering::Relaxed);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Close with an RST rather than a FIN: what a crashed load balancer or a dropped NAT entry does.
fn reset(stream: &TcpStream) {
    let sock = socket2::SockRef::from(stream);
    let _ = sock.set_linger(Some(Duration::ZERO));
    let _ = stream.shutdown(Shutdown::Both);
}

fn serve(
    mut client: TcpStream,
    upstream: SocketAddr,
    fate: Fate,
    stall_for: Duration,
    injected: &Injected,
    down: &Arc<AtomicBool>,
) {
    let _ = client.set_nodelay(true);
    match fate {
        Fate::Error503 => {
            injected.error_503.fetch_add(1, Ordering::Relaxed);
            // Read the request head, answer as S3 does when it sheds load, and close.
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            let _ = client.set_read_timeout(Some(Duration::from_secs(5)));
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 << 10 {
                match client.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code>\
                        <Message>Please reduce your request rate.</Message></Error>";
            let _ = write!(
                client,
                "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = client.shutdown(Shutdown::Both);
        }
        Fate::ResetAtOnce => {
            injected.resets.fetch_add(1, Ordering::Relaxed);
            reset(&client);
        }
        Fate::Stall => {
            injected.stalls.fetch_add(1, Ordering::Relaxed);
            thread::sleep(stall_for);
            pipe(client, upstream, None, injected, down);
        }
        Fate::ResetAfter(n) => pipe(client, upstream, Some(n), injected, down),
        Fate::Pass => pipe(client, upstream, None, injected, down),
    }
}

/// Copy both ways until either side closes; with `cut_after`, reset both sides once that many
/// bytes have passed in either direction.
fn pipe(
    client: TcpStream,
    upstream: SocketAddr,
    cut_after: Option<u64>,
    injected: &Injected,
    down: &Arc<AtomicBool>,
) {
    let Ok(server) = TcpStream::connect(upstream) else {
        reset(&client);
        return;
    };
    let _ = server.set_nodelay(true);
    let passed = Arc::new(AtomicU64::new(0));
    let cut = Arc::new(AtomicBool::new(false));
    let copy = |mut from: TcpStream, mut to: TcpStream| {
        let (passed, cut, down) = (Arc::clone(&passed), Arc::clone(&cut), Arc::clone(down));
        move || {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let total = passed.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
                if cut_after.is_some_and(|limit| total >= limit) || down.load(Ordering::Relaxed) {
                    cut.store(true, Ordering::Relaxed);
                    break;
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            if cut.load(Ordering::Relaxed) {
                reset(&from);
                reset(&to);
            } else {
                let _ = to.shutdown(Shutdown::Write);
            }
        }
    };
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let up = thread::spawn(copy(client, server));
    copy(s2, c2)();
    let _ = up.join();
    if cut.load(Ordering::Relaxed) {
        injected.resets.fetch_add(1, Ordering::Relaxed);
    }
}
