//! Relays: the pool dvmd reads requests from and publishes to, the outbox that retries until a
//! relay acknowledges, and the embedded relay for dev mode and tests.

pub mod embedded;
pub mod guard;
pub mod intake;
pub mod outbox;
pub mod pool;
pub mod transport;

pub use embedded::{EmbeddedRelay, RelayOptions as EmbeddedRelayOptions};
pub use guard::ReplyRelayPolicy;
pub use outbox::Outbox;
pub use pool::{RelayRole, Relays, MAX_REPLY_RELAYS_IN_POOL, REPLY_RELAY_IDLE};

/// Errors of the relay layer.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Socket IO failed.
    #[error("relay io: {0}")]
    Io(#[from] std::io::Error),
    /// A websocket handshake was refused.
    #[error("relay handshake: {0}")]
    Handshake(String),
    /// The nostr-sdk pool failed.
    #[error("relay pool: {0}")]
    Pool(String),
    /// No relay acknowledged an event.
    #[error("no relay accepted event {event}: {reasons}")]
    NotAccepted {
        /// The event id.
        event: String,
        /// What the relays said.
        reasons: String,
        /// The relays that answered `OK false`, with their message (the others could not be
        /// reached or did not answer in time).
        refused: Vec<(nostr_sdk::RelayUrl, String)>,
    },
}
