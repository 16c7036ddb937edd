//! The ledger: one account per customer (an npub, or the payment hash of a paid L402 challenge;
//! see [`Account`]), append-only entries, and the invariant check.
//!
//! Amounts are msat. An entry moves money into or out of a customer's spendable balance:
//! `payment_in` (+), `charge` (-), `expiry` (-), `reserve` (-), `release` (+);
//! `refund_credit` is a memo that records what a settled job gave back to the balance.
//!
//! A payout (money sent to the customer over Lightning) is two-phase. `payout_pending` (-)
//! takes the amount plus the most routing fee allowed off the balance, before the wallet is
//! called; the money is *in flight*. When our wallet says the payment succeeded, `payout`
//! (memo) and `routing_fee` (memo) record what left, and `payout_fee_returned` (+) gives back
//! the fee not used; when it says the payment failed, `payout_failed` (+) gives it all back.
//!
//! A job's money is *held* while it runs: a payment for a job is credited (`payment_in`) and
//! reserved for it (`reserve`) in the transaction that makes the job `Paid`, and a job paid from
//! credit reserves its quote the same way. Settlement releases the hold (`release`) and charges
//! what the job cost (`charge`), so the change is spendable again and nothing else can spend
//! money a running job may still be charged. The invariant, checked by `dvmd ledger check` and
//! by the tests after every scenario:
//! `sum(payment_in) = sum(charge) + sum(payout) + sum(routing_fee) + sum(expiry) +
//! sum(balances) + held + in_flight`, where `held = sum(reserve) - sum(release)` and
//! `in_flight` is `sum(payout_pending)` less what landed (`payout`, `routing_fee`,
//! `payout_fee_returned`, `payout_failed`); every account's balance equals the sum of its own
//! entries, no job has more released than it reserved, and nothing more landed than was put in
//! flight.
//!
//! A job run before it is paid (pay-after, for trusted npubs) is charged on credit: `debt` (+)
//! lends the charge to the balance and `charge` (-) takes it, so the account owes it (its
//! *receivable*, kept per account in the `receivables` tree). A payment into an account that
//! owes repays first: `debt_repaid` (-) takes from the balance what the payment brought. With
//! `receivable = sum(debt) - sum(debt_repaid)`, the invariant becomes `sum(payment_in) +
//! receivable = ...` (the rest as above), and each account's receivable equals its own entries.
//!
//! Writes happen only inside the store transactions of `job::book`, so a balance never changes
//! without the job transition that explains it.

use std::collections::HashMap;

mod account;

pub use account::Account;

use crate::job::JobId;
use serde::{Deserialize, Serialize};

use crate::store::{
    account_entry_key, be_u64, Reader, StoreError, Tree, Tx, TxError, TxFailure, ENTRY_SEQUENCE,
};

/// What an entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// A confirmed payment credited to the customer.
    PaymentIn,
    /// What a job cost, taken from the customer's balance.
    Charge,
    /// Memo: what a settled job left on the balance (paid - charged).
    RefundCredit,
    /// Memo: money that reached the customer over Lightning (out of what was in flight).
    Payout,
    /// An unclaimed balance that lapsed to the operator.
    Expiry,
    /// Money set aside from the balance for a job (its payment, or credit it spends).
    Reserve,
    /// A job's hold given back to the balance when it settles or ends unpaid.
    Release,
    /// A payout's amount and its most routing fee, taken off the balance before the wallet is
    /// called (in flight until the wallet says what became of it).
    PayoutPending,
    /// Memo: the routing fee a payout cost (out of what was in flight).
    RoutingFee,
    /// The routing fee a paid payout did not use, back to the balance.
    PayoutFeeReturned,
    /// A payout our wallet says failed: all of it back to the balance.
    PayoutFailed,
    /// A pay-after job's charge lent to the balance (the charge entry beside it takes it): the
    /// account owes it.
    Debt,
    /// What a payment into an account that owes repaid, taken from the balance.
    DebtRepaid,
}

impl EntryKind {
    /// The effect on the account balance: +1, -1, or 0 for memos.
    fn sign(self) -> i8 {
        match self {
            Self::PaymentIn
            | Self::Release
            | Self::PayoutFeeReturned
            | Self::PayoutFailed
            | Self::Debt => 1,
            Self::Charge
            | Self::Expiry
            | Self::Reserve
            | Self::PayoutPending
            | Self::DebtRepaid => -1,
            Self::RefundCredit | Self::Payout | Self::RoutingFee => 0,
        }
    }
}

/// One ledger entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// What happened.
    pub kind: EntryKind,
    /// Whose balance it moves.
    pub account: Account,
    /// Amount in msat (always positive; [`EntryKind`] gives the direction).
    pub msat: u64,
    /// The job it belongs to.
    pub job: Option<JobId>,
    /// The payment hash (hex), for payments in and out.
    pub payment_hash: Option<String>,
    /// Unix seconds.
    pub at: u64,
}

/// Errors of the ledger.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A debit larger than the balance: a bug upstream, refused rather than going negative.
    #[error("ledger: {account} has {balance_msat} msat, cannot debit {msat} msat")]
    Overdraft {
        /// The account.
        account: Account,
        /// Its balance.
        balance_msat: u64,
        /// The refused debit.
        msat: u64,
    },
    /// The invariant does not hold.
    #[error("ledger invariant violated: {0}")]
    Invariant(String),
}

/// Post `entry` under the next ledger sequence number and update the account balance, inside
/// the caller's store transaction.
pub fn post(tx: &Tx<'_>, entry: &Entry) -> Result<(), TxError<LedgerError>> {
    let key = entry.account.key();
    let balance = balance_by_key(tx, &key)?;
    let next = match entry.kind.sign() {
        1 => balance.saturating_add(entry.msat),
        -1 => balance
            .checked_sub(entry.msat)
            .ok_or(TxError::Abort(LedgerError::Overdraft {
                account: entry.account,
                balance_msat: balance,
                msat: entry.msat,
            }))?,
        _ => balance,
    };
    tx.put_raw(Tree::Accounts, &key, &next.to_be_bytes())?;
    let owed_change = match entry.kind {
        EntryKind::Debt => Some(owed_by_key(tx, &key)?.saturating_add(entry.msat)),
        EntryKind::DebtRepaid => Some(owed_by_key(tx, &key)?.checked_sub(entry.msat).ok_or(
            TxError::Abort(LedgerError::Invariant(format!(
                "{} repays {} msat more than it owes",
                entry.account, entry.msat
            ))),
        )?),
        _ => None,
    };
    match owed_change {
        Some(0) => tx.remove(Tree::Receivables, &key)?,
        Some(owed) => tx.put_raw(Tree::Receivables, &key, &owed.to_be_bytes())?,
        None => {}
    }
    let seq = tx.next_sequence(ENTRY_SEQUENCE)?.to_be_bytes();
    tx.put(Tree::Entries, &seq, entry)?;
    tx.put_raw(Tree::AccountEntries, &account_entry_key(&key, &seq), &[])?;
    Ok(())
}

/// The latest `limit` entries of `account`, newest first, with their sequence numbers.
pub fn entries_of(
    reader: &Reader<'_>,
    account: &Account,
    limit: usize,
) -> Result<Vec<(u64, Entry)>, LedgerError> {
    let prefix = account.key();
    let mut entries = Vec::new();
    for key in reader
        .keys_with_prefix_rev(Tree::AccountEntries, &prefix)
        // An npub's 32-byte prefix may begin a token's 33-byte key: the length tells them apart.
        .filter(|key| {
            key.as_ref()
                .map_or(true, |key| key.len() == prefix.len() + 8)
        })
        .take(limit)
    {
        let key = key?;
        let seq = &key[key.len().saturating_sub(8)..];
        let entry = reader.get::<Entry>(Tree::Entries, seq)?.ok_or_else(|| {
            LedgerError::Invariant(format!("{account}: indexed entry {seq:?} is missing"))
        })?;
        entries.push((be_u64(seq).unwrap_or_default(), entry));
    }
    Ok(entries)
}

/// Every entry with its sequence number, oldest first.
pub fn entries(reader: &Reader<'_>) -> Result<Vec<(u64, Entry)>, LedgerError> {
    let mut all = Vec::new();
    for item in reader.scan::<Entry>(Tree::Entries) {
        let (seq, entry) = item?;
        all.push((be_u64(&seq).unwrap_or_default(), entry));
    }
    Ok(all)
}

/// Inside a write: what `account` owes for jobs run before they were paid, msat.
pub fn owed_in(tx: &Tx<'_>, account: &Account) -> Result<u64, TxFailure> {
    owed_by_key(tx, &account.key())
}

fn owed_by_key(tx: &Tx<'_>, key: &[u8]) -> Result<u64, TxFailure> {
    amount_in(tx, Tree::Receivables, key)
}

/// What `account` owes for jobs run before they were paid, msat.
pub fn owed(reader: &Reader<'_>, account: &Account) -> Result<u64, LedgerError> {
    amount(reader, Tree::Receivables, account)
}

/// Inside a write: the amount (8 bytes big endian, none: 0) under `key` in `tree`.
fn amount_in(tx: &Tx<'_>, tree: Tree, key: &[u8]) -> Result<u64, TxFailure> {
    Ok(tx
        .get_raw(tree, key)?
        .and_then(|raw| be_u64(&raw))
        .unwrap_or(0))
}

/// The amount (8 bytes big endian, none: 0) under `account`'s key in `tree`.
fn amount(reader: &Reader<'_>, tree: Tree, account: &Account) -> Result<u64, LedgerError> {
    Ok(reader
        .get_raw(tree, &account.key())?
        .and_then(|raw| be_u64(&raw))
        .unwrap_or(0))
}

/// Inside a write: repay what `account` owes from its balance, as far as the balance goes
/// (a payment just came in). Returns what was repaid and what is still owed.
pub fn repay_in(
    tx: &Tx<'_>,
    account: &Account,
    job: Option<JobId>,
    at: u64,
) -> Result<(u64, u64), TxError<LedgerError>> {
    let owed = owed_in(tx, account)?;
    let repaid = owed.min(balance_in(tx, account)?);
    if repaid > 0 {
        post(
            tx,
            &Entry {
                kind: EntryKind::DebtRepaid,
                account: *account,
                msat: repaid,
                job,
                payment_hash: None,
                at,
            },
        )?;
    }
    Ok((repaid, owed - repaid))
}

/// Inside a write: the spendable balance of `account` in msat.
pub fn balance_in(tx: &Tx<'_>, account: &Account) -> Result<u64, TxFailure> {
    balance_by_key(tx, &account.key())
}

fn balance_by_key(tx: &Tx<'_>, key: &[u8]) -> Result<u64, TxFailure> {
    amount_in(tx, Tree::Accounts, key)
}

/// The spendable balance of `account` in msat (what jobs hold is not part of it).
pub fn balance(reader: &Reader<'_>, account: &Account) -> Result<u64, LedgerError> {
    amount(reader, Tree::Accounts, account)
}

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
    totals.receivable_msat = totals.debt_msat - totals.debt_repaid_msat;
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

#[cfg(test)]
mod tests {
    use nostr_sdk::Keys;

    use super::*;
    use crate::store::Store;

    async fn apply(store: &Store, entry: Entry) -> Result<(), LedgerError> {
        store.commit(move |tx| post(tx, &entry)).await
    }

    fn entry(kind: EntryKind, account: Account, msat: u64) -> Entry {
        Entry {
            kind,
            account,
            msat,
            job: None,
            payment_hash: None,
            at: 0,
        }
    }

    #[tokio::test]
    async fn invariant_holds_through_a_job() -> Result<(), LedgerError> {
        let store = Store::temporary()?;
        let alice = Account::from(Keys::generate().public_key());
        apply(&store, entry(EntryKind::PaymentIn, alice, 10_000)).await?;
        apply(&store, entry(EntryKind::Charge, alice, 7_000)).await?;
        apply(&store, entry(EntryKind::RefundCredit, alice, 3_000)).await?;
        assert_eq!(store.read(move |r| balance(r, &alice)).await?, 3_000);
        let totals = store.read(check).await?;
        assert_eq!(totals.payment_in_msat, 10_000);
        assert_eq!(totals.balances_msat, 3_000);
        assert_eq!(totals.entries, 3);
        Ok(())
    }

    #[tokio::test]
    async fn an_accounts_entries_come_newest_first_and_the_check_covers_the_index(
    ) -> Result<(), LedgerError> {
        let store = Store::temporary()?;
        let alice = Account::from(Keys::generate().public_key());
        let bob = Account::from(Keys::generate().public_key());
        apply(&store, entry(EntryKind::PaymentIn, alice, 1_000)).await?;
        apply(&store, entry(EntryKind::PaymentIn, bob, 2_000)).await?;
        apply(&store, entry(EntryKind::Charge, alice, 400)).await?;
        apply(&store, entry(EntryKind::Charge, alice, 100)).await?;
        let latest = store.read(move |r| entries_of(r, &alice, 2)).await?;
        let amounts: Vec<_> = latest.iter().map(|(seq, e)| (*seq, e.msat)).collect();
        assert_eq!(amounts, vec![(3, 100), (2, 400)]);
        store.read(check).await?;
        // An index key without its entry is caught.
        store
            .commit(move |tx| {
                Ok::<_, TxError<LedgerError>>(tx.put_raw(
                    Tree::AccountEntries,
                    &account_entry_key(&bob.key(), &9u64.to_be_bytes()),
                    &[],
                )?)
            })
            .await?;
        assert!(matches!(
            store.read(check).await,
            Err(LedgerError::Invariant(_))
        ));
        Ok(())
    }

    #[tokio::test]
    async fn a_token_account_keyed_like_an_npub_prefix_keeps_its_entries_apart(
    ) -> Result<(), LedgerError> {
        // An npub whose bytes are the token tag and the first 31 bytes of a payment hash: its
        // 32-byte prefix begins that token's 33-byte keys.
        let npub = loop {
            let key = Keys::generate().public_key();
            if key.to_bytes()[0] == account::TOKEN_TAG {
                break key;
            }
        };
        let mut hash = [0u8; 32];
        hash[..31].copy_from_slice(&npub.to_bytes()[1..]);
        let (npub, token) = (
            Account::from(npub),
            Account::Token(crate::wallet::PaymentHash(hash)),
        );
        assert!(token.key().starts_with(&npub.key()));
        let store = Store::temporary()?;
        apply(&store, entry(EntryKind::PaymentIn, token, 5_000)).await?;
        apply(&store, entry(EntryKind::PaymentIn, npub, 1_000)).await?;
        let (mine, theirs) = store
            .read(move |r| {
                Ok::<_, LedgerError>((entries_of(r, &npub, 10)?, entries_of(r, &token, 10)?))
            })
            .await?;
        assert_eq!(
            mine.iter().map(|(_, e)| e.msat).collect::<Vec<_>>(),
            [1_000]
        );
        assert_eq!(
            theirs.iter().map(|(_, e)| e.msat).collect::<Vec<_>>(),
            [5_000]
        );
        assert_eq!(store.read(move |r| balance(r, &token)).await?, 5_000);
        store.read(check).await?;
        Ok(())
    }

    #[tokio::test]
    async fn overdraft_is_refused_and_changes_nothing() -> Result<(), LedgerError> {
        let store = Store::temporary()?;
        let alice = Account::from(Keys::generate().public_key());
        apply(&store, entry(EntryKind::PaymentIn, alice, 1_000)).await?;
        let err = apply(&store, entry(EntryKind::Charge, alice, 1_001)).await;
        assert!(matches!(err, Err(LedgerError::Overdraft { .. })));
        assert_eq!(store.read(move |r| balance(r, &alice)).await?, 1_000);
        let totals = store.read(check).await?;
        assert_eq!(totals.entries, 1, "the refused debit left no entry");
        Ok(())
    }

    #[tokio::test]
    async fn check_detects_a_tampered_balance() -> Result<(), LedgerError> {
        let store = Store::temporary()?;
        let alice = Account::from(Keys::generate().public_key());
        apply(&store, entry(EntryKind::PaymentIn, alice, 1_000)).await?;
        store
            .commit(move |tx| {
                Ok::<_, TxError<LedgerError>>(tx.put_raw(
                    Tree::Accounts,
                    &alice.key(),
                    &5_000u64.to_be_bytes(),
                )?)
            })
            .await?;
        assert!(matches!(
            store.read(check).await,
            Err(LedgerError::Invariant(_))
        ));
        Ok(())
    }

    #[tokio::test]
    async fn a_debt_is_a_receivable_until_a_payment_repays_it() -> Result<(), LedgerError> {
        let store = Store::temporary()?;
        let alice = Account::from(Keys::generate().public_key());
        // A pay-after job charged 700: lent to the balance, then taken.
        apply(&store, entry(EntryKind::Debt, alice, 700)).await?;
        apply(&store, entry(EntryKind::Charge, alice, 700)).await?;
        let totals = store.read(check).await?;
        assert_eq!((totals.receivable_msat, totals.balances_msat), (700, 0));
        assert_eq!(store.read(move |r| owed(r, &alice)).await?, 700);

        // She pays 500, then 1,000: the debt is repaid first, the rest is her balance.
        for paid in [500, 1_000] {
            store
                .commit(move |tx| {
                    post(tx, &entry(EntryKind::PaymentIn, alice, paid))?;
                    repay_in(tx, &alice, None, 0)
                })
                .await?;
        }
        let totals = store.read(check).await?;
        assert_eq!(
            (
                totals.receivable_msat,
                totals.debt_repaid_msat,
                totals.balances_msat
            ),
            (0, 700, 800)
        );
        assert_eq!(store.read(move |r| owed(r, &alice)).await?, 0);

        // A receivable that its entries do not explain is caught.
        store
            .commit(move |tx| {
                Ok::<_, TxError<LedgerError>>(tx.put_raw(
                    Tree::Receivables,
                    &alice.key(),
                    &5u64.to_be_bytes(),
                )?)
            })
            .await?;
        assert!(matches!(
            store.read(check).await,
            Err(LedgerError::Invariant(_))
        ));
        Ok(())
    }
}
