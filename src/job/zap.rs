//! Zaps in (NIP-57): the LNURL callback's side of the pipeline. A zap request that names a
//! job (its request or its `payment-required` feedback) with at least what that feedback asks
//! gets an invoice that pays for that job, or for its continuation when the job awaits one
//! (from the account that paid for the job); any other zap to this service tops up the
//! sender's credit.
//! The invoice commits to the exact zap-request string; the receipt follows our wallet's
//! confirmation (`job::payment`).

use super::id::JobId;

use super::book::BookError;
use super::invoices::PaymentRecord;
use super::pipeline::Pipeline;
use super::state::JobState;
use crate::ledger::Account;
use crate::nip57::{self, ZapError};
use crate::wallet::PaymentHash;
use crate::wallet::{Invoice, InvoiceDescription, InvoiceRequest, WalletError};

/// What a zap pays for: a job waiting for payment, or the continuation it awaits.
#[derive(Debug, Clone, Copy)]
struct Zapped {
    job: JobId,
    /// The continuation invoice the zap stands in for ([`PaymentRecord::continues`]).
    continues: Option<PaymentHash>,
}

impl Zapped {
    /// The record of a zap invoice (or of a provider's receipt) that pays for this, if
    /// anything, credited to `sender` otherwise.
    fn record(zapped: Option<Self>, record: PaymentRecord) -> PaymentRecord {
        PaymentRecord {
            job: zapped.map(|z| z.job),
            continues: zapped.and_then(|z| z.continues),
            ..record
        }
    }
}

/// Why the callback refuses to issue an invoice (answered as an LNURL error).
#[derive(Debug, thiserror::Error)]
pub enum ZapRefusal {
    /// The zap request is invalid.
    #[error(transparent)]
    Request(#[from] ZapError),
    /// The zapped job cannot be paid (unknown, not waiting, amount below the quote).
    #[error("{0}")]
    Job(String),
    /// The wallet cannot issue an invoice for exactly this amount.
    #[error("{0}")]
    Amount(String),
    /// The wallet failed.
    #[error("cannot issue an invoice: {0}")]
    Wallet(#[from] WalletError),
    /// The store failed.
    #[error("cannot record the invoice: {0}")]
    Book(#[from] BookError),
}

impl Pipeline {
    /// Validate a zap request for `amount_msat` and issue its invoice.
    pub async fn zap_invoice(
        &self,
        zap_json: &str,
        amount_msat: u64,
    ) -> Result<Invoice, ZapRefusal> {
        let inner = &self.inner;
        let request = nip57::parse_zap_request(zap_json, amount_msat, &inner.keys.public_key())?;
        let sender = Account::from(request.event.pubkey);
        let zapped = match request.target {
            Some(target) => self.zapped_job(&target, amount_msat, &sender).await?,
            None => None,
        };
        let invoice = self
            .exact_invoice(InvoiceRequest {
                amount_msat,
                description: InvoiceDescription::Hashed(request.json.clone()),
                expiry_secs: inner.config.invoice_expiry_secs,
            })
            .await?;
        let record = Zapped::record(
            zapped,
            PaymentRecord::issued(None, sender, &invoice, Some(request.json.clone())),
        );
        let job = record.job;
        inner
            .book
            .register_invoice(&invoice.payment_hash, record)
            .await?;
        tracing::info!(zap = %request.event.id, sender = %request.event.pubkey, job = ?job, msat = invoice.amount_msat, payment_hash = %invoice.payment_hash, "zap invoice issued");
        Ok(invoice)
    }

    /// An invoice for a plain LNURL payment (no zap request): its description hash commits to
    /// the address's `metadata` (LUD-06). Nobody to credit but the operator, so the payment is
    /// booked to the service's own account (tips).
    pub async fn lnurl_invoice(
        &self,
        amount_msat: u64,
        metadata: &str,
    ) -> Result<Invoice, ZapRefusal> {
        let inner = &self.inner;
        let invoice = self
            .exact_invoice(InvoiceRequest {
                amount_msat,
                description: InvoiceDescription::Hashed(metadata.to_owned()),
                expiry_secs: inner.config.invoice_expiry_secs,
            })
            .await?;
        let record = PaymentRecord::issued(None, inner.keys.public_key().into(), &invoice, None);
        inner
            .book
            .register_invoice(&invoice.payment_hash, record)
            .await?;
        tracing::info!(msat = invoice.amount_msat, payment_hash = %invoice.payment_hash, "lnurl invoice issued");
        Ok(invoice)
    }

    /// An invoice for exactly the amount asked. LUD-06 payers refuse any other amount, and a
    /// wallet that only takes whole sats (LNbits) rounds up: refuse such amounts with a reason
    /// rather than hand out an invoice that will not be paid. The unneeded invoice just expires.
    async fn exact_invoice(&self, request: InvoiceRequest) -> Result<Invoice, ZapRefusal> {
        let asked = request.amount_msat;
        let invoice = self.inner.wallet.create_invoice(request).await?;
        if invoice.amount_msat != asked {
            return Err(ZapRefusal::Amount(format!(
                "this wallet cannot issue an invoice for exactly {asked} msat (it issued {} msat); send a whole number of sats",
                invoice.amount_msat
            )));
        }
        Ok(invoice)
    }

    /// What a zap from `sender` pays for: the zapped event is the job's request or its
    /// feedback. Zaps of other events are top-ups (`None`). A job waiting for payment takes at
    /// least what its `payment-required` asked (the quote, less any credit it reserved); a
    /// job awaiting its continuation takes at least the continuation's invoice amount, from
    /// the account that paid for the job (whose holds the continuation adds to).
    async fn zapped_job(
        &self,
        target: &nostr_sdk::EventId,
        amount_msat: u64,
        sender: &Account,
    ) -> Result<Option<Zapped>, ZapRefusal> {
        let book = &self.inner.book;
        let job = match book.get(&JobId::from(*target)).await? {
            Some(job) => job,
            None => match book.job_of_feedback(target).await? {
                Some(id) => book.get(&id).await?.ok_or(BookError::NoJob(id))?,
                None => return Ok(None),
            },
        };
        let id = job.id;
        let waiting = job
            .continuation
            .as_ref()
            .filter(|c| job.continues_on(&c.payment_hash));
        let (due, continues) = match (job.state, waiting) {
            (JobState::AwaitingPayment, _) => (
                job.quote_msat.unwrap_or(0).saturating_sub(job.credit_msat),
                None,
            ),
            (JobState::AwaitingContinuation, Some(continuation)) => {
                if *sender != job.payer() {
                    return Err(ZapRefusal::Job(format!(
                        "job {id}'s continuation is paid by whoever paid for the job"
                    )));
                }
                (continuation.amount_msat, Some(continuation.payment_hash))
            }
            (state, _) => {
                return Err(ZapRefusal::Job(format!(
                    "job {id} is not waiting for payment ({state:?})"
                )))
            }
        };
        if amount_msat < due {
            return Err(ZapRefusal::Job(format!(
                "job {id} asks {due} msat; zap at least that"
            )));
        }
        Ok(Some(Zapped { job: id, continues }))
    }
}

/// What a provider's zap receipt did.
#[derive(Debug, PartialEq)]
pub enum ReceiptOutcome {
    /// It paid for this job, now `Paid`.
    PaidJob(JobId),
    /// It was credited to the sender (a top-up, or a job that was not waiting).
    Credited,
    /// Refused: why.
    Refused(String),
    /// Its payment was already booked (a replay, or the same payment offered twice).
    Replayed,
}

impl Pipeline {
    /// The trusted external zap provider, if any.
    pub fn zap_provider(&self) -> Option<nostr_sdk::PublicKey> {
        self.inner.config.zap_provider
    }

    /// Our public key.
    pub fn pubkey(&self) -> nostr_sdk::PublicKey {
        self.inner.keys.public_key()
    }

    /// Take a receipt from intake; waits only for room among the in-flight intake tasks.
    pub async fn handle_receipt(&self, receipt: crate::nip90::Verified) {
        let pipeline = self.clone();
        self.spawn_intake(async move {
            let outcome = pipeline.accept_provider_receipt(&receipt).await;
            tracing::debug!(receipt = %receipt.event().id, ?outcome, "zap receipt handled");
        })
        .await;
    }

    /// Take a zap receipt from the trusted external Lightning address provider (NIP-57
    /// appendix F). Only used when `zap_provider` is configured: our own LNURL payments are
    /// confirmed by our wallet, never by a receipt.
    pub async fn accept_provider_receipt(
        &self,
        receipt: &crate::nip90::Verified,
    ) -> ReceiptOutcome {
        let inner = &self.inner;
        let Some(provider) = inner.config.zap_provider else {
            return ReceiptOutcome::Refused("no zap provider is trusted".to_owned());
        };
        let us = inner.keys.public_key();
        let valid = match nip57::validate_receipt(receipt.event(), &provider, &us) {
            Ok(valid) => valid,
            Err(e) => {
                tracing::info!(receipt = %receipt.event().id, error = %e, "zap receipt refused");
                return ReceiptOutcome::Refused(e.to_string());
            }
        };
        let since = match inner
            .book
            .provider_trusted_since(&provider, super::pipeline::unix_now())
            .await
        {
            Ok(since) => since,
            Err(e) => return ReceiptOutcome::Refused(format!("cannot book: {e}")),
        };
        if valid.invoice.created_at < since {
            tracing::info!(receipt = %receipt.event().id, invoice_created_at = valid.invoice.created_at, trusted_since = since, "zap receipt refused: its invoice is older than our trust in the provider");
            return ReceiptOutcome::Refused(
                "the zap was paid before this service trusted its provider".to_owned(),
            );
        }
        let sender = Account::from(valid.request.event.pubkey);
        let zapped = match valid.request.target {
            Some(target) => match self.zapped_job(&target, valid.amount_msat, &sender).await {
                Ok(zapped) => zapped,
                Err(e) => {
                    // Not payable as a job (paid already, below the quote): the money is real,
                    // so it is credited to the sender rather than ignored.
                    tracing::info!(receipt = %receipt.event().id, reason = %e, "zap credited instead of paying a job");
                    None
                }
            },
            None => None,
        };
        let record = PaymentRecord {
            job: None,
            account: sender,
            amount_msat: valid.amount_msat,
            expires_at: valid.invoice.expires_at,
            bolt11: String::new(),
            zap_request: None,
            consumed: true,
            closed: false,
            next_lookup_at: 0,
            continues: None,
        };
        let record = Zapped::record(zapped, record);
        let booked = inner
            .book
            .confirm_external(&valid.invoice.payment_hash, record, valid.amount_msat)
            .await;
        match booked {
            Ok(super::PaymentOutcome::Paid(job)) => {
                inner.metrics.payment_confirmed(valid.amount_msat);
                inner.metrics.entered(JobState::Paid);
                tracing::info!(job = %job.id, msat = valid.amount_msat, "job paid by a provider zap");
                let id = job.id;
                self.enqueue(*job, Some(std::time::Instant::now())).await;
                ReceiptOutcome::PaidJob(id)
            }
            Ok(super::PaymentOutcome::AlreadyConsumed) => ReceiptOutcome::Replayed,
            Ok(_) => {
                inner.metrics.payment_confirmed(valid.amount_msat);
                ReceiptOutcome::Credited
            }
            Err(e) => ReceiptOutcome::Refused(format!("cannot book: {e}")),
        }
    }
}
