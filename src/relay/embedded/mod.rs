//! The in-process relay for `dvmd run --dev` and the tests: a small NIP-01 relay of our own,
//! on nostr's types, with its own compact in-memory store (`store`).
//!
//! Why our own rather than nostr-relay-builder's `LocalRelay`: that relay feeds every
//! connection from one `broadcast` channel of 1024 events and silently skips what a slow reader
//! lagged behind, so neither side learns that events were lost; and every event wakes every
//! connection to run its filters. Here (`subscriptions`) an event is matched only against
//! the subscriptions it can concern (indexed by `#p`), each connection has a bounded queue, and
//! a reader that falls behind is closed and counted, so its client reconnects and resubscribes
//! with `since`. Memory is bounded by [`RelayOptions::max_events`].
//!
//! We also accept TCP ourselves, to set TCP_NODELAY (~43 ms per hop on loopback without it) and
//! to own the listener's lifecycle, so the daemon's cancellation token stops it.

mod connection;
mod store;
mod subscriptions;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nostr_sdk::SubscriptionId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::RelayError;
use store::Store;
use subscriptions::Subscriptions;

/// Largest websocket upgrade request we read; browsers send well under 2 KiB.
const MAX_HANDSHAKE_BYTES: usize = 16 * 1024;
/// Largest websocket message accepted (a request event is at most 64 KiB by default; a result
/// embeds its request).
const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// Limits of the embedded relay.
#[derive(Debug, Clone, Copy)]
pub struct RelayOptions {
    /// Events kept in memory; the oldest go first.
    pub max_events: usize,
    /// Live events queued for one connection before it counts as fallen behind.
    pub live_queue: usize,
    /// Subscriptions one connection may hold.
    pub max_subscriptions: usize,
    /// Stored events sent for a filter without `limit`.
    pub default_limit: usize,
    /// Most stored events sent for one filter.
    pub max_limit: usize,
    /// Connections at once.
    pub max_connections: usize,
    /// Largest `EVENT` message accepted, bytes of JSON (strfry's default); larger ones get
    /// `OK false`.
    pub max_event_bytes: usize,
}

impl Default for RelayOptions {
    fn default() -> Self {
        Self {
            max_events: 10_000,
            live_queue: 4096,
            max_subscriptions: 64,
            default_limit: 500,
            max_limit: 5000,
            max_connections: 4096,
            max_event_bytes: 64 * 1024,
        }
    }
}

/// What every connection shares.
struct Shared {
    store: Store,
    subscriptions: Subscriptions,
    options: RelayOptions,
    /// Events stored since start.
    events: AtomicU64,
    /// Orders a `REQ` against the events being stored: storing an event and handing it to the
    /// live subscriptions happen under a read guard, and a `REQ` registers its subscription
    /// and reads its stored events under the write guard. So each event reaches a new
    /// subscription once, as stored or as live, never both and never neither.
    order: std::sync::RwLock<()>,
}

/// Figures of a running embedded relay, for `/metrics`.
#[derive(Clone)]
pub struct RelayStats(Arc<Shared>);

impl RelayStats {
    /// Connections closed because the reader fell behind.
    pub fn lagging_closed(&self) -> u64 {
        self.0.subscriptions.lagging_closed.load(Ordering::Relaxed)
    }

    /// Append the figures in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(
            out,
            "# HELP dvmd_embedded_relay_lagging_closed_total Connections the embedded relay closed because their reader fell behind.\n# TYPE dvmd_embedded_relay_lagging_closed_total counter\ndvmd_embedded_relay_lagging_closed_total {}",
            self.lagging_closed()
        );
        let _ = writeln!(
            out,
            "# HELP dvmd_embedded_relay_connections Open connections to the embedded relay.\n# TYPE dvmd_embedded_relay_connections gauge\ndvmd_embedded_relay_connections {}",
            self.0.subscriptions.connections()
        );
        let _ = writeln!(
            out,
            "# HELP dvmd_embedded_relay_events_total Events the embedded relay stored.\n# TYPE dvmd_embedded_relay_events_total counter\ndvmd_embedded_relay_events_total {}",
            self.0.events.load(Ordering::Relaxed)
        );
    }
}

/// A bound embedded relay; [`EmbeddedRelay::run`] serves it.
pub struct EmbeddedRelay {
    shared: Arc<Shared>,
    listener: TcpListener,
    local_addr: SocketAddr,
}

impl EmbeddedRelay {
    /// Bind the relay on `listen` (port 0 picks a free port) with default limits.
    pub async fn bind(listen: SocketAddr) -> std::io::Result<Self> {
        Self::bind_with(listen, RelayOptions::default()).await
    }

    /// Bind the relay on `listen` with `options`.
    pub async fn bind_with(listen: SocketAddr, options: RelayOptions) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            store: Store::new(options.max_events),
            subscriptions: Subscriptions::default(),
            options,
            events: AtomicU64::new(0),
            order: std::sync::RwLock::new(()),
        });
        Ok(Self {
            shared,
            listener,
            local_addr,
        })
    }

    /// The relay's websocket URL.
    pub fn url(&self) -> String {
        format!("ws://{}", self.local_addr)
    }

    /// Its figures (shared with the running relay).
    pub fn stats(&self) -> RelayStats {
        RelayStats(self.shared.clone())
    }

    /// Accept connections until `cancel` fires; then close every connection.
    pub async fn run(self, cancel: CancellationToken) {
        let connections = TaskTracker::new();
        let room = Arc::new(tokio::sync::Semaphore::new(
            self.shared.options.max_connections,
        ));
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let Ok(permit) = room.clone().try_acquire_owned() else {
                            tracing::warn!(%peer, "embedded relay: connection limit reached");
                            continue;
                        };
                        let shared = self.shared.clone();
                        let stop = cancel.clone();
                        connections.spawn(async move {
                            if let Err(e) = serve(shared, stream, stop).await {
                                tracing::debug!(%peer, error = %e, "embedded relay connection ended");
                            }
                            drop(permit);
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "embedded relay: accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
            }
        }
        connections.close();
        connections.wait().await;
        tracing::debug!("embedded relay stopped");
    }
}

/// The `EVENT` message carrying the event serialised as `event_json` to subscription `sub`,
/// built from the JSON as it is (an event is serialised once, however many get it).
fn event_message(sub: &SubscriptionId, event_json: &str) -> String {
    let sub = serde_json::to_string(sub.as_str()).unwrap_or_else(|_| "\"\"".to_owned());
    let mut text = String::with_capacity(event_json.len() + sub.len() + 12);
    text.push_str("[\"EVENT\",");
    text.push_str(&sub);
    text.push(',');
    text.push_str(event_json);
    text.push(']');
    text
}

/// Bytes of frames gathered before a write while a batch is fed (a flush writes any rest).
const WRITE_BUFFER_BYTES: usize = 16 * 1024;

async fn serve(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    stop: CancellationToken,
) -> Result<(), RelayError> {
    stream.set_nodelay(true)?;
    upgrade(&mut stream).await?;
    // A small read buffer (see `transport::websocket_config`); a larger frame grows it.
    let mut config = super::transport::websocket_config();
    config.max_message_size = Some(MAX_MESSAGE_BYTES);
    config.max_frame_size = Some(MAX_MESSAGE_BYTES);
    // The writer feeds what is queued and flushes once (`connection::serve`): frames gather
    // up to this many bytes before a write, and a flush writes the rest.
    config.write_buffer_size = WRITE_BUFFER_BYTES;
    let socket = WebSocketStream::from_raw_socket(stream, Role::Server, Some(config)).await;
    connection::serve(shared, socket, stop).await;
    Ok(())
}

/// Answer the HTTP websocket upgrade by hand (we read the request ourselves to keep it small).
async fn upgrade(stream: &mut TcpStream) -> Result<(), RelayError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    // A websocket client sends nothing after the request until it sees our 101, so the request
    // ends exactly at the blank line and no frame bytes can be swallowed here.
    let header_end = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(RelayError::Handshake("connection closed".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        if buf.len() > MAX_HANDSHAKE_BYTES {
            return Err(RelayError::Handshake("request too large".into()));
        }
    };
    if header_end != buf.len() {
        return Err(RelayError::Handshake(
            "data after the upgrade request".into(),
        ));
    }
    let request = std::str::from_utf8(&buf[..header_end])
        .map_err(|_| RelayError::Handshake("request is not UTF-8".into()))?;
    let key = request.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("sec-websocket-key")
            .then(|| value.trim().to_owned())
    });
    let Some(key) = key else {
        let body = "this is a nostr relay: connect with a websocket\n";
        let response = format!(
            "HTTP/1.1 426 Upgrade Required\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(response.as_bytes()).await?;
        return Err(RelayError::Handshake("not a websocket upgrade".into()));
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    stream.write_all(response.as_bytes()).await?;
    Ok(())
}
