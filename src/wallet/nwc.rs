//! Nostr Wallet Connect (NIP-47): any wallet service reachable over relays, by its
//! `nostr+walletconnect://` URI.
//!
//! Built on nostr's NIP-47 types over dvmd's own relay client rather than the `nwc` crate: that
//! crate builds its own relay pool, which cannot take our TCP_NODELAY transport (about 40 ms
//! per request on loopback), and it gives no say over event verification. Every response and
//! notification is checked here: the author must be the wallet service, id and signature must
//! verify (`Response::from_event`). `payment_received` notifications are hints, confirmed by
//! `lookup_invoice` like any other.

use std::time::Duration;

use bitcoin::hashes::{sha256, Hash};
use nostr_sdk::nips::nip47::{
    ErrorCode, LookupInvoiceRequest, LookupInvoiceResponse, MakeInvoiceRequest,
    NostrWalletConnectURI, Notification, NotificationResult, PayInvoiceRequest, Request, Response,
    TransactionState, TransactionType,
};
use nostr_sdk::{
    Alphabet, Client, Event, EventBuilder, Filter, JsonUtil, Keys, Kind, RelayPoolNotification,
    SingleLetterTag, Tag, Timestamp,
};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::secret::Secret;
use super::{
    bolt11, Invoice, InvoiceDescription, InvoiceRequest, OutgoingStatus, PaymentHash, PaymentSent,
    PaymentStatus, Wallet, WalletError,
};
use crate::relay::transport::NoDelayTransport;

const SETTLEMENT_HINTS: usize = 4096;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How to reach the wallet service.
#[derive(Debug, Clone)]
pub struct NwcConfig {
    /// The `nostr+walletconnect://` URI (holds the client secret).
    pub uri: Secret,
    /// How long one request may wait for its response.
    pub timeout: Duration,
}

/// The NWC backend.
pub struct NwcWallet {
    uri: NostrWalletConnectURI,
    client: Client,
    timeout: Duration,
    hints: broadcast::Sender<PaymentHash>,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> WalletError {
    WalletError::Unavailable(format!("nwc {what}: {e}"))
}

impl NwcWallet {
    /// The wallet service's record of `payment_hash` (`lookup_invoice`), incoming or
    /// outgoing; `None` when it has none.
    async fn transaction(
        &self,
        payment_hash: &PaymentHash,
    ) -> Result<Option<LookupInvoiceResponse>, WalletError> {
        let request = Request::lookup_invoice(LookupInvoiceRequest {
            payment_hash: Some(payment_hash.to_hex()),
            invoice: None,
        });
        let response = match self.call(request).await {
            Ok(response) => response,
            Err(WalletError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let found = response
            .to_lookup_invoice()
            .map_err(|e| unavailable("lookup_invoice", e))?;
        if PaymentHash::from_hex(&found.payment_hash)? != *payment_hash {
            return Err(unavailable(
                "lookup_invoice",
                "answer for another payment hash",
            ));
        }
        Ok(Some(found))
    }

    /// Connect to the URI's relays and subscribe to the service's responses and notifications.
    pub async fn connect(config: NwcConfig) -> Result<Self, WalletError> {
        let uri = NostrWalletConnectURI::parse(config.uri.expose())
            .map_err(|e| WalletError::Refused(format!("not a nostr+walletconnect URI: {e}")))?;
        let keys = Keys::new(uri.secret.clone());
        crate::signatures::install();
        let client = Client::builder()
            .signer(keys.clone())
            .websocket_transport(NoDelayTransport::default())
            .build();
        for relay in &uri.relays {
            client
                .add_relay(relay.as_str())
                .await
                .map_err(|e| unavailable("relay", e))?;
        }
        client.connect().await;
        let _ = client.try_connect(CONNECT_TIMEOUT).await;
        let filter = Filter::new()
            .kinds([Kind::WalletConnectResponse, Kind::WalletConnectNotification])
            .author(uri.public_key)
            .custom_tag(
                SingleLetterTag::lowercase(Alphabet::P),
                keys.public_key().to_hex(),
            )
            .since(Timestamp::now());
        client
            .subscribe(filter, None)
            .await
            .map_err(|e| unavailable("subscribe", e))?;
        let (hints, _) = broadcast::channel(SETTLEMENT_HINTS);
        Ok(Self {
            uri,
            client,
            timeout: config.timeout,
            hints,
        })
    }

    /// `pay_invoice`, with `amount` (msat) for an invoice that names none.
    async fn pay_invoice(
        &self,
        bolt11: &str,
        amount: Option<u64>,
        max_fee_msat: u64,
    ) -> Result<PaymentSent, WalletError> {
        let info = bolt11::decode(bolt11)?;
        let response = self
            .call(Request::pay_invoice(PayInvoiceRequest {
                amount,
                ..PayInvoiceRequest::new(bolt11.trim())
            }))
            .await?
            .to_pay_invoice()
            .map_err(|e| unavailable("pay_invoice", e))?;
        let mut preimage = [0u8; 32];
        hex::decode_to_slice(&response.preimage, &mut preimage)
            .map_err(|_| unavailable("pay_invoice", "the preimage is not 32 bytes of hex"))?;
        if sha256::Hash::hash(&preimage).to_byte_array() != info.payment_hash.0 {
            return Err(unavailable(
                "pay_invoice",
                "the preimage does not match the payment hash",
            ));
        }
        let fee_msat = response.fees_paid.unwrap_or(0);
        if fee_msat > max_fee_msat {
            tracing::warn!(
                fee_msat,
                max_fee_msat,
                "nwc: the wallet paid more fee than allowed"
            );
        }
        Ok(PaymentSent { preimage, fee_msat })
    }

    /// Send `request` and wait for the service's response to it. The request expires (NIP-40)
    /// when we stop waiting: a service that reads it later (back from an outage, working
    /// through a backlog) must not pay an invoice whose payout we may have settled since.
    async fn call(&self, request: Request) -> Result<Response, WalletError> {
        let method = request.method;
        let encrypted = nostr_sdk::nips::nip04::encrypt(
            &self.uri.secret,
            &self.uri.public_key,
            request.as_json(),
        )
        .map_err(|e| unavailable("request", e))?;
        let expires = Timestamp::now() + self.timeout;
        let event = EventBuilder::new(Kind::WalletConnectRequest, encrypted)
            .tags([
                Tag::public_key(self.uri.public_key),
                Tag::expiration(expires),
            ])
            .sign_with_keys(&Keys::new(self.uri.secret.clone()))
            .map_err(|e| unavailable("request", e))?;
        // Listen before sending, so a fast answer is not missed.
        let mut notifications = self.client.notifications();
        let sent = self
            .client
            .send_event(&event)
            .await
            .map_err(|e| unavailable("send", e))?;
        if sent.success.is_empty() {
            return Err(unavailable("send", "no relay accepted the request"));
        }
        let wait = async {
            loop {
                match notifications.recv().await {
                    Ok(RelayPoolNotification::Event { event: answer, .. }) => {
                        if answer.kind == Kind::WalletConnectResponse && answers(&answer, &event) {
                            // Author, kind, id and signature are checked before decrypting. One
                            // that fails is not the service's answer: anyone who saw our
                            // request could send it, and it must not end the wait.
                            match Response::from_event(&self.uri, &answer) {
                                Ok(response) => return Ok(response),
                                Err(e) => {
                                    tracing::warn!(event = %answer.id, author = %answer.pubkey, error = %e, "nwc: ignoring a response that is not the wallet service's");
                                }
                            }
                        }
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(unavailable("relay", "client closed"))
                    }
                }
            }
        };
        let response = tokio::time::timeout(self.timeout, wait)
            .await
            .map_err(|_| {
                unavailable(
                    method.as_str(),
                    format!("no answer in {} s", self.timeout.as_secs()),
                )
            })??;
        if let Some(error) = &response.error {
            return Err(match error.code {
                ErrorCode::InsufficientBalance => WalletError::InsufficientBalance {
                    balance_msat: 0,
                    needed_msat: 0,
                },
                ErrorCode::NotFound => WalletError::NotFound(format!("nwc: {}", error.message)),
                ErrorCode::RateLimited | ErrorCode::Internal => unavailable(method.as_str(), error),
                // Refused before anything was tried: nothing was or will be sent.
                ErrorCode::NotImplemented
                | ErrorCode::QuotaExceeded
                | ErrorCode::Restricted
                | ErrorCode::Unauthorized => {
                    WalletError::Declined(format!("nwc {}: {error}", method.as_str()))
                }
                _ => WalletError::Refused(format!("nwc {}: {error}", method.as_str())),
            });
        }
        Ok(response)
    }
}

fn answers(response: &Event, request: &Event) -> bool {
    let id = request.id.to_hex();
    response
        .tags
        .iter()
        .any(|t| matches!(t.as_slice(), [name, value, ..] if name == "e" && *value == id))
}

#[async_trait::async_trait]
impl Wallet for NwcWallet {
    fn name(&self) -> &'static str {
        "nwc"
    }

    async fn create_invoice(&self, request: InvoiceRequest) -> Result<Invoice, WalletError> {
        if request.amount_msat == 0 {
            return Err(WalletError::Refused("amount must be positive".to_owned()));
        }
        let (description, description_hash) = match &request.description {
            InvoiceDescription::Memo(memo) => (Some(memo.clone()), None),
            InvoiceDescription::Hashed(text) => (
                None,
                Some(hex::encode(
                    sha256::Hash::hash(text.as_bytes()).to_byte_array(),
                )),
            ),
        };
        let response = self
            .call(Request::make_invoice(MakeInvoiceRequest {
                amount: request.amount_msat,
                description,
                description_hash: description_hash.clone(),
                expiry: Some(request.expiry_secs),
            }))
            .await?
            .to_make_invoice()
            .map_err(|e| unavailable("make_invoice", e))?;
        // Trust the invoice itself over the fields around it.
        let info = bolt11::decode(&response.invoice)?;
        if let Some(hash) = &description_hash {
            // A zap's (or an LNURL payment's) invoice must commit to what it answers (NIP-57,
            // LUD-06): a service that ignored the hash issued one every client refuses, or
            // whose receipt no client can check.
            if info.description_hash.map(hex::encode).as_deref() != Some(hash.as_str()) {
                return Err(WalletError::Unavailable(
                    "nwc: the wallet issued an invoice without the description hash asked"
                        .to_owned(),
                ));
            }
        }
        let amount_msat = info.amount_msat.unwrap_or(0);
        if amount_msat < request.amount_msat {
            return Err(WalletError::Unavailable(format!(
                "nwc: the wallet issued {amount_msat} msat for {} msat",
                request.amount_msat
            )));
        }
        Ok(Invoice {
            bolt11: response.invoice,
            payment_hash: info.payment_hash,
            amount_msat,
            expires_at: info.expires_at,
        })
    }

    async fn lookup(&self, payment_hash: &PaymentHash) -> Result<PaymentStatus, WalletError> {
        let Some(found) = self.transaction(payment_hash).await? else {
            return Ok(PaymentStatus::Unknown);
        };
        let settled = found.state == Some(TransactionState::Settled)
            || (found.state.is_none() && found.settled_at.is_some());
        Ok(if settled {
            PaymentStatus::Paid {
                amount_msat: found.amount,
            }
        } else {
            match found.state {
                Some(TransactionState::Expired | TransactionState::Failed) => {
                    PaymentStatus::Expired
                }
                _ if found.expires_at.is_some_and(|t| t <= Timestamp::now()) => {
                    PaymentStatus::Expired
                }
                _ => PaymentStatus::Pending,
            }
        })
    }

    async fn lookup_payment(
        &self,
        payment_hash: &PaymentHash,
    ) -> Result<OutgoingStatus, WalletError> {
        let Some(found) = self.transaction(payment_hash).await? else {
            return Ok(OutgoingStatus::Unknown);
        };
        // Some services leave `type` out. The hash is a payout's, which is never one of our
        // own invoices (the payer refuses those), so only an answer that says it is incoming
        // is not about it. Read as unknown, a payout that succeeded would wait for the
        // operator as stuck rather than settle as paid.
        if found.transaction_type == Some(TransactionType::Incoming) {
            return Ok(OutgoingStatus::Unknown);
        }
        let settled = found.state == Some(TransactionState::Settled)
            || (found.state.is_none() && found.settled_at.is_some());
        Ok(if settled {
            OutgoingStatus::Succeeded {
                fee_msat: found.fees_paid,
            }
        } else {
            match found.state {
                Some(TransactionState::Failed | TransactionState::Expired) => {
                    OutgoingStatus::Failed
                }
                _ => OutgoingStatus::Pending,
            }
        })
    }

    async fn pay(&self, bolt11: &str, max_fee_msat: u64) -> Result<PaymentSent, WalletError> {
        self.pay_invoice(bolt11, None, max_fee_msat).await
    }

    /// NIP-47 `pay_invoice` takes an `amount` (msat) for an invoice that names none.
    fn pays_amountless(&self) -> bool {
        true
    }

    async fn pay_amountless(
        &self,
        bolt11: &str,
        amount_msat: u64,
        max_fee_msat: u64,
    ) -> Result<PaymentSent, WalletError> {
        self.pay_invoice(bolt11, Some(amount_msat), max_fee_msat)
            .await
    }

    async fn balance(&self) -> Result<u64, WalletError> {
        Ok(self
            .call(Request::get_balance())
            .await?
            .to_get_balance()
            .map_err(|e| unavailable("get_balance", e))?
            .balance)
    }

    fn settlements(&self) -> broadcast::Receiver<PaymentHash> {
        self.hints.subscribe()
    }

    async fn follow(&self, cancel: CancellationToken) {
        let mut notifications = self.client.notifications();
        loop {
            let received = tokio::select! {
                _ = cancel.cancelled() => return,
                n = notifications.recv() => n,
            };
            match received {
                Ok(RelayPoolNotification::Event { event, .. })
                    if event.kind == Kind::WalletConnectNotification =>
                {
                    match Notification::from_event(&self.uri, &event) {
                        Ok(Notification {
                            notification: NotificationResult::PaymentReceived(payment),
                            ..
                        }) => {
                            if let Ok(hash) = PaymentHash::from_hex(&payment.payment_hash) {
                                let _ = self.hints.send(hash);
                            }
                        }
                        Ok(_) => {}
                        Err(e) => tracing::debug!(error = %e, "nwc: notification ignored"),
                    }
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}
