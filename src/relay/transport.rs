//! A websocket transport for the nostr-sdk relay pool that sets TCP_NODELAY.
//!
//! The sdk's default transport leaves Nagle on, which with delayed ACKs adds ~43 ms to every
//! small message on loopback (23 jobs/s instead of ~1700). This one connects the TCP stream
//! itself, sets nodelay, then does the websocket (and TLS, for wss) handshake on it.
//!
//! With a [`RelayGuard`] (the daemon's relay pool), a relay that is not one of ours is dialed
//! only at the addresses the guard admits, resolved here: the address checked is the address
//! connected to.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_wsocket::{ConnectionMode, Message};
use futures::{Sink, SinkExt, StreamExt, TryStreamExt};
use nostr_sdk::pool::transport::error::TransportError;
use nostr_sdk::pool::transport::websocket::{WebSocketSink, WebSocketStream, WebSocketTransport};
use nostr_sdk::util::BoxedFuture;
use nostr_sdk::Url;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::guard::RelayGuard;

/// Direct connections with TCP_NODELAY (proxies and Tor are not supported by this transport).
#[derive(Debug, Clone, Default)]
pub struct NoDelayTransport {
    guard: Option<Arc<RelayGuard>>,
}

impl NoDelayTransport {
    /// Dial relays that are not ours only where `guard` admits.
    pub fn guarded(guard: RelayGuard) -> Self {
        Self {
            guard: Some(Arc::new(guard)),
        }
    }

    /// The addresses to dial for `host:port`: all of them for our own relays (or without a
    /// guard), else the ones the guard admits.
    async fn addresses(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, TransportError> {
        let lookup_host = host.trim_start_matches('[').trim_end_matches(']');
        let guard = match &self.guard {
            Some(guard) if !guard.is_ours(host, port) => guard,
            _ => {
                return Ok(tokio::net::lookup_host((lookup_host, port))
                    .await
                    .map_err(TransportError::backend)?
                    .collect())
            }
        };
        guard
            .precheck(host)
            .map_err(|e| TransportError::backend(ConnectError(e.to_string())))?;
        let resolved: Vec<SocketAddr> = tokio::net::lookup_host((lookup_host, port))
            .await
            .map_err(TransportError::backend)?
            .collect();
        guard.admit(host, &resolved).map_err(|e| {
            tracing::info!(error = %e, "not connecting to a reply relay");
            TransportError::backend(ConnectError(e.to_string()))
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct ConnectError(String);

impl WebSocketTransport for NoDelayTransport {
    fn support_ping(&self) -> bool {
        true
    }

    fn connect<'a>(
        &'a self,
        url: &'a Url,
        _mode: &'a ConnectionMode,
        timeout: Duration,
    ) -> BoxedFuture<'a, Result<(WebSocketSink, WebSocketStream), TransportError>> {
        Box::pin(async move {
            let host = url
                .host_str()
                .ok_or_else(|| {
                    TransportError::backend(ConnectError("relay URL has no host".into()))
                })?
                .to_owned();
            let port = url.port_or_known_default().ok_or_else(|| {
                TransportError::backend(ConnectError("relay URL has no port".into()))
            })?;
            let connect = async {
                let addresses = self.addresses(&host, port).await?;
                let tcp = TcpStream::connect(addresses.as_slice())
                    .await
                    .map_err(TransportError::backend)?;
                tcp.set_nodelay(true).map_err(TransportError::backend)?;
                let (socket, _) = tokio_tungstenite::client_async_tls_with_config(
                    url.as_str(),
                    tcp,
                    Some(websocket_config()),
                    None,
                )
                .await
                .map_err(TransportError::backend)?;
                Ok::<_, TransportError>(socket)
            };
            let socket = tokio::time::timeout(timeout, connect)
                .await
                .map_err(|_| TransportError::backend(ConnectError("connect timed out".into())))??;
            let (tx, rx) = socket.split();
            let sink: WebSocketSink = Box::new(TransportSink(tx));
            let stream: WebSocketStream = Box::pin(
                rx.map_err(TransportError::backend)
                    .try_filter_map(|msg| async move { Ok(from_tungstenite(msg)) }),
            );
            Ok((sink, stream))
        })
    }
}

/// Websocket settings for nostr traffic. tungstenite zero-fills the free part of its read buffer
/// before every read (128 KiB by default): CPU on every small frame, and 128 KiB resident per
/// connection. Nostr messages are mostly a few KiB; a larger one grows the buffer as it needs.
pub(crate) fn websocket_config() -> WebSocketConfig {
    let mut config = WebSocketConfig::default();
    config.read_buffer_size = 8 * 1024;
    config
}

struct TransportSink<S>(S);

impl<S> Sink<Message> for TransportSink<S>
where
    S: Sink<WsMessage, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    type Error = TransportError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready_unpin(cx).map_err(TransportError::backend)
    }

    fn start_send(mut self: Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
        self.0
            .start_send_unpin(to_tungstenite(item))
            .map_err(TransportError::backend)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_flush_unpin(cx).map_err(TransportError::backend)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_close_unpin(cx).map_err(TransportError::backend)
    }
}

fn to_tungstenite(msg: Message) -> WsMessage {
    match msg {
        Message::Text(text) => WsMessage::Text(text.into()),
        Message::Binary(data) => WsMessage::Binary(data.into()),
        Message::Ping(data) => WsMessage::Ping(data.into()),
        Message::Pong(data) => WsMessage::Pong(data.into()),
        Message::Close(frame) => WsMessage::Close(frame.map(|f| CloseFrame {
            code: CloseCode::from(f.code),
            reason: f.reason.into(),
        })),
    }
}

fn from_tungstenite(msg: WsMessage) -> Option<Message> {
    Some(match msg {
        WsMessage::Text(text) => Message::Text(text.to_string()),
        WsMessage::Binary(data) => Message::Binary(data.to_vec()),
        WsMessage::Ping(data) => Message::Ping(data.to_vec()),
        WsMessage::Pong(data) => Message::Pong(data.to_vec()),
        WsMessage::Close(frame) => {
            Message::Close(frame.map(|f| async_wsocket::message::CloseFrame {
                code: f.code.into(),
                reason: f.reason.to_string(),
            }))
        }
        // Raw frames are never yielded while reading.
        WsMessage::Frame(_) => return None,
    })
}
