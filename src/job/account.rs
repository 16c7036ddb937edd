//! A customer's account seen from outside: its balance and history, and invoices that top it
//! up. The HTTP door (`GET /v1/account`, `POST /v1/account/topup`) calls these after NIP-98
//! has said whose account it is; nothing here knows about HTTP.

use crate::ledger::Account;
use serde::Serialize;

use super::book::BookError;
use super::id::JobId;
use super::invoices::PaymentRecord;
use super::pipeline::Pipeline;
use super::record::Door;
use crate::ledger::{self, Entry};
use crate::wallet::{Invoice, InvoiceDescription, InvoiceRequest, WalletError};

/// An account's balance, its latest ledger entries and the jobs they name.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AccountView {
    /// Spendable now, msat (what running jobs hold is not part of it).
    pub balance_msat: u64,
    /// Owed for jobs run before they were paid (pay-after), msat.
    pub owed_msat: u64,
    /// The latest entries, newest first.
    pub entries: Vec<NumberedEntry>,
    /// The jobs those entries name, most recent first.
    pub jobs: Vec<JobSummary>,
}

/// A job as an account's history shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobSummary {
    /// The job id.
    pub id: JobId,
    /// The door it came in by.
    pub door: Door,
    /// Its state (as the metrics and `GET /v1/jobs/{id}` name it).
    pub state: &'static str,
    /// Its quote, msat.
    pub quote_msat: Option<u64>,
    /// What it was charged, msat, once it ran.
    pub charge_msat: Option<u64>,
    /// What it was funded with (paid, or reserved from credit), msat.
    pub paid_msat: u64,
    /// What went back to the balance once it was charged, msat.
    pub returned_msat: Option<u64>,
    /// Prompt tokens, once it ran.
    pub prompt_tokens: Option<u32>,
    /// Completion tokens, once it ran.
    pub completion_tokens: Option<u32>,
    /// Unix seconds of its last transition.
    pub updated_at: u64,
}

/// A ledger entry with its sequence number.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NumberedEntry {
    /// Its place in the ledger.
    pub seq: u64,
    /// The entry.
    #[serde(flatten)]
    pub entry: Entry,
}

/// Why a top-up invoice was not issued.
#[derive(Debug, thiserror::Error)]
pub enum TopUpRefusal {
    /// Not a whole number of sats, or outside the bounds.
    #[error("{0}")]
    Amount(String),
    /// The wallet failed.
    #[error("cannot issue an invoice: {0}")]
    Wallet(#[from] WalletError),
    /// The store failed.
    #[error("cannot record the invoice: {0}")]
    Book(#[from] BookError),
}

/// Whether `amount_msat` may be asked for by a top-up: whole sats (every wallet can issue those
/// exactly), from 1 sat to `max_msat`.
pub fn check_top_up(amount_msat: u64, max_msat: u64) -> Result<(), TopUpRefusal> {
    if amount_msat == 0 || amount_msat % 1_000 != 0 || amount_msat > max_msat {
        return Err(TopUpRefusal::Amount(format!(
            "amount_msat must be a whole number of sats from 1000 to {max_msat}, not {amount_msat}"
        )));
    }
    Ok(())
}

impl Pipeline {
    /// `account`'s balance and its latest `limit` ledger entries.
    pub async fn account(&self, account: Account, limit: usize) -> Result<AccountView, BookError> {
        let (balance_msat, owed_msat, entries, jobs) = self
            .inner
            .book
            .store()
            .read(move |r| {
                let entries = ledger::entries_of(r, &account, limit)?;
                let mut jobs = Vec::new();
                let mut seen = std::collections::HashSet::new();
                for id in entries.iter().filter_map(|(_, e)| e.job) {
                    if seen.insert(id) {
                        if let Some(job) = super::book::read_job(r, &id)? {
                            jobs.push(JobSummary {
                                id,
                                door: job.door,
                                state: job.state.as_str(),
                                quote_msat: job.quote_msat,
                                charge_msat: job.charge_msat,
                                paid_msat: job.funds_msat(),
                                returned_msat: job
                                    .charge_msat
                                    .filter(|_| job.state == super::JobState::Settled)
                                    .map(|charge| job.funds_msat().saturating_sub(charge)),
                                prompt_tokens: job.usage.map(|u| u.prompt_tokens),
                                completion_tokens: job.usage.map(|u| u.completion_tokens),
                                updated_at: job.updated_at,
                            });
                        }
                    }
                }
                Ok::<_, ledger::LedgerError>((
                    ledger::balance(r, &account)?,
                    ledger::owed(r, &account)?,
                    entries,
                    jobs,
                ))
            })
            .await?;
        Ok(AccountView {
            balance_msat,
            owed_msat,
            entries: entries
                .into_iter()
                .map(|(seq, entry)| NumberedEntry { seq, entry })
                .collect(),
            jobs,
        })
    }

    /// An invoice for `amount_msat` that credits `account` once our wallet confirms it. It is
    /// bound to no job and reserves nothing; it is recorded before it is returned, so a payment
    /// is booked even if the caller never hears of the invoice again. See [`check_top_up`].
    pub async fn top_up_invoice(
        &self,
        account: Account,
        amount_msat: u64,
        max_msat: u64,
    ) -> Result<Invoice, TopUpRefusal> {
        check_top_up(amount_msat, max_msat)?;
        let inner = &self.inner;
        let invoice = inner
            .wallet
            .create_invoice(InvoiceRequest {
                amount_msat,
                description: InvoiceDescription::Memo(format!(
                    "dvmd credit for {}",
                    account.to_human()
                )),
                expiry_secs: inner.config.invoice_expiry_secs,
            })
            .await?;
        let record = PaymentRecord::issued(None, account, &invoice, None);
        inner
            .book
            .register_invoice(&invoice.payment_hash, record)
            .await?;
        tracing::info!(%account, msat = invoice.amount_msat, payment_hash = %invoice.payment_hash, "top-up invoice issued");
        Ok(invoice)
    }
}
