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
//! A transfer moves a balance between two accounts of one customer: `transfer_out` (-) and
//! `transfer_in` (+) of the same amount, in one write; the check requires their sums equal.
//!
//! Writes happen only inside the store transactions of `job::book`, so a balance never changes
//! without the job transition that explains it.

mod account;
mod check;

pub use account::Account;
pub use check::{check, holds, Totals};

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
    /// Money moved to another account of the same customer (an HTTP `Payment` session's top-up:
    /// the top-up invoice's account to the session's); a `transfer_in` of the same amount
    /// beside it, in the same write.
    TransferOut,
    /// Money moved in from another account of the same customer (see `transfer_out`).
    TransferIn,
}

impl EntryKind {
    /// The effect on the account balance: +1, -1, or 0 for memos.
    fn sign(self) -> i8 {
        match self {
            Self::PaymentIn
            | Self::Release
            | Self::PayoutFeeReturned
            | Self::PayoutFailed
            | Self::Debt
            | Self::TransferIn => 1,
            Self::Charge
            | Self::Expiry
            | Self::Reserve
            | Self::PayoutPending
            | Self::DebtRepaid
            | Self::TransferOut => -1,
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
