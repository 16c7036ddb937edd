//! The LNbits wallet (API v1): the invoice key creates and looks up invoices, the admin key
//! pays. Settlement hints come from the invoice webhook (posted to dvmd's HTTP listener) and the
//! LNbits websocket; both are unauthenticated, so each hint is only a reason to ask
//! `GET /api/v1/payments/{hash}`, the one answer money moves on.
//!
//! Known quirks handled here: LNbits works in whole sats (invoices are rounded up), webhooks for
//! internal payments arrive twice with a JSON-encoded JSON body, and FakeWallet invoices have no
//! feature field (read with `bolt11::decode`, not `Bolt11Invoice`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::secret::Secret;
use super::{
    bolt11, Invoice, InvoiceDescription, InvoiceRequest, OutgoingStatus, PaymentHash, PaymentSent,
    PaymentStatus, Wallet, WalletError,
};

const SETTLEMENT_HINTS: usize = 4096;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const WEBSOCKET_RETRY_MAX: Duration = Duration::from_secs(30);

/// How to reach an LNbits wallet.
#[derive(Debug, Clone)]
pub struct LnbitsConfig {
    /// Base URL, e.g. `https://lnbits.example.com`.
    pub url: String,
    /// The wallet's invoice/read key.
    pub invoice_key: Secret,
    /// The wallet's admin key (needed only to pay).
    pub admin_key: Option<Secret>,
    /// Where LNbits should post invoice webhooks (dvmd's `/hooks/wallet`), if reachable.
    pub webhook_url: Option<String>,
    /// Follow the wallet's websocket for settlement hints.
    pub websocket: bool,
}

/// The LNbits backend.
pub struct LnbitsWallet {
    config: LnbitsConfig,
    http: reqwest::Client,
    hints: broadcast::Sender<PaymentHash>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl LnbitsWallet {
    /// A client for `config`. Nothing is contacted until first use.
    pub fn new(config: LnbitsConfig) -> Result<Self, WalletError> {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| WalletError::Unavailable(format!("http client: {e}")))?;
        let (hints, _) = broadcast::channel(SETTLEMENT_HINTS);
        Ok(Self {
            config: LnbitsConfig {
                url: config.url.trim_end_matches('/').to_owned(),
                ..config
            },
            http,
            hints,
        })
    }

    /// Follow the LNbits websocket for this wallet until `cancel` fires, turning each message
    /// into a settlement hint. Reconnects with backoff; a missed message is caught by the
    /// reconciler.
    async fn watch_websocket(&self, cancel: CancellationToken) {
        use futures::StreamExt;
        let ws_url = format!(
            "{}/api/v1/ws/{}",
            self.config.url.replacen("http", "ws", 1),
            self.config.invoice_key.expose()
        );
        let mut delay = Duration::from_millis(500);
        loop {
            let connected = tokio::select! {
                _ = cancel.cancelled() => return,
                c = tokio_tungstenite::connect_async(ws_url.as_str()) => c,
            };
            match connected {
                Ok((mut socket, _)) => {
                    tracing::info!(url = %self.config.url, "lnbits websocket connected");
                    delay = Duration::from_millis(500);
                    loop {
                        let message = tokio::select! {
                            _ = cancel.cancelled() => return,
                            m = socket.next() => m,
                        };
                        match message {
                            Some(Ok(message)) => {
                                if let Ok(text) = message.to_text() {
                                    if let Some(hash) = parse_maybe_double_encoded(text.as_bytes())
                                        .as_ref()
                                        .and_then(payment_hash_in)
                                    {
                                        let _ = self.hints.send(hash);
                                    }
                                }
                            }
                            Some(Err(e)) => {
                                tracing::warn!(error = %e, "lnbits websocket error");
                                break;
                            }
                            None => break,
                        }
                    }
                }
                // The URL carries the invoice key: log the host only.
                Err(e) => {
                    tracing::warn!(url = %self.config.url, error = %without_key(&e.to_string(), &self.config.invoice_key), "lnbits websocket unavailable")
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(WEBSOCKET_RETRY_MAX);
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        key: &Secret,
        body: Option<Value>,
    ) -> Result<Value, WalletError> {
        let url = format!("{}{path}", self.config.url);
        let mut request = self
            .http
            .request(method, &url)
            .header("X-Api-Key", key.expose());
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| WalletError::Unavailable(format!("lnbits {path}: {}", e.without_url())))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| WalletError::Unavailable(format!("lnbits {path}: {}", e.without_url())))?;
        if status.is_success() {
            return serde_json::from_str(&text)
                .map_err(|e| WalletError::Unavailable(format!("lnbits {path}: bad JSON: {e}")));
        }
        let detail = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["detail"].as_str().map(str::to_owned))
            .unwrap_or_else(|| text.chars().take(200).collect());
        let detail = without_key(&detail, key);
        Err(classify(status.as_u16(), &detail))
    }

    /// LNbits' record of `payment_hash` in this wallet, incoming or outgoing; `None` when it
    /// has none.
    async fn payment(
        &self,
        payment_hash: &PaymentHash,
    ) -> Result<Option<serde_json::Value>, WalletError> {
        let path = format!("/api/v1/payments/{payment_hash}");
        match self
            .call(reqwest::Method::GET, &path, &self.config.invoice_key, None)
            .await
        {
            Ok(value) => Ok(Some(value)),
            Err(WalletError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn admin_key(&self) -> Result<&Secret, WalletError> {
        self.config.admin_key.as_ref().ok_or_else(|| {
            WalletError::Declined(
                "no LNbits admin key configured: this wallet cannot pay".to_owned(),
            )
        })
    }
}

/// Map an LNbits error to ours. LNbits answers most refusals with 520 and a `detail` text, so
/// the text decides; anything unrecognised on 5xx is "try again later".
fn classify(status: u16, detail: &str) -> WalletError {
    let lower = detail.to_lowercase();
    if lower.contains("insufficient balance") {
        return WalletError::InsufficientBalance {
            balance_msat: 0,
            needed_msat: 0,
        };
    }
    if lower.contains("decoding failed") || lower.contains("invalid bolt11") {
        return WalletError::InvalidInvoice(format!("lnbits: {detail}"));
    }
    if lower.contains("already paid") || lower.contains("payment is failed") {
        return WalletError::Refused(format!("lnbits: {detail}"));
    }
    match status {
        401 | 403 => WalletError::Refused(format!("lnbits rejected the key: {detail}")),
        // LNbits' own answer for a hash it has no record of; any other 404 (a proxy, a path
        // that moved) says nothing about the payment.
        404 if lower.contains("payment does not exist") => {
            WalletError::NotFound(format!("lnbits: {detail}"))
        }
        404 => WalletError::Refused(format!("lnbits: not found: {detail}")),
        400..=499 => WalletError::Refused(format!("lnbits: {detail}")),
        _ => WalletError::Unavailable(format!("lnbits {status}: {detail}")),
    }
}

/// Webhook bodies for internal payments are a JSON string holding JSON; accept both forms.
fn parse_maybe_double_encoded(body: &[u8]) -> Option<Value> {
    let value: Value = serde_json::from_slice(body).ok()?;
    match value {
        Value::String(inner) => serde_json::from_str(&inner).ok(),
        other => Some(other),
    }
}

/// The first `payment_hash` field anywhere in `value`.
fn payment_hash_in(value: &Value) -> Option<PaymentHash> {
    match value {
        Value::Object(map) => map
            .get("payment_hash")
            .and_then(Value::as_str)
            .and_then(|s| PaymentHash::from_hex(s).ok())
            .or_else(|| map.values().find_map(payment_hash_in)),
        Value::Array(items) => items.iter().find_map(payment_hash_in),
        _ => None,
    }
}

fn without_key(text: &str, key: &Secret) -> String {
    text.replace(key.expose(), "<key>")
}

#[async_trait::async_trait]
impl Wallet for LnbitsWallet {
    fn name(&self) -> &'static str {
        "lnbits"
    }

    /// LNbits stores an outgoing payment, pending, before it hands it to its funding source:
    /// "Payment does not exist." means it never tried.
    fn unknown_means_unsent(&self) -> bool {
        true
    }

    async fn create_invoice(&self, request: InvoiceRequest) -> Result<Invoice, WalletError> {
        if request.amount_msat == 0 {
            return Err(WalletError::Refused("amount must be positive".to_owned()));
        }
        // LNbits works in whole sats: round up, never undercharge.
        let sats = request.amount_msat.div_ceil(1000);
        let mut body = json!({
            "out": false,
            "amount": sats,
            "expiry": request.expiry_secs,
        });
        match &request.description {
            InvoiceDescription::Memo(memo) => body["memo"] = json!(memo),
            // LNbits hashes the exact bytes it is given into the `h` field.
            InvoiceDescription::Hashed(text) => {
                body["unhashed_description"] = json!(hex::encode(text.as_bytes()))
            }
        }
        if let Some(webhook) = &self.config.webhook_url {
            body["webhook"] = json!(webhook);
        }
        self.issue(body).await
    }

    async fn lookup(&self, payment_hash: &PaymentHash) -> Result<PaymentStatus, WalletError> {
        let Some(value) = self.payment(payment_hash).await? else {
            return Ok(PaymentStatus::Unknown);
        };
        let paid = value["paid"].as_bool().unwrap_or(false)
            || value["status"].as_str() == Some("success")
            || value["details"]["status"].as_str() == Some("success");
        let details = &value["details"];
        if paid {
            // Amounts in `details` are msat; an incoming payment is positive.
            let amount_msat = details["amount"]
                .as_i64()
                .map(i64::unsigned_abs)
                .ok_or_else(|| {
                    WalletError::Unavailable("lnbits: paid payment without an amount".to_owned())
                })?;
            return Ok(PaymentStatus::Paid { amount_msat });
        }
        // `failed`: expired, or forgotten by a restarted FakeWallet; it can never be paid.
        let failed = value["status"].as_str() == Some("failed")
            || details["status"].as_str() == Some("failed");
        let expired = details["bolt11"]
            .as_str()
            .and_then(|b| bolt11::decode(b).ok())
            .is_some_and(|info| info.expires_at <= unix_now());
        Ok(if failed || expired {
            PaymentStatus::Expired
        } else {
            PaymentStatus::Pending
        })
    }

    async fn pay(&self, bolt11: &str, max_fee_msat: u64) -> Result<PaymentSent, WalletError> {
        let info = bolt11::decode(bolt11)?;
        if info.amount_msat.is_none() {
            return Err(WalletError::InvalidInvoice(
                "amountless invoices are not paid".to_owned(),
            ));
        }
        let balance = self.balance().await?;
        let needed = info.amount_msat.unwrap_or(0).saturating_add(max_fee_msat);
        if balance < info.amount_msat.unwrap_or(0) {
            return Err(WalletError::InsufficientBalance {
                balance_msat: balance,
                needed_msat: needed,
            });
        }
        let body = json!({ "out": true, "bolt11": bolt11.trim() });
        let value = self
            .call(
                reqwest::Method::POST,
                "/api/v1/payments",
                self.admin_key()?,
                Some(body),
            )
            .await?;
        let hash = value["payment_hash"]
            .as_str()
            .and_then(|s| PaymentHash::from_hex(s).ok())
            .unwrap_or(info.payment_hash);
        // The preimage comes with the payment status once settled.
        let path = format!("/api/v1/payments/{hash}");
        let status = self
            .call(reqwest::Method::GET, &path, self.admin_key()?, None)
            .await?;
        let preimage = status["preimage"]
            .as_str()
            .or_else(|| status["details"]["preimage"].as_str())
            .and_then(|p| {
                let mut bytes = [0u8; 32];
                hex::decode_to_slice(p, &mut bytes).ok().map(|_| bytes)
            })
            .ok_or_else(|| {
                WalletError::Unavailable("lnbits: payment sent but no preimage yet".to_owned())
            })?;
        let fee_msat = status["details"]["fee"]
            .as_i64()
            .map(i64::unsigned_abs)
            .unwrap_or(0);
        Ok(PaymentSent { preimage, fee_msat })
    }

    async fn lookup_payment(
        &self,
        payment_hash: &PaymentHash,
    ) -> Result<OutgoingStatus, WalletError> {
        let Some(value) = self.payment(payment_hash).await? else {
            return Ok(OutgoingStatus::Unknown);
        };
        // LNbits leaves `details` out when the key is not the payment's wallet's (it then
        // looks the hash up in every wallet): a record we cannot read, not "no payment".
        let details = &value["details"];
        let Some(amount) = details["amount"].as_i64() else {
            return Err(WalletError::Unavailable(
                "lnbits answered without the payment's details: is the invoice key this wallet's?"
                    .to_owned(),
            ));
        };
        // An outgoing payment's amount is negative; a positive one is an invoice we issued.
        if amount >= 0 {
            return Ok(OutgoingStatus::Unknown);
        }
        let status = details["status"]
            .as_str()
            .or_else(|| value["status"].as_str());
        let paid = value["paid"].as_bool().unwrap_or(false) || status == Some("success");
        Ok(if paid {
            OutgoingStatus::Succeeded {
                fee_msat: details["fee"].as_i64().map_or(0, i64::unsigned_abs),
            }
        } else if status == Some("failed") {
            OutgoingStatus::Failed
        } else {
            OutgoingStatus::Pending
        })
    }

    async fn balance(&self) -> Result<u64, WalletError> {
        let value = self
            .call(
                reqwest::Method::GET,
                "/api/v1/wallet",
                &self.config.invoice_key,
                None,
            )
            .await?;
        value["balance"]
            .as_i64()
            .map(|b| b.max(0) as u64)
            .ok_or_else(|| WalletError::Unavailable("lnbits: wallet without a balance".to_owned()))
    }

    fn settlements(&self) -> broadcast::Receiver<PaymentHash> {
        self.hints.subscribe()
    }

    fn webhook_hint(&self, body: &[u8]) -> Option<PaymentHash> {
        let hash = payment_hash_in(&parse_maybe_double_encoded(body)?)?;
        let _ = self.hints.send(hash);
        Some(hash)
    }

    async fn follow(&self, cancel: CancellationToken) {
        if self.config.websocket {
            self.watch_websocket(cancel).await;
        }
    }
}

impl LnbitsWallet {
    async fn issue(&self, body: Value) -> Result<Invoice, WalletError> {
        let value = self
            .call(
                reqwest::Method::POST,
                "/api/v1/payments",
                &self.config.invoice_key,
                Some(body),
            )
            .await?;
        let bolt11 = value["bolt11"]
            .as_str()
            .or_else(|| value["payment_request"].as_str())
            .ok_or_else(|| WalletError::Unavailable("lnbits: invoice without bolt11".to_owned()))?
            .to_owned();
        // Trust the invoice itself over the JSON around it.
        let info = bolt11::decode(&bolt11)?;
        if let Some(hash) = value["payment_hash"].as_str() {
            if PaymentHash::from_hex(hash)? != info.payment_hash {
                return Err(WalletError::Unavailable(
                    "lnbits: payment hash does not match the invoice".to_owned(),
                ));
            }
        }
        Ok(Invoice {
            amount_msat: info.amount_msat.unwrap_or(0),
            payment_hash: info.payment_hash,
            expires_at: info.expires_at,
            bolt11,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_bodies_single_and_double_encoded() {
        let hash = "aa".repeat(32);
        let plain = format!(r#"{{"payment_hash":"{hash}","amount":21000}}"#);
        let double = serde_json::to_string(&plain).expect("encode");
        for body in [plain.as_bytes(), double.as_bytes()] {
            let value = parse_maybe_double_encoded(body).expect("parses");
            assert_eq!(payment_hash_in(&value), Some(PaymentHash([0xaa; 32])));
        }
        let nested = format!(r#"{{"payment":{{"payment_hash":"{hash}"}},"wallet_balance":5}}"#);
        let value = parse_maybe_double_encoded(nested.as_bytes()).expect("parses");
        assert_eq!(payment_hash_in(&value), Some(PaymentHash([0xaa; 32])));
        assert!(parse_maybe_double_encoded(b"not json").is_none());
        assert_eq!(payment_hash_in(&json!({"payment_hash": "zz"})), None);
    }

    #[test]
    fn lnbits_520s_are_read_by_their_detail() {
        assert!(matches!(
            classify(520, "Insufficient balance."),
            WalletError::InsufficientBalance { .. }
        ));
        assert!(matches!(
            classify(520, "Bolt11 decoding failed."),
            WalletError::InvalidInvoice(_)
        ));
        assert!(matches!(
            classify(520, "Internal invoice already paid."),
            WalletError::Refused(_)
        ));
        assert!(matches!(
            classify(403, "forbidden"),
            WalletError::Refused(_)
        ));
        assert!(matches!(
            classify(520, "node unreachable"),
            WalletError::Unavailable(_)
        ));
        assert!(matches!(
            classify(502, "bad gateway"),
            WalletError::Unavailable(_)
        ));
    }

    #[test]
    fn keys_are_scrubbed_from_messages() {
        let key = Secret::new("abcdef0123", "test");
        assert_eq!(
            without_key("bad key abcdef0123 here", &key),
            "bad key <key> here"
        );
    }
}
