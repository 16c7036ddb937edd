//! Automatic payouts: change and refunds sent home to an npub that opted in
//! (`POST /v1/account/settings {"auto_payout": true}`).
//!
//! What goes home is what the npub paid for jobs over Lightning and did not use: the change of
//! a job paid by invoice or zap, and the whole payment of a job that failed. Credit it topped
//! up, and the change of jobs paid from that credit, stay (the npub put them there to spend).
//! It counts from the opt-in (or the last automatic payout) and goes out when:
//!
//! - the account has been idle (no ledger entry) for `auto_payout_idle_days`;
//! - what is owed is at least `auto_payout_min_msat` (default: 200 times the flat part of the
//!   most routing fee, so the fee costs at most 0.5% plus its proportional part; see
//!   `nips/dvmd-5050.md`);
//! - the npub's kind 0 profile, read from our relays, names a Lightning address (`lud16`).
//!
//! It is paid like any withdrawal ([`super::payouts`]), in whole sats rounded down, never more
//! than the balance less the most fee. The sweep runs every hour; `now` is a parameter so the
//! tests can move the clock.

use nostr_sdk::{Filter, Kind, PublicKey, Timestamp};
use serde::{Deserialize, Serialize};

use super::book::{Book, BookError};
use super::payouts::{PayoutRefusal, Target};
use super::pipeline::Pipeline;
use crate::ledger::{self, Account, EntryKind};
use crate::store::{Tree, TxError, ENTRY_SEQUENCE};

/// An account's settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountSettings {
    /// Send change and refunds home automatically.
    pub auto_payout: bool,
    /// Ledger entries up to this sequence number were counted already (the opt-in, or the
    /// last automatic payout).
    #[serde(default)]
    pub counted_to_seq: u64,
}

/// When the sweep pays out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoPayoutPolicy {
    /// Days without a ledger entry before an account's change goes home.
    pub idle_days: u64,
    /// The least worth sending, msat.
    pub min_msat: u64,
}

impl Book {
    /// An account's settings (the defaults when it has none).
    pub async fn settings(&self, account: Account) -> Result<AccountSettings, BookError> {
        self.store()
            .read(move |r| {
                Ok(r.get(Tree::AccountSettings, &account.key())?
                    .unwrap_or_default())
            })
            .await
    }

    /// Opt `account` in or out of automatic payouts; counting starts now.
    pub async fn set_auto_payout(
        &self,
        account: Account,
        on: bool,
    ) -> Result<AccountSettings, BookError> {
        self.store()
            .commit(move |tx| {
                let next = tx
                    .get_raw(Tree::Meta, ENTRY_SEQUENCE)?
                    .and_then(|raw| crate::store::be_u64(&raw))
                    .unwrap_or(0);
                let mut settings: AccountSettings = tx
                    .get(Tree::AccountSettings, &account.key())?
                    .unwrap_or_default();
                if settings.auto_payout != on {
                    settings = AccountSettings {
                        auto_payout: on,
                        counted_to_seq: next,
                    };
                    tx.put(Tree::AccountSettings, &account.key(), &settings)?;
                }
                Ok::<_, TxError<BookError>>(settings)
            })
            .await
    }

    /// Accounts that opted in.
    async fn opted_in(&self) -> Result<Vec<(Account, AccountSettings)>, BookError> {
        self.store()
            .read(|r| {
                let mut all = Vec::new();
                for item in r.scan_raw(Tree::AccountSettings) {
                    let (key, raw) = item?;
                    let settings: AccountSettings =
                        crate::store::decode(Tree::AccountSettings.name(), &raw)?;
                    if let (true, Some(account)) = (settings.auto_payout, Account::from_key(&key)) {
                        all.push((account, settings));
                    }
                }
                Ok(all)
            })
            .await
    }

    /// What `account` is owed home since its settings last counted, and when it last moved:
    /// (owed msat, newest entry's time, newest sequence number).
    async fn owed_home(
        &self,
        account: Account,
        counted_to: u64,
    ) -> Result<(u64, u64, u64), BookError> {
        self.store()
            .read(move |r| {
                let (mut owed, mut last_at, mut newest) = (0u64, 0u64, counted_to);
                // Newest first; an account's history since the last payout is short.
                for (seq, entry) in ledger::entries_of(r, &account, usize::MAX)? {
                    last_at = last_at.max(entry.at);
                    newest = newest.max(seq + 1);
                    if seq < counted_to {
                        break;
                    }
                    if entry.kind != EntryKind::RefundCredit {
                        continue;
                    }
                    let Some(id) = entry.job else { continue };
                    let Some(job) = super::book::read_job(r, &id)? else {
                        continue;
                    };
                    if job.payer() == account && job.paid_msat > 0 {
                        let charged = job.charge_msat.unwrap_or(0).min(job.paid_msat);
                        owed = owed.saturating_add(job.paid_msat - charged);
                    }
                }
                Ok((owed, last_at, newest))
            })
            .await
    }

    /// Count `account`'s entries up to `seq` as done.
    /// Ledger entries of `account` up to `seq` are counted, durably.
    async fn counted(&self, account: Account, seq: u64) -> Result<(), BookError> {
        self.store()
            .commit(move |tx| {
                let mut settings: AccountSettings = tx
                    .get(Tree::AccountSettings, &account.key())?
                    .unwrap_or_default();
                settings.counted_to_seq = settings.counted_to_seq.max(seq);
                tx.put(Tree::AccountSettings, &account.key(), &settings)?;
                Ok::<_, TxError<BookError>>(())
            })
            .await
    }

    /// Undo [`Book::counted`] of `seq` for a payout never booked: back to `before`, unless
    /// something counted further since.
    async fn uncount(&self, account: Account, seq: u64, before: u64) -> Result<(), BookError> {
        self.store()
            .apply(move |tx| {
                let mut settings: AccountSettings = tx
                    .get(Tree::AccountSettings, &account.key())?
                    .unwrap_or_default();
                if settings.counted_to_seq == seq {
                    settings.counted_to_seq = before;
                    tx.put(Tree::AccountSettings, &account.key(), &settings)?;
                }
                Ok::<_, TxError<BookError>>(())
            })
            .await
    }
}

/// The `lud16` of a kind 0 profile's content.
pub fn lud16_of(profile_json: &str) -> Option<String> {
    let profile: serde_json::Value = serde_json::from_str(profile_json).ok()?;
    let address = profile["lud16"].as_str()?.trim();
    (address.contains('@') && address.len() <= 320).then(|| address.to_owned())
}

impl Pipeline {
    /// The Lightning address in `npub`'s newest kind 0 profile on our relays.
    async fn lightning_address_of(&self, npub: PublicKey) -> Option<String> {
        let filter = Filter::new().author(npub).kind(Kind::Metadata);
        let relays = self.inner.outbox.relays();
        let profiles = relays.fetch(&filter, Timestamp::from(0), None).await.ok()?;
        let newest = profiles.iter().max_by_key(|p| p.created_at)?;
        lud16_of(&newest.content)
    }

    /// One sweep: send every opted-in, idle account's change home. Returns how many payouts
    /// were made.
    pub async fn auto_payouts(&self, policy: AutoPayoutPolicy, now: u64) -> usize {
        let book = &self.inner.book;
        let accounts = match book.opted_in().await {
            Ok(accounts) => accounts,
            Err(e) => {
                tracing::error!(error = %e, "cannot list automatic payouts");
                return 0;
            }
        };
        let mut paid = 0;
        for (account, settings) in accounts {
            match self.auto_payout(account, settings, policy, now).await {
                Ok(true) => paid += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(account = %account, error = %e, "automatic payout not made")
                }
            }
        }
        paid
    }

    async fn auto_payout(
        &self,
        account: Account,
        settings: AccountSettings,
        policy: AutoPayoutPolicy,
        now: u64,
    ) -> Result<bool, PayoutRefusal> {
        let Some(npub) = account.npub() else {
            return Ok(false);
        };
        let book = &self.inner.book;
        let (owed, last_at, newest) = book.owed_home(account, settings.counted_to_seq).await?;
        let idle = now.saturating_sub(last_at) >= policy.idle_days * 24 * 60 * 60;
        if !idle || owed < policy.min_msat {
            return Ok(false);
        }
        let Some(address) = self.lightning_address_of(npub).await else {
            tracing::info!(account = %account, owed, "automatic payout waits for a lud16 in the profile");
            return Ok(false);
        };
        let balance = self.balance_of(account).await?;
        let fee = self.inner.config.payout_fee.max_for(balance);
        let amount = owed.min(balance.saturating_sub(fee)) / 1000 * 1000;
        if amount < policy.min_msat.max(1000) {
            return Ok(false);
        }
        let target = Target::Address {
            address: address.clone(),
            amount_msat: Some(amount),
        };
        // Counted before the payout is booked, durably: the payout's side effect (the wallet
        // pays) comes after its booking, and a daemon that dies while the wallet pays (counted
        // after it, as it was) counted the same change again at the next idle sweep and sent it
        // a second time, out of the credit that stays. Counted, then stopped before the booking,
        // the change stays on the balance, the npub's to spend or withdraw.
        book.counted(account, newest).await?;
        let payout = match self.payer().pay_out(account, target).await {
            Ok(payout) => payout,
            // Nothing booked (the address did not answer, the balance moved): uncounted, so the
            // next sweep tries again. A store error may come after the booking: counted stays.
            Err(
                refused @ (PayoutRefusal::Invoice(_)
                | PayoutRefusal::Balance { .. }
                | PayoutRefusal::Hash(_)
                | PayoutRefusal::Signed),
            ) => {
                book.uncount(account, newest, settings.counted_to_seq)
                    .await?;
                return Err(refused);
            }
            Err(e) => return Err(e),
        };
        // Booked: counted, whatever the wallet says. A payout that fails gives the amount back
        // to the balance, where it stays for the npub to spend or withdraw, rather than being
        // retried every hour.
        tracing::info!(account = %account, address = %address, amount, state = ?payout.state, "automatic payout");
        Ok(true)
    }
}

impl Book {
    /// Unclaimed credit: every balance whose account has had no ledger entry for
    /// `after_days` lapses to the operator, each as an `expiry` entry (never silently).
    /// Returns the accounts and amounts expired.
    pub async fn expire_credit(
        &self,
        after_days: u64,
        now: u64,
    ) -> Result<Vec<(Account, u64)>, BookError> {
        let idle = self.idle_credit(after_days, now).await?;
        self.expire_idle(idle, after_days, now).await
    }

    /// The accounts with a balance and no ledger entry for `after_days`, with the balance each
    /// had when read.
    async fn idle_credit(
        &self,
        after_days: u64,
        now: u64,
    ) -> Result<Vec<(Account, u64)>, BookError> {
        let cutoff = now.saturating_sub(after_days.saturating_mul(24 * 60 * 60));
        self.store()
            .read(move |r| {
                let mut idle = Vec::new();
                for item in r.scan_raw(Tree::Accounts) {
                    let (key, raw) = item?;
                    let balance = crate::store::be_u64(&raw).unwrap_or(0);
                    let Some(account) = Account::from_key(&key) else {
                        continue;
                    };
                    if balance == 0 {
                        continue;
                    }
                    let last = ledger::entries_of(r, &account, 1)?;
                    if last.first().is_some_and(|(_, entry)| entry.at < cutoff) {
                        idle.push((account, balance));
                    }
                }
                Ok::<_, BookError>(idle)
            })
            .await
    }

    /// Expire what [`Book::idle_credit`] found, an account a write. Each is looked at again
    /// inside its write (the writes before it take time): a balance that moved since the scan
    /// had an entry since (a late payment, a zap), so the account is not idle, and what came
    /// in is never taken with the rest.
    async fn expire_idle(
        &self,
        idle: Vec<(Account, u64)>,
        after_days: u64,
        now: u64,
    ) -> Result<Vec<(Account, u64)>, BookError> {
        let mut expired = Vec::new();
        for (account, seen) in idle {
            let lapsed = self
                .store()
                .commit(move |tx| {
                    let balance = ledger::balance_in(tx, &account)?;
                    if balance == 0 || balance != seen {
                        return Ok(0);
                    }
                    // What the account owes is repaid first: only the rest lapses.
                    super::settle::repay_owed_in(tx, &account, None, now)?;
                    let balance = ledger::balance_in(tx, &account)?;
                    if balance == 0 {
                        return Ok(0);
                    }
                    let entry = ledger::Entry {
                        kind: EntryKind::Expiry,
                        account,
                        msat: balance,
                        job: None,
                        payment_hash: None,
                        at: now,
                    };
                    ledger::post(tx, &entry).map_err(|e| e.map_abort(BookError::Ledger))?;
                    Ok::<_, TxError<BookError>>(balance)
                })
                .await?;
            if lapsed > 0 {
                tracing::warn!(account = %account, msat = lapsed, after_days, "unclaimed credit expired");
                expired.push((account, lapsed));
            }
        }
        Ok(expired)
    }
}

impl Pipeline {
    /// Every hour until `cancel` fires: automatic payouts, then (when the operator set an
    /// expiry) unclaimed credit, then every npub's tier again (time alone promotes) with the
    /// labels of any change, then the records of jobs that ended without money
    /// ([`Book::prune_unpaid`](super::book::Book::prune_unpaid)).
    pub async fn run_auto_payouts(self, cancel: tokio_util::sync::CancellationToken) {
        let policy = self.inner.config.auto_payout;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(std::time::Duration::from_secs(60 * 60)) => {}
            }
            let now = super::pipeline::unix_now();
            self.auto_payouts(policy, now).await;
            if let Some(days) = self.inner.config.credit_expiry_days {
                if let Err(e) = self.inner.book.expire_credit(days, now).await {
                    tracing::error!(error = %e, "cannot expire unclaimed credit");
                }
            }
            self.publish_unlabelled().await;
            if let Some(policy) = self.inner.config.prune {
                match self.inner.book.prune_unpaid(now, policy).await {
                    Ok(pass) if pass.removed > 0 => {
                        tracing::info!(
                            removed = pass.removed,
                            read = pass.scanned,
                            "pruned jobs that ended without money"
                        );
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "cannot prune ended jobs"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::book::tests::{balance, book, top_up, totals};
    use nostr_sdk::Keys;

    #[tokio::test]
    async fn unclaimed_credit_expires_as_entries_after_the_idle_period_only() {
        let book = book();
        let (alice, bob) = (Keys::generate().public_key(), Keys::generate().public_key());
        top_up(&book, alice, 1, 5_000).await;
        top_up(&book, bob, 2, 7_000).await;
        let now = crate::job::pipeline::unix_now();
        let day = 24 * 60 * 60;
        assert!(book
            .expire_credit(30, now + 29 * day)
            .await
            .expect("sweep")
            .is_empty());
        let expired = book.expire_credit(30, now + 31 * day).await.expect("sweep");
        assert_eq!(expired.len(), 2);
        assert_eq!(balance(&book, alice).await, 0);
        let totals = totals(&book).await;
        assert_eq!((totals.expiry_msat, totals.balances_msat), (12_000, 0));
    }

    /// A payment booked between the sweep's scan and an account's expiry write is never taken
    /// with the idle balance: the account had an entry since, so it is not idle. (Before, the
    /// write expired whatever the balance held by then.)
    #[tokio::test]
    async fn a_payment_that_lands_during_the_sweep_is_not_expired() {
        let book = book();
        let (alice, bob) = (Keys::generate().public_key(), Keys::generate().public_key());
        top_up(&book, alice, 1, 5_000).await;
        top_up(&book, bob, 2, 7_000).await;
        let later = crate::job::pipeline::unix_now() + 31 * 24 * 60 * 60;
        let idle = book.idle_credit(30, later).await.expect("scan");
        assert_eq!(idle.len(), 2);
        top_up(&book, alice, 3, 1_000).await;
        let expired = book.expire_idle(idle, 30, later).await.expect("sweep");
        assert_eq!(expired, vec![(Account::from(bob), 7_000)]);
        assert_eq!(balance(&book, alice).await, 6_000);
        assert_eq!(totals(&book).await.expiry_msat, 7_000);
    }

    /// An idle balance whose account owes (a pay-after debt) repays it before the rest
    /// lapses: the operator is owed that part, and expiring all of it left the debt standing.
    #[tokio::test]
    async fn an_idle_balance_repays_its_debt_before_it_expires() {
        use crate::job::book::tests::{owe, owed};
        let book = book();
        let alice = Account::from(Keys::generate().public_key());
        top_up(&book, alice, 1, 5_000).await;
        owe(&book, alice, 2_000).await;
        let later = crate::job::pipeline::unix_now() + 31 * 24 * 60 * 60;
        let expired = book.expire_credit(30, later).await.expect("sweep");
        assert_eq!(expired, vec![(alice, 3_000)]);
        assert_eq!(
            (owed(&book, alice).await, balance(&book, alice).await),
            (0, 0)
        );
        let totals = totals(&book).await;
        assert_eq!(
            (totals.expiry_msat, totals.debt_repaid_msat),
            (3_000, 2_000)
        );
    }

    #[test]
    fn reads_the_lightning_address_of_a_profile() {
        assert_eq!(
            lud16_of(r#"{"name":"a","lud16":"alice@example.com"}"#).as_deref(),
            Some("alice@example.com")
        );
        assert_eq!(lud16_of(r#"{"name":"a"}"#), None);
        assert_eq!(lud16_of(r#"{"lud16":"not an address"}"#), None);
        assert_eq!(lud16_of("not json"), None);
    }
}
