//! L402 tokens: the challenge minted for an unauthenticated HTTP call (or a prepaid token),
//! and the confirmation that its invoice was paid.
//!
//! A challenge is an invoice whose payment is booked to the token's own account
//! ([`Account::Token`], keyed by the payment hash) and a macaroon naming that hash. Both are
//! recorded in one durable write before the 402 goes out. The payment is booked once, by
//! whichever comes first: the reconciler, a wallet hint, or the first credential presented
//! (which asks the wallet once; once booked, no credential costs a wallet call). Every
//! credential naming the hash spends from that one account until it is empty.
//!
//! The same 402 offers the HTTP `Payment` scheme ([`crate::mpp`], `charge` intent) for the same
//! invoice: its challenge is stored by id in the same write. A `Payment` credential is accepted
//! once (the challenge is marked used in a durable write before the call runs); what the call
//! leaves stays on the payment hash's account, which the L402 credential of the same 402 spends
//! and withdraws.

use serde::{Deserialize, Serialize};

use super::book::{abort, BookError};
use super::invoices::{PaymentRecord, CHALLENGE_LATE_SECS};
use super::pipeline::{unix_now, Pipeline};
use crate::l402::{self, Grant, Identifier, Macaroon};
use crate::ledger::{self, Account};
use crate::mpp;
use crate::store::Tree;
use crate::wallet::{Invoice, InvoiceDescription, InvoiceRequest, PaymentHash, WalletError};

/// A token minted, as the book keeps it (keyed by its payment hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The macaroon's token id (hex): a credential naming this hash with another id was not
    /// minted for this payment.
    pub token_id: String,
    /// The invoice amount, msat.
    pub amount_msat: u64,
    /// What the macaroon allows.
    pub valid_until: u64,
    /// The model it may call.
    pub model: String,
    /// The most one call may be quoted, msat.
    pub budget_msat: u64,
    /// Unix seconds.
    pub issued_at: u64,
}

/// A challenge ready to send.
#[derive(Debug, Clone)]
pub struct Challenge {
    /// The macaroon.
    pub macaroon: Macaroon,
    /// The invoice.
    pub invoice: Invoice,
    /// The HTTP `Payment` challenge for the same invoice (none when the invoice's network is
    /// one the Lightning method cannot name).
    pub payment: Option<mpp::Challenge>,
    /// The HTTP `Payment` `session` challenge with the same invoice as its deposit (none when
    /// sessions are not offered).
    pub session: Option<mpp::Challenge>,
}

/// What mints the HTTP `Payment` challenge beside each L402 one.
#[derive(Debug, Clone, Copy)]
pub struct PaymentScheme<'a> {
    /// The key binding challenge ids.
    pub key: &'a [u8],
    /// The `realm`.
    pub realm: &'a str,
}

/// An HTTP `Payment` challenge, as the book keeps it (keyed by its id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentChallengeRecord {
    /// The challenge as sent: a credential must echo it exactly.
    pub challenge: mpp::Challenge,
    /// The payment hash it sells (the account it pays into).
    pub payment_hash: PaymentHash,
    /// Unix seconds after which it is refused (the invoice's expiry).
    pub expires_at: u64,
    /// When a credential used it (unix seconds); a used challenge is never accepted again.
    pub used_at: Option<u64>,
    /// The session a `topUp` credential added this challenge's payment to (the same credential
    /// again answers as it did).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topped_up: Option<PaymentHash>,
}

impl PaymentChallengeRecord {
    /// The invoice the challenge sells (`methodDetails.invoice` of a charge, `depositInvoice`
    /// of a session), read back from its request.
    pub fn deposit_invoice(&self) -> String {
        use base64::Engine;
        let request = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&self.challenge.request)
            .ok()
            .and_then(|raw| serde_json::from_slice::<serde_json::Value>(&raw).ok())
            .unwrap_or_default();
        request["depositInvoice"]
            .as_str()
            .or_else(|| request["methodDetails"]["invoice"].as_str())
            .unwrap_or_default()
            .to_owned()
    }
}

/// Why a credential's payment is not (yet) good.
#[derive(Debug, thiserror::Error)]
pub enum TokenRefusal {
    /// No token was minted for this payment hash, or not with this token id.
    #[error("this token was not issued here")]
    Unknown,
    /// The wallet has not confirmed the payment.
    #[error("the invoice of this token is not paid yet")]
    Unpaid,
    /// The store failed.
    #[error(transparent)]
    Book(#[from] BookError),
}

impl Pipeline {
    /// Mint a challenge: an invoice for `amount_msat` and a macaroon for its hash, recorded
    /// (the payment record on the token's account and the token) durably before this returns.
    pub async fn l402_challenge(
        &self,
        root_key: &[u8],
        scheme: PaymentScheme<'_>,
        amount_msat: u64,
        grant: Grant,
    ) -> Result<Challenge, ChallengeError> {
        let inner = &self.inner;
        let invoice = inner
            .wallet
            .create_invoice(InvoiceRequest {
                amount_msat,
                description: InvoiceDescription::Memo("dvmd L402 token".to_owned()),
                expiry_secs: inner.config.invoice_expiry_secs,
            })
            .await?;
        let hash = invoice.payment_hash;
        let id = Identifier::new(hash);
        let macaroon = l402::mint(root_key, &id, &grant);
        let record = PaymentRecord {
            // Its credential looks it up; the reconciler only once, past expiry.
            next_lookup_at: invoice.expires_at + CHALLENGE_LATE_SECS + 1,
            ..PaymentRecord::issued(None, Account::Token(hash), &invoice, None)
        };
        let token = TokenRecord {
            token_id: hex::encode(id.token_id),
            amount_msat: invoice.amount_msat,
            valid_until: grant.valid_until,
            model: grant.model,
            budget_msat: grant.budget_msat,
            issued_at: unix_now(),
        };
        let network = mpp::network_of(&invoice.bolt11);
        let payment = network.map(|network| {
            let charge = mpp::Charge {
                amount_sats: invoice.amount_msat / 1000,
                description: "dvmd L402 token",
                invoice: &invoice.bolt11,
                payment_hash: &hash,
                network,
            };
            mpp::Challenge::charge(scheme.key, scheme.realm, &charge, invoice.expires_at)
        });
        // The same invoice opens (or tops up) a session, where the wallet can refund one.
        let session = (network.is_some() && self.offers_sessions()).then(|| {
            let card = inner.config.rate_card;
            let unit = format!(
                "sat of tokens ({} msat per prompt token, {} msat per completion token, {} msat per call)",
                card.prompt_msat_per_1k_tokens as f64 / 1000.0,
                card.completion_msat_per_1k_tokens as f64 / 1000.0,
                card.base_fee_msat
            );
            let offer = mpp::SessionOffer {
                deposit_sats: invoice.amount_msat / 1000,
                invoice: &invoice.bolt11,
                payment_hash: &hash,
                description: "dvmd session deposit",
                idle_timeout_secs: inner.config.session_idle_secs,
                unit_type: &unit,
            };
            mpp::Challenge::session(scheme.key, scheme.realm, &offer, invoice.expires_at)
        });
        let stored: Vec<_> = payment
            .iter()
            .chain(session.iter())
            .map(|challenge| PaymentChallengeRecord {
                challenge: challenge.clone(),
                payment_hash: hash,
                expires_at: invoice.expires_at,
                used_at: None,
                topped_up: None,
            })
            .collect();
        inner
            .book
            .register_token(&hash, record, token, stored)
            .await?;
        inner.metrics.challenged(crate::metrics::Challenge::L402);
        tracing::info!(payment_hash = %hash, msat = invoice.amount_msat, "L402 challenge issued");
        Ok(Challenge {
            macaroon,
            invoice,
            payment,
            session,
        })
    }

    /// The account an HTTP `Payment` credential pays into, once every check holds: the
    /// challenge was issued here and is echoed exactly, the preimage pays its hash, and the
    /// wallet has seen the invoice paid. With `spend` (a call to pay), it must also not have
    /// expired unused; the call's open uses it, in the write that reserves the call's quote
    /// ([`PaidBy::Charge`]: of two calls with one credential one opens, and a call that does
    /// not open leaves it unused). Without, it only proves the caller holds the payment (to
    /// read its jobs).
    ///
    /// [`PaidBy::Charge`]: super::holds::PaidBy::Charge
    pub async fn payment_account(
        &self,
        credential: &mpp::Credential,
        spend: bool,
    ) -> Result<(Account, PaymentHash), PaymentRefusal> {
        let book = &self.inner.book;
        let id = credential.challenge.id.clone();
        let stored = book
            .payment_challenge(&id)
            .await?
            .ok_or(mpp::Refusal::UnknownChallenge)?;
        if stored.challenge != credential.challenge {
            return Err(mpp::Refusal::UnknownChallenge.into());
        }
        let hash = stored.payment_hash;
        if credential.payment_hash() != hash {
            return Err(mpp::Refusal::InvalidPreimage.into());
        }
        // Booked before any refusal: the preimage shows the invoice was paid, and the
        // reconciler stops looking a challenge up a minute past its expiry, so a payment that
        // came late (LNbits takes expired invoices) is found here, and stays on the token's
        // account for the L402 credential of the same 402.
        let booked = self
            .confirm_booked(&hash, book.payment(&hash).await?)
            .await?;
        // A used one goes on to the open, which finds the job it paid for (a call made again
        // with its Idempotency-Key), or refuses it as used.
        if spend && stored.used_at.is_none() && unix_now() >= stored.expires_at {
            return Err(mpp::Refusal::Expired(stored.challenge.expires).into());
        }
        if !booked {
            return Err(mpp::Refusal::Unpaid.into());
        }
        Ok((Account::Token(hash), hash))
    }

    /// The account a verified credential spends from, once its payment is booked: looked up in
    /// the book, and in the wallet only while the book has not booked it.
    pub async fn l402_account(&self, id: &Identifier) -> Result<Account, TokenRefusal> {
        let hash = id.payment_hash;
        let book = &self.inner.book;
        let (token, record) = book.token_and_payment(&hash).await?;
        let token = token.ok_or(TokenRefusal::Unknown)?;
        if token.token_id != hex::encode(id.token_id) {
            return Err(TokenRefusal::Unknown);
        }
        if !self.confirm_booked(&hash, record).await? {
            return Err(TokenRefusal::Unpaid);
        }
        Ok(Account::Token(hash))
    }

    /// Whether the payment of `hash` is booked, asking the wallet once if not yet.
    pub(super) async fn payment_booked(&self, hash: &PaymentHash) -> Result<bool, BookError> {
        let record = self.inner.book.payment(hash).await?;
        self.confirm_booked(hash, record).await
    }

    /// Whether the payment of `hash` is booked (`record` is what the caller read of it): if
    /// not yet, the wallet is asked once (the first credential can arrive before the
    /// reconciler or a hint); once booked, no credential costs a wallet call.
    async fn confirm_booked(
        &self,
        hash: &PaymentHash,
        record: Option<PaymentRecord>,
    ) -> Result<bool, BookError> {
        let booked = |record: Option<PaymentRecord>| record.is_some_and(|r| r.consumed);
        if booked(record) {
            return Ok(true);
        }
        self.check_payment(hash).await;
        Ok(booked(self.inner.book.payment(hash).await?))
    }

    /// A token account's spendable balance, msat.
    pub async fn balance_of(&self, account: Account) -> Result<u64, BookError> {
        self.inner
            .book
            .store()
            .read(move |r| Ok(ledger::balance(r, &account)?))
            .await
    }
}

/// Why an HTTP `Payment` credential is refused.
#[derive(Debug, thiserror::Error)]
pub enum PaymentRefusal {
    /// The credential does not hold (the draft's problem types).
    #[error(transparent)]
    Credential(#[from] mpp::Refusal),
    /// The store failed.
    #[error(transparent)]
    Book(#[from] BookError),
}

/// Why a challenge could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum ChallengeError {
    /// The wallet refused or failed.
    #[error(transparent)]
    Wallet(#[from] WalletError),
    /// The store failed.
    #[error(transparent)]
    Book(#[from] BookError),
}

impl super::Book {
    /// Record a token's invoice, the token and its HTTP `Payment` challenges in one durable
    /// write; a reused hash is refused.
    pub async fn register_token(
        &self,
        hash: &PaymentHash,
        record: PaymentRecord,
        token: TokenRecord,
        payment: Vec<PaymentChallengeRecord>,
    ) -> Result<(), BookError> {
        let hash = *hash;
        self.store()
            .commit(move |tx| {
                if tx.contains(Tree::Payments, &hash.0)?
                    || tx.contains(Tree::L402Tokens, &hash.0)?
                {
                    return Err(abort(BookError::PaymentHashReused(hash)));
                }
                tx.put(Tree::Payments, &hash.0, &record)?;
                super::invoices::index_open(tx, &hash, &record)?;
                tx.put(Tree::L402Tokens, &hash.0, &token)?;
                for payment in &payment {
                    tx.put(
                        Tree::MppChallenges,
                        payment.challenge.id.as_bytes(),
                        payment,
                    )?;
                }
                Ok(())
            })
            .await
    }

    /// The HTTP `Payment` challenge issued with `id`.
    pub async fn payment_challenge(
        &self,
        id: &str,
    ) -> Result<Option<PaymentChallengeRecord>, BookError> {
        let id = id.to_owned();
        self.store()
            .read(move |r| Ok(r.get(Tree::MppChallenges, id.as_bytes())?))
            .await
    }

    /// The token minted for `hash` and its payment record, in one read.
    pub async fn token_and_payment(
        &self,
        hash: &PaymentHash,
    ) -> Result<(Option<TokenRecord>, Option<PaymentRecord>), BookError> {
        let hash = *hash;
        self.store()
            .read(move |r| {
                Ok((
                    r.get(Tree::L402Tokens, &hash.0)?,
                    r.get(Tree::Payments, &hash.0)?,
                ))
            })
            .await
    }

    /// The token minted for `hash`.
    pub async fn token(&self, hash: &PaymentHash) -> Result<Option<TokenRecord>, BookError> {
        let hash = *hash;
        self.store()
            .read(move |r| Ok(r.get(Tree::L402Tokens, &hash.0)?))
            .await
    }
}
