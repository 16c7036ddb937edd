//! The HTTP listener: its own accept loop over hyper, and its limits on connections: how many
//! at once, how many from one address, and how long a client may take to send a request's
//! headers.
//!
//! `axum::serve` gives hyper no timer, and hyper's header-read timeout needs one: there, a
//! connection that sent nothing, dripped its headers a byte at a time, or sat idle between
//! requests stayed open for good, and a few thousand of them used up the process's file
//! descriptors (no customer could connect, and the wallet, relay and LNURL calls that confirm
//! payments could not open sockets either). Here:
//!
//! - At most `[http] max_connections` at once: beyond it, new connections wait in the kernel's
//!   backlog until one closes.
//! - At most `[http] max_connections_per_ip` from one address (IPv6: one /64), more are closed
//!   as they arrive. The reverse proxies named in `trusted_proxies` are excepted (every client
//!   of theirs comes from their address), and so is this host (`127.0.0.1`, `::1`): its own
//!   proxy, tools and `dvmd bench`, whose hundreds of customers pay from one address.
//! - Every request's headers are due within `[http] header_timeout_secs` of the connection
//!   starting to wait for them: the first request's from the connection's start, each next
//!   one's from the end of the answer before (hyper's `header_read_timeout`). A connection that
//!   sends nothing, drips, or idles between requests is closed then.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::limits::{address_key, is_this_host};

/// The limits, from `[http]`.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Connections at once.
    pub max_connections: usize,
    /// Connections at once from one address.
    pub max_per_ip: usize,
    /// How long a request's headers may take to arrive.
    pub header_timeout: Duration,
    /// Addresses the per-address limit does not apply to (trusted reverse proxies).
    pub exempt: Vec<IpAddr>,
}

/// Serve `router` on `listener`, held to `limits`, until `cancel` fires; then let every
/// connection finish the request it is answering, and return.
pub async fn serve(
    listener: TcpListener,
    limits: ConnectionLimits,
    router: Router,
    cancel: CancellationToken,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let mut listener = GuardedListener::new(listener, limits);
    let connections = TaskTracker::new();
    loop {
        let (connection, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let router = router.clone();
        // What `ConnectInfo<SocketAddr>` extracts, on each request.
        let service = hyper::service::service_fn(move |mut request| {
            request.extensions_mut().insert(ConnectInfo(peer));
            let router = TowerToHyperService::new(router.clone());
            async move {
                let answered: Result<_, Infallible> =
                    hyper::service::Service::call(&router, request).await;
                answered
            }
        });
        let served = http.serve_connection(TokioIo::new(connection.stream), service);
        let cancel = cancel.clone();
        connections.spawn(async move {
            let _slot = (connection.slot, connection.peer);
            tokio::pin!(served);
            let ended = tokio::select! {
                ended = served.as_mut() => ended,
                _ = cancel.cancelled() => {
                    served.as_mut().graceful_shutdown();
                    served.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(%peer, error = %e, "http connection ended");
            }
        });
    }
    connections.close();
    connections.wait().await;
}

/// A [`TcpListener`] that holds its connections to [`ConnectionLimits`].
struct GuardedListener {
    inner: TcpListener,
    limits: ConnectionLimits,
    slots: Arc<Semaphore>,
    per_ip: Counts,
}

/// Open connections by address.
type Counts = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// An accepted connection, with its slot and its place in its address's count (both given
/// back when it is dropped).
struct Accepted {
    stream: TcpStream,
    slot: OwnedSemaphorePermit,
    peer: PeerCount,
}

impl GuardedListener {
    fn new(inner: TcpListener, limits: ConnectionLimits) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(limits.max_connections.max(1))),
            inner,
            limits,
            per_ip: Arc::default(),
        }
    }

    /// The next connection within the limits: waits for a free slot before taking one off
    /// the backlog, and closes those whose address has its most open.
    async fn accept(&mut self) -> (Accepted, SocketAddr) {
        loop {
            let slot = match self.slots.clone().acquire_owned().await {
                Ok(slot) => slot,
                // Never closed.
                Err(_) => continue,
            };
            // axum's accept: retries, and waits a second on an error such as EMFILE.
            let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
            let Some(peer) = self.admit(addr.ip()) else {
                tracing::debug!(peer = %addr, most = self.limits.max_per_ip, "connection refused: its address has its most open");
                continue;
            };
            let _ = stream.set_nodelay(true);
            return (Accepted { stream, slot, peer }, addr);
        }
    }

    /// Count a connection from `ip`, unless its address already has its most.
    fn admit(&self, ip: IpAddr) -> Option<PeerCount> {
        let key = address_key(ip);
        if is_this_host(ip) || self.limits.exempt.iter().any(|e| address_key(*e) == key) {
            return Some(PeerCount { ip: None });
        }
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let count = per_ip.entry(key).or_default();
        if *count >= self.limits.max_per_ip {
            return None;
        }
        *count += 1;
        Some(PeerCount {
            ip: Some((key, self.per_ip.clone())),
        })
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

impl GuardedListener {
    #[cfg(test)]
    fn open_from(&self, ip: IpAddr) -> usize {
        let per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        per_ip.get(&address_key(ip)).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_address_holds_its_most_and_gives_each_back_when_it_closes() {
        let inner = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let listener = GuardedListener::new(
            inner,
            ConnectionLimits {
                max_connections: 8,
                max_per_ip: 2,
                header_timeout: Duration::from_secs(1),
                exempt: vec!["203.0.113.9".parse().expect("ip")],
            },
        );
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let first = listener.admit(ip("203.0.113.7")).expect("first");
        let second = listener.admit(ip("::ffff:203.0.113.7")).expect("second");
        assert!(listener.admit(ip("203.0.113.7")).is_none(), "its most");
        assert!(
            listener.admit(ip("203.0.113.8")).is_some(),
            "another address"
        );
        drop(first);
        assert_eq!(listener.open_from(ip("203.0.113.7")), 1);
        assert!(
            listener.admit(ip("203.0.113.7")).is_some(),
            "one given back"
        );
        drop(second);
        // IPv6 by its /64.
        let a = listener.admit(ip("2001:db8::1")).expect("a");
        let _b = listener.admit(ip("2001:db8::2")).expect("b");
        assert!(listener.admit(ip("2001:db8::3")).is_none());
        assert!(listener.admit(ip("2001:db8:0:1::1")).is_some());
        drop(a);
        // A trusted proxy and this host count against nothing.
        for _ in 0..5 {
            assert!(listener.admit(ip("203.0.113.9")).is_some());
            assert!(listener.admit(ip("127.0.0.1")).is_some());
            assert!(listener.admit(ip("::1")).is_some());
        }
    }
}
