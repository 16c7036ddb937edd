//! The in-process relay for `dvmd run --dev` and the tests: nostr-relay-builder's `LocalRelay`
//! behind our own accept loop.
//!
//! We accept TCP ourselves for two reasons: to set TCP_NODELAY (the builder's listener does not,
//! which costs ~43 ms per hop on loopback), and to own the listener's lifecycle so the daemon's
//! cancellation token stops it.

use std::net::SocketAddr;

use nostr_relay_builder::builder::RateLimit;
use nostr_relay_builder::{LocalRelay, RelayBuilder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::RelayError;

/// Largest websocket upgrade request we read; browsers send well under 2 KiB.
const MAX_HANDSHAKE_BYTES: usize = 16 * 1024;

/// A running embedded relay.
pub struct EmbeddedRelay {
    relay: LocalRelay,
    listener: TcpListener,
    local_addr: SocketAddr,
}

impl EmbeddedRelay {
    /// Bind the relay on `listen` (port 0 picks a free port).
    pub async fn bind(listen: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let local_addr = listener.local_addr()?;
        let builder = RelayBuilder::default().rate_limit(RateLimit {
            // The default (60 notes per minute per connection) throttles a DVM to one job a second.
            max_reqs: 10_000,
            notes_per_minute: 1_000_000,
        });
        Ok(Self {
            relay: LocalRelay::new(builder),
            listener,
            local_addr,
        })
    }

    /// The relay's websocket URL.
    pub fn url(&self) -> String {
        format!("ws://{}", self.local_addr)
    }

    /// Accept connections until `cancel` fires; then close every connection.
    pub async fn run(self, cancel: CancellationToken) {
        let connections = TaskTracker::new();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let relay = self.relay.clone();
                        connections.spawn(async move {
                            if let Err(e) = serve(relay, stream, peer).await {
                                tracing::debug!(%peer, error = %e, "embedded relay connection ended");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "embedded relay: accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
            }
        }
        self.relay.shutdown();
        connections.close();
        connections.wait().await;
        tracing::debug!("embedded relay stopped");
    }
}

async fn serve(
    relay: LocalRelay,
    mut stream: TcpStream,
    peer: SocketAddr,
) -> Result<(), RelayError> {
    stream.set_nodelay(true)?;
    upgrade(&mut stream).await?;
    relay
        .take_connection(stream, peer)
        .await
        .map_err(|e| RelayError::Pool(e.to_string()))
}

/// Answer the HTTP websocket upgrade by hand; the builder wants an already-upgraded stream.
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
