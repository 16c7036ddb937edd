//! The invariant check over the whole ledger (`dvmd ledger check`, `job::audit`, and every test
//! scenario), and what each job holds. See the module docs of [`super`] for the invariant.

use std::collections::HashMap;

use serde::Serialize;

use super::{Account, Entry, EntryKind, LedgerError};
use crate::job::JobId;
use crate::store::{account_entry_key, be_u64, Reader, Tree};

/// Totals by entry kind and over balances, as the invariant check computed them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// Sum of `payment_in`.
    pub payment_in_msat: u64,
    /// Sum of `charge`.
    pub charge_msat: u64,
    /// Sum of `refund_credit` memos.
    pub refund_credit_msat: u64,
    /// Sum of `payout`.
    pub payout_msat: u64,
    /// Sum of `payout_pending`.
    pub payout_pending_msat: u64,
    /// Sum of `routing_fee`.
    pub routing_fee_msat: u64,
    /// Sum of `payout_fee_returned`.
    pub payout_fee_returned_msat: u64,
    /// Sum of `payout_failed`.
    pub payout_failed_msat: u64,
    /// In flight now: pending payouts, amount plus most fee.
    pub in_flight_msat: u64,
    /// Sum of `expiry`.
    pub expiry_msat: u64,
    /// Sum of `reserve`.
    pub reserve_msat: u64,
    /// Sum of `release`.
    pub release_msat: u64,
    /// Held for jobs now: `reserve - release`.
    pub held_msat: u64,
    /// Sum of account balances.
    pub balances_msat: u64,
    /// Sum of `debt`.
    pub debt_msat: u64,
    /// Sum of `debt_repaid`.
    pub debt_repaid_msat: u64,
    /// Owed now for jobs run before they were paid: `debt - debt_repaid`.
    pub receivable_msat: u64,
    /// Sum of `transfer_out`.
    pub transfer_out_msat: u64,
    /// Sum of `transfer_in` (equal to `transfer_out`).
    pub transfer_in_msat: u64,
    /// Number of entries.
    pub entries: u64,
    /// Number of accounts.
    pub accounts: u64,
}

/// What the ledger holds for each job now (`reserve - release` over its entries), for jobs
/// that hold anything.
pub fn holds(reader: &Reader<'_>) -> Result<HashMap<JobId, u64>, LedgerError> {
    let mut held: HashMap<JobId, i128> = HashMap::new();
    for item in reader.scan::<Entry>(Tree::Entries) {
        let (_, entry) = item?;
        if let (Some(job), Some(delta)) = (entry.job, hold_delta(&entry)) {
            *held.entry(job).or_default() += delta;
        }
    }
    held.into_iter()
        .filter(|(_, msat)| *msat != 0)
        .map(|(job, msat)| {
            u64::try_from(msat).map(|msat| (job, msat)).map_err(|_| {
                LedgerError::Invariant(format!(
                    "job {job} released {} msat more than it reserved",
                    -msat
                ))
            })
        })
        .collect()
}

fn hold_delta(entry: &Entry) -> Option<i128> {
    match entry.kind {
        EntryKind::Reserve => Some(i128::from(entry.msat)),
        EntryKind::Release => Some(-i128::from(entry.msat)),
        _ => None,
    }
}

/// Check the invariant over the whole ledger.
pub fn check(reader: &Reader<'_>) -> Result<Totals, LedgerError> {
    let mut totals = Totals::default();
    let mut by_account: HashMap<Account, i128> = HashMap::new();
    let mut by_job: HashMap<JobId, i128> = HashMap::new();
    let mut owed_by_account: HashMap<Account, i128> = HashMap::new();
    let mut unindexed: std::collections::HashSet<Vec<u8>> = std::collections::HashSet::new();
    for item in reader.scan::<Entry>(Tree::Entries) {
        let (seq, entry) = item?;
        unindexed.insert(account_entry_key(&entry.account.key(), &seq));
        totals.entries += 1;
        let slot = match entry.kind {
            EntryKind::PaymentIn => &mut totals.payment_in_msat,
            EntryKind::Charge => &mut totals.charge_msat,
            EntryKind::RefundCredit => &mut totals.refund_credit_msat,
            EntryKind::Payout => &mut totals.payout_msat,
            EntryKind::Expiry => &mut totals.expiry_msat,
            EntryKind::Reserve => &mut totals.reserve_msat,
            EntryKind::Release => &mut totals.release_msat,
            EntryKind::PayoutPending => &mut totals.payout_pending_msat,
            EntryKind::RoutingFee => &mut totals.routing_fee_msat,
            EntryKind::PayoutFeeReturned => &mut totals.payout_fee_returned_msat,
            EntryKind::PayoutFailed => &mut totals.payout_failed_msat,
            EntryKind::Debt => &mut totals.debt_msat,
            EntryKind::DebtRepaid => &mut totals.debt_repaid_msat,
            EntryKind::TransferOut => &mut totals.transfer_out_msat,
            EntryKind::TransferIn => &mut totals.transfer_in_msat,
        };
        match entry.kind {
            EntryKind::Debt => {
                *owed_by_account.entry(entry.account).or_default() += i128::from(entry.msat)
            }
            EntryKind::DebtRepaid => {
                let owed = owed_by_account.entry(entry.account).or_default();
                *owed -= i128::from(entry.msat);
                if *owed < 0 {
                    return Err(LedgerError::Invariant(format!(
                        "{} repaid {} msat more than it owed",
                        entry.account, -*owed
                    )));
                }
            }
            _ => {}
        }
        *slot = slot.saturating_add(entry.msat);
        *by_account.entry(entry.account).or_default() +=
            i128::from(entry.kind.sign()) * i128::from(entry.msat);
        if let Some(delta) = hold_delta(&entry) {
            let Some(job) = entry.job else {
                return Err(LedgerError::Invariant(format!(
                    "a {:?} entry of {} msat names no job",
                    entry.kind, entry.msat
                )));
            };
            let held = by_job.entry(job).or_default();
            *held += delta;
            if *held < 0 {
                return Err(LedgerError::Invariant(format!(
                    "job {job} released {} msat more than it reserved",
                    -*held
                )));
            }
        }
    }
    if totals.transfer_in_msat != totals.transfer_out_msat {
        return Err(LedgerError::Invariant(format!(
            "transfers: {} msat out, {} msat in",
            totals.transfer_out_msat, totals.transfer_in_msat
        )));
    }
    totals.held_msat = totals
        .reserve_msat
        .checked_sub(totals.release_msat)
        .ok_or_else(|| LedgerError::Invariant("more released than reserved".to_owned()))?;
    let landed = u128::from(totals.payout_msat)
        + u128::from(totals.routing_fee_msat)
        + u128::from(totals.payout_fee_returned_msat)
        + u128::from(totals.payout_failed_msat);
    totals.in_flight_msat = u128::from(totals.payout_pending_msat)
        .checked_sub(landed)
        .and_then(|left| u64::try_from(left).ok())
        .ok_or_else(|| {
            LedgerError::Invariant(format!(
                "payouts: {landed} msat landed (paid, fees, returned, failed) of {} msat put in flight",
                totals.payout_pending_msat
            ))
        })?;
    for item in reader.scan_raw(Tree::Accounts) {
        let (key, raw) = item?;
        let account = Account::from_key(&key).ok_or_else(|| {
            LedgerError::Invariant(format!("bad account key {}", hex::encode(&key)))
        })?;
        let balance = be_u64(&raw)
            .ok_or_else(|| LedgerError::Invariant(format!("bad balance for {account}")))?;
        totals.accounts += 1;
        totals.balances_msat = totals.balances_msat.saturating_add(balance);
        let from_entries = by_account.remove(&account).unwrap_or(0);
        if from_entries != i128::from(balance) {
            return Err(LedgerError::Invariant(format!(
                "{account}: balance {balance} msat, entries sum to {from_entries} msat"
            )));
        }
    }
    totals.receivable_msat = totals
        .debt_msat
        .checked_sub(totals.debt_repaid_msat)
        .ok_or_else(|| {
            LedgerError::Invariant(format!(
                "debts repaid ({} msat) exceed the debts booked ({} msat)",
                totals.debt_repaid_msat, totals.debt_msat
            ))
        })?;
    for item in reader.scan_raw(Tree::Receivables) {
        let (key, raw) = item?;
        let account = Account::from_key(&key).ok_or_else(|| {
            LedgerError::Invariant(format!("bad receivable key {}", hex::encode(&key)))
        })?;
        let owed = be_u64(&raw)
            .ok_or_else(|| LedgerError::Invariant(format!("bad receivable for {account}")))?;
        let from_entries = owed_by_account.remove(&account).unwrap_or(0);
        if from_entries != i128::from(owed) {
            return Err(LedgerError::Invariant(format!(
                "{account}: owes {owed} msat, its debt entries say {from_entries} msat"
            )));
        }
    }
    if let Some((account, owed)) = owed_by_account.into_iter().find(|(_, owed)| *owed != 0) {
        return Err(LedgerError::Invariant(format!(
            "{account}: debt entries say it owes {owed} msat, but no receivable is recorded"
        )));
    }
    for key in reader.keys(Tree::AccountEntries) {
        let key = key?;
        if !unindexed.remove(&key) {
            return Err(LedgerError::Invariant(format!(
                "the account index names entry {} that is not on that account",
                hex::encode(&key)
            )));
        }
    }
    if let Some(key) = unindexed.into_iter().next() {
        return Err(LedgerError::Invariant(format!(
            "entry {} is missing from the account index",
            hex::encode(key)
        )));
    }
    if let Some((account, sum)) = by_account.into_iter().find(|(_, sum)| *sum != 0) {
        return Err(LedgerError::Invariant(format!(
            "{account}: entries sum to {sum} msat but the account has no balance record"
        )));
    }
    let out = u128::from(totals.charge_msat)
        + u128::from(totals.payout_msat)
        + u128::from(totals.routing_fee_msat)
        + u128::from(totals.expiry_msat)
        + u128::from(totals.balances_msat)
        + u128::from(totals.held_msat)
        + u128::from(totals.in_flight_msat);
    if u128::from(totals.payment_in_msat) + u128::from(totals.receivable_msat) != out {
        return Err(LedgerError::Invariant(format!(
            "payments in {} msat + receivable {} != charges {} + payouts {} + routing fees {} + expiries {} + balances {} + held {} + in flight {}",
            totals.payment_in_msat,
            totals.receivable_msat,
            totals.charge_msat,
            totals.payout_msat,
            totals.routing_fee_msat,
            totals.expiry_msat,
            totals.balances_msat,
            totals.held_msat,
            totals.in_flight_msat
        )));
    }
    Ok(totals)
}
