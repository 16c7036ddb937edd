//! The HTTP listener's limits on connections, before any request is read: how many at once,
//! how many from one address, and how long a new connection may take to send its first
//! request's headers.
//!
//! axum serves each connection until its client closes it, and reads headers with no deadline
//! (hyper's `header_read_timeout` needs a timer that `axum::serve` does not give it). So
//! without these a few thousand idle or dripping connections used up the process's file
//! descriptors: no customer could connect, and the wallet, relay and LNURL calls that confirm
//! payments failed to open sockets too.
//!
//! - At most `[http] max_connections` at once: beyond it, new connections wait in the kernel's
//!   backlog until one closes.
//! - At most `[http] max_connections_per_ip` from one address: more are closed as they
//!   arrive. The reverse proxies named in `trusted_proxies` are excepted (every client of
//!   theirs comes from their address), and so are `127.0.0.1` and `::1`: this host's own proxy,
//!   tools and `dvmd bench`, whose hundreds of customers pay from one address.
//! - A new connection must send its first request's headers within `[http]
//!   header_timeout_secs`, or it is closed.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

/// The limits, from `[http]`.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Connections at once.
    pub max_connections: usize,
    /// Connections at once from one address.
    pub max_per_ip: usize,
    /// How long a new connection may take to send its first request's headers.
    pub header_timeout: Duration,
    /// Addresses the per-address limit does not apply to (trusted reverse proxies).
    pub exempt: Vec<IpAddr>,
}

/// A [`TcpListener`] that holds its connections to [`ConnectionLimits`].
pub struct GuardedListener {
    inner: TcpListener,
    limits: ConnectionLimits,
    slots: Arc<Semaphore>,
    per_ip: Counts,
}

/// Open connections by address.
type Counts = Arc<Mutex<HashMap<IpAddr, usize>>>;

impl GuardedListener {
    /// Guard `inner` with `limits`.
    pub fn new(inner: TcpListener, limits: ConnectionLimits) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(limits.max_connections.max(1))),
            inner,
            limits,
            per_ip: Arc::default(),
        }
    }

    /// Count a connection from `ip`, unless it already has its most.
    fn admit(&self, ip: IpAddr) -> Option<PeerCount> {
        if self.limits.exempt.contains(&ip) || is_this_host(ip) {
            return Some(PeerCount { ip: None });
        }
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let count = per_ip.entry(ip).or_default();
        if *count >= self.limits.max_per_ip {
            return None;
        }
        *count += 1;
        Some(PeerCount {
            ip: Some((ip, self.per_ip.clone())),
        })
    }
}

impl axum::serve::Listener for GuardedListener {
    type Io = Guarded;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            // Wait for a free slot before taking the next connection off the backlog.
            let Ok(slot) = self.slots.clone().acquire_owned().await else {
                // Never closed; were it, accept as the plain listener would.
                let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
                return (
                    Guarded::new(stream, None, PeerCount { ip: None }, None),
                    addr,
                );
            };
            let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
            let Some(peer) = self.admit(addr.ip()) else {
                tracing::debug!(peer = %addr, most = self.limits.max_per_ip, "connection refused: its address has its most open");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let deadline = Box::pin(tokio::time::sleep(self.limits.header_timeout));
            return (Guarded::new(stream, Some(slot), peer, Some(deadline)), addr);
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// `127.0.0.1` or `::1` (an IPv4 address mapped to IPv6 read as itself).
fn is_this_host(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4 == Ipv4Addr::LOCALHOST,
        IpAddr::V6(v6) => {
            v6 == Ipv6Addr::LOCALHOST || v6.to_ipv4_mapped() == Some(Ipv4Addr::LOCALHOST)
        }
    }
}

/// Takes one connection off its address's count when dropped.
struct PeerCount {
    ip: Option<(IpAddr, Counts)>,
}

impl Drop for PeerCount {
    fn drop(&mut self) {
        if let Some((ip, per_ip)) = self.ip.take() {
            let mut per_ip = per_ip.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(count) = per_ip.get_mut(&ip) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    per_ip.remove(&ip);
                }
            }
        }
    }
}

/// A connection held to the limits: its slot and its address's count go when it does, and
/// reading fails once its first request's headers are overdue.
pub struct Guarded {
    stream: TcpStream,
    _slot: Option<OwnedSemaphorePermit>,
    _peer: PeerCount,
    /// Until the first request's headers are in: when they are due.
    headers_due: Option<Pin<Box<Sleep>>>,
    /// The last bytes read while waiting for the end of the headers (`\r\n\r\n`), which may
    /// arrive split across reads.
    tail: [u8; 3],
}

impl Guarded {
    fn new(
        stream: TcpStream,
        slot: Option<OwnedSemaphorePermit>,
        peer: PeerCount,
        headers_due: Option<Pin<Box<Sleep>>>,
    ) -> Self {
        Self {
            stream,
            _slot: slot,
            _peer: peer,
            headers_due,
            tail: [0; 3],
        }
    }

    /// Note `read` bytes; whether they end the first request's headers.
    fn headers_end(&mut self, read: &[u8]) -> bool {
        let mut window = Vec::with_capacity(3 + read.len());
        window.extend_from_slice(&self.tail);
        window.extend_from_slice(read);
        if window.windows(4).any(|w| w == b"\r\n\r\n") {
            return true;
        }
        let keep = window.len() - 3;
        self.tail.copy_from_slice(&window[keep..]);
        false
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let Some(due) = this.headers_due.as_mut() else {
            return Pin::new(&mut this.stream).poll_read(cx, buf);
        };
        // Checked before reading: a client that drips its headers a byte at a time always has
        // something to read.
        if due.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the request's headers did not arrive in time",
            )));
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = read {
            let fresh = buf.filled()[before..].to_vec();
            if this.headers_end(&fresh) {
                this.headers_due = None;
            }
        }
        read
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_end_of_the_headers_is_found_however_it_is_split() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::spawn(TcpStream::connect(addr));
        let (stream, _) = listener.accept().await.expect("accept");
        let _client = client.await.expect("joined").expect("connects");
        let mut guarded = Guarded::new(stream, None, PeerCount { ip: None }, None);
        assert!(!guarded.headers_end(b"GET / HTTP/1.1\r\nHost: x\r"));
        assert!(!guarded.headers_end(b"\n"));
        assert!(!guarded.headers_end(b"\r"));
        assert!(guarded.headers_end(b"\nbody"));
        let mut fresh = Guarded::new(guarded.stream, None, PeerCount { ip: None }, None);
        assert!(fresh.headers_end(b"GET / HTTP/1.1\r\n\r\n"));
    }
}
