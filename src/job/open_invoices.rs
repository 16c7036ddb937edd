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
//! slots of invoices that expired and were closed).

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

    /// Recount from the open payments (a reconcile pass read them).
    pub(crate) fn recount_open_invoices(&self, open: &[(PaymentHash, PaymentRecord)]) {
        let mut counts: HashMap<Account, u32> = HashMap::new();
        for (_, record) in open {
            *counts.entry(record.account).or_default() += 1;
        }
        self.inner.open_invoices.with(|current| *current = counts);
    }

    /// Unpaid invoices `account` has open now.
    pub fn open_invoices_of(&self, account: &Account) -> u32 {
        self.inner
            .open_invoices
            .with(|open| open.get(account).copied().unwrap_or(0))
    }
}
