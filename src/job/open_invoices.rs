//! Caps on unpaid invoices: per account (`[service] max_open_invoices_per_npub`), and for the
//! whole service (`[service] max_open_invoices`), of which keys that have not paid us yet (tier
//! `new`) may hold only `[trust] new_max_open_invoices`: the rest is kept for customers who
//! have, so a flood of fresh keys cannot make the service refuse them.
//!
//! Each invoice costs a wallet call, and each open one costs a lookup on every reconcile pass,
//! so a key that posts requests and never pays must not make either grow without end. The
//! count is kept in memory: a relay job takes a slot before its invoice is created, gives it
//! back if the invoice is not recorded, and frees it when the payment is booked; every
//! reconcile pass recounts from the open payments the pass reads anyway (which also frees the
//! slots of invoices that expired). Only job invoices count (see [`counted`]).

use std::collections::HashMap;
use std::sync::Mutex;

use super::invoices::PaymentRecord;
use super::pipeline::Pipeline;
use crate::ledger::Account;
use crate::wallet::PaymentHash;

/// Open invoices per account.
#[derive(Debug, Default)]
pub struct OpenInvoices(Mutex<HashMap<Account, u32>>);

impl OpenInvoices {
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<Account, u32>) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Why no invoice slot was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoSlot {
    /// The account holds its share (this many).
    Account(u32),
    /// The service holds as many as it allows for this caller's tier.
    Service,
}

impl Pipeline {
    /// Take one of `account`'s open-invoice slots, if it and the service have one left for it
    /// (`new` npubs within their share of the service's).
    pub(crate) fn take_invoice_slot(&self, account: &Account) -> Result<(), NoSlot> {
        let config = &self.inner.config;
        let service_cap = match account.npub() {
            Some(npub) if self.inner.trust.tier(&npub) == crate::trust::Tier::New => {
                config.trust.new_max_open_invoices
            }
            _ => config.max_open_invoices,
        };
        let cap = config.max_open_invoices_per_npub;
        self.inner.open_invoices.with(|open| {
            let total: u64 = open.values().map(|n| u64::from(*n)).sum();
            let count = open.entry(*account).or_default();
            if *count >= cap {
                return Err(NoSlot::Account(*count));
            }
            if total >= u64::from(service_cap) {
                if *count == 0 {
                    open.remove(account);
                }
                return Err(NoSlot::Service);
            }
            *count += 1;
            Ok(())
        })
    }

    /// Give back a slot whose invoice was not recorded, or whose payment was booked.
    pub(crate) fn release_invoice_slot(&self, account: &Account) {
        self.inner.open_invoices.with(|open| {
            if let Some(count) = open.get_mut(account) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    open.remove(account);
                }
            }
        });
    }

    /// Recount from the open payments (a reconcile pass read them) at `now`.
    pub(crate) fn recount_open_invoices(&self, open: &[(PaymentHash, PaymentRecord)], now: u64) {
        let counts = counted(open, now);
        self.inner.open_invoices.with(|current| *current = counts);
    }

    /// Unpaid invoices `account` has open now.
    pub fn open_invoices_of(&self, account: &Account) -> u32 {
        self.inner
            .open_invoices
            .with(|open| open.get(account).copied().unwrap_or(0))
    }
}

/// What holds a slot: an unexpired invoice of a job, issued for its request or continuation,
/// as [`Pipeline::take_invoice_slot`]'s callers issue them. Top-ups, the HTTP doors' `402`
/// challenges and zap invoices (each door with its own rate limits) took no slot; counted,
/// anyone who asked for enough of them (a top-up or an L402 token needs no payment) made
/// every relay job refused its invoice. And an expired invoice stays open to late lookups
/// for `late_lookup_days`, but is no longer one a customer waits to pay.
fn counted(open: &[(PaymentHash, PaymentRecord)], now: u64) -> HashMap<Account, u32> {
    let mut counts: HashMap<Account, u32> = HashMap::new();
    for (_, record) in open {
        if record.job.is_some() && record.zap_request.is_none() && record.expires_at > now {
            *counts.entry(record.account).or_default() += 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::JobId;

    fn record(job: bool, zap: bool, expires_at: u64, account: Account) -> PaymentRecord {
        PaymentRecord {
            job: job.then(JobId::random),
            account,
            amount_msat: 1_000,
            expires_at,
            bolt11: String::new(),
            zap_request: zap.then(|| "{}".to_owned()),
            consumed: false,
            closed: false,
            next_lookup_at: 0,
            continues: None,
        }
    }

    #[test]
    fn only_unexpired_job_invoices_hold_slots() {
        let alice = Account::from(nostr_sdk::Keys::generate().public_key());
        let bob = Account::from(nostr_sdk::Keys::generate().public_key());
        let now = 1_000_000;
        let open: Vec<(PaymentHash, PaymentRecord)> = [
            record(true, false, now + 600, alice), // a job's invoice: counted
            record(true, false, now + 60, alice),  // and another
            record(true, false, now, alice),       // expired
            record(false, false, now + 600, alice), // a top-up, or a 402 challenge
            record(true, true, now + 600, bob),    // a zap of a job
            record(false, false, now + 600, bob),
        ]
        .into_iter()
        .enumerate()
        .map(|(n, r)| (PaymentHash([n as u8; 32]), r))
        .collect();
        let counts = counted(&open, now);
        assert_eq!(counts.get(&alice), Some(&2));
        assert_eq!(counts.get(&bob), None);
    }
}
