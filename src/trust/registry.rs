//! [`Trust`]: every npub's tier in memory (for the screening intake does without IO), backed by
//! the standings in the store.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Instant;

use nostr_sdk::{Event, PublicKey};

use super::{PublishedLabel, Standing, Tier, TrustPolicy};
use crate::limits::TokenBucket;
use crate::store::{Store, StoreError, Tree, Tx, TxFailure};

/// Errors of the trust registry.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a request is refused before any work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The operator blocked the npub.
    Blocked,
    /// A `new` npub's request has less proof of work than asked.
    Pow {
        /// Leading zero bits asked.
        needed: u8,
        /// Leading zero bits the request id has.
        found: u8,
    },
}

/// Which tier label to publish for an npub, and which one it supersedes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierChange {
    /// The npub.
    pub npub: PublicKey,
    /// Its tier now.
    pub tier: Tier,
    /// The label published before, to delete once the new one is out.
    pub superseded: Option<PublishedLabel>,
}

/// Every npub's tier (see the module docs of [`crate::trust`]). Cheap to share behind an `Arc`.
pub struct Trust {
    policy: TrustPolicy,
    store: Store,
    /// The tier of every npub that is not `new`.
    tiers: RwLock<HashMap<PublicKey, Tier>>,
    /// Held from reading standings to putting their tiers in `tiers` ([`Trust::set`],
    /// [`Trust::refresh`], [`Trust::reload`]): without it a reload that read the store before
    /// an operator's `set` could put the old tier back after it, until the next refresh.
    updating: tokio::sync::Mutex<()>,
    /// The requests all `new` npubs share.
    new_keys: TokenBucket,
}

/// Inside a job's settlement: count a job `npub` paid `msat` for.
pub fn settled_in(tx: &Tx<'_>, npub: &PublicKey, msat: u64, at: u64) -> Result<(), TxFailure> {
    if msat == 0 {
        return Ok(());
    }
    let key = npub.to_bytes();
    let mut standing: Standing = tx.get(Tree::Trust, &key)?.unwrap_or_default();
    standing.settled(msat, at);
    tx.put(Tree::Trust, &key, &standing)
}

/// Inside the write that starts a pay-after job of `npub` that may owe up to `limit`: whether
/// what it owes (`owed`), what its running pay-after jobs may owe, and `limit` stay within
/// `credit`; if so the job's limit is counted as open.
pub fn open_pay_after_in(
    tx: &Tx<'_>,
    npub: &PublicKey,
    limit: u64,
    owed: u64,
    credit: u64,
) -> Result<bool, TxFailure> {
    let key = npub.to_bytes();
    let mut standing: Standing = tx.get(Tree::Trust, &key)?.unwrap_or_default();
    let exposure = owed
        .saturating_add(standing.pay_after_open_msat)
        .saturating_add(limit);
    if exposure > credit {
        return Ok(false);
    }
    standing.pay_after_open_msat += limit;
    tx.put(Tree::Trust, &key, &standing)?;
    Ok(true)
}

/// Inside the write that settles a pay-after job of `npub` opened with `limit`: it is no longer
/// open, and if `npub` now owes something, it owes from `at` (if it did not already).
pub fn close_pay_after_in(
    tx: &Tx<'_>,
    npub: &PublicKey,
    limit: u64,
    owes: bool,
    at: u64,
) -> Result<(), TxFailure> {
    let key = npub.to_bytes();
    let mut standing: Standing = tx.get(Tree::Trust, &key)?.unwrap_or_default();
    standing.pay_after_open_msat = standing.pay_after_open_msat.saturating_sub(limit);
    if owes {
        standing.owed_since.get_or_insert(at);
    }
    tx.put(Tree::Trust, &key, &standing)
}

/// Inside the write that repaid the last of what `npub` owed: it owes nothing now.
pub fn debt_cleared_in(tx: &Tx<'_>, npub: &PublicKey) -> Result<(), TxFailure> {
    let key = npub.to_bytes();
    if let Some(mut standing) = tx.get::<Standing>(Tree::Trust, &key)? {
        if standing.owed_since.take().is_some() {
            tx.put(Tree::Trust, &key, &standing)?;
        }
    }
    Ok(())
}

impl Trust {
    /// The registry over `store`, with every standing read into memory.
    pub async fn load(store: Store, policy: TrustPolicy, now: u64) -> Result<Self, TrustError> {
        let standings = all(&store).await?;
        let tiers = standings
            .iter()
            .map(|(npub, standing)| (*npub, standing.tier(&policy.thresholds, now)))
            .filter(|(_, tier)| *tier != Tier::New)
            .collect();
        Ok(Self {
            new_keys: TokenBucket::per_minute(policy.new_requests_per_minute),
            policy,
            store,
            tiers: RwLock::new(tiers),
            updating: tokio::sync::Mutex::new(()),
        })
    }

    /// The policy.
    pub fn policy(&self) -> &TrustPolicy {
        &self.policy
    }

    /// `npub`'s tier, from memory.
    pub fn tier(&self, npub: &PublicKey) -> Tier {
        self.tiers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(npub)
            .copied()
            .unwrap_or(Tier::New)
    }

    /// Screen a job request before anything is stored (no IO): blocked npubs are refused, and a
    /// `new` npub's request must carry the proof of work asked. Returns the author's tier.
    pub fn screen(&self, request: &Event) -> Result<Tier, Refusal> {
        let tier = self.tier(&request.pubkey);
        match tier {
            Tier::Blocked => Err(Refusal::Blocked),
            Tier::New => {
                let needed = self.policy.new_min_pow;
                if needed > 0 && !request.id.check_pow(needed) {
                    let found =
                        nostr_sdk::nips::nip13::get_leading_zero_bits(request.id.as_bytes());
                    return Err(Refusal::Pow { needed, found });
                }
                Ok(tier)
            }
            _ => Ok(tier),
        }
    }

    /// Take one of the requests all `new` npubs share, if there is one left (`known` and
    /// `trusted` npubs never draw on it: the capacity they rely on is theirs).
    pub fn take_new_key_slot(&self, now: Instant) -> bool {
        self.new_keys.try_take_at(now)
    }

    /// Read every standing again and work out each tier at `now` (time alone can promote).
    pub async fn reload(&self, now: u64) -> Result<(), TrustError> {
        let _updating = self.updating.lock().await;
        let thresholds = self.policy.thresholds;
        let tiers: HashMap<PublicKey, Tier> = all(&self.store)
            .await?
            .iter()
            .map(|(npub, standing)| (*npub, standing.tier(&thresholds, now)))
            .filter(|(_, tier)| *tier != Tier::New)
            .collect();
        *self.tiers.write().unwrap_or_else(|e| e.into_inner()) = tiers;
        Ok(())
    }

    /// `npub`'s standing as stored.
    pub async fn standing(&self, npub: &PublicKey) -> Result<Standing, TrustError> {
        let key = npub.to_bytes();
        Ok(self
            .store
            .read(move |r| r.get::<Standing>(Tree::Trust, &key))
            .await?
            .unwrap_or_default())
    }

    /// Every npub with a standing, with its tier at `now`.
    pub async fn all(&self, now: u64) -> Result<Vec<(PublicKey, Standing, Tier)>, TrustError> {
        let thresholds = self.policy.thresholds;
        Ok(all(&self.store)
            .await?
            .into_iter()
            .map(|(npub, standing)| {
                let tier = standing.tier(&thresholds, now);
                (npub, standing, tier)
            })
            .collect())
    }

    /// Work out `npub`'s tier again from its stored standing (after a settlement or the
    /// operator's change) and keep it in memory. Returns the label to publish when the tier
    /// differs from the one last labelled (no label counts as `new`).
    pub async fn refresh(
        &self,
        npub: &PublicKey,
        now: u64,
    ) -> Result<Option<TierChange>, TrustError> {
        let _updating = self.updating.lock().await;
        let standing = self.standing(npub).await?;
        Ok(self.remember(npub, &standing, now))
    }

    fn remember(&self, npub: &PublicKey, standing: &Standing, now: u64) -> Option<TierChange> {
        let tier = standing.tier(&self.policy.thresholds, now);
        {
            let mut tiers = self.tiers.write().unwrap_or_else(|e| e.into_inner());
            if tier == Tier::New {
                tiers.remove(npub);
            } else {
                tiers.insert(*npub, tier);
            }
        }
        change(npub, standing, tier)
    }

    /// Set the operator's word on `npub` (`None` leaves it to history), durably. Returns the
    /// standing and the label to publish, if the tier changed.
    pub async fn set(
        &self,
        npub: &PublicKey,
        setting: Option<Tier>,
        now: u64,
    ) -> Result<(Standing, Option<TierChange>), TrustError> {
        let _updating = self.updating.lock().await;
        let key = npub.to_bytes();
        let standing = self
            .store
            .commit(move |tx| {
                let mut standing: Standing = tx.get(Tree::Trust, &key)?.unwrap_or_default();
                standing.operator = setting;
                tx.put(Tree::Trust, &key, &standing)?;
                Ok::<_, crate::store::TxError<TrustError>>(standing)
            })
            .await?;
        let change = self.remember(npub, &standing, now);
        Ok((standing, change))
    }

    /// Record that `label` now states `npub`'s tier.
    pub async fn labelled(
        &self,
        npub: &PublicKey,
        label: PublishedLabel,
    ) -> Result<(), TrustError> {
        let key = npub.to_bytes();
        self.store
            .apply(move |tx| {
                let mut standing: Standing = tx.get(Tree::Trust, &key)?.unwrap_or_default();
                standing.label = Some(label.clone());
                tx.put(Tree::Trust, &key, &standing)?;
                Ok::<_, crate::store::TxError<TrustError>>(())
            })
            .await
    }

    /// The labels not published yet: every npub whose tier at `now` is not the one its last
    /// label states (after a restart, a changed threshold, or a change whose label did not go
    /// out).
    pub async fn unlabelled(&self, now: u64) -> Result<Vec<TierChange>, TrustError> {
        Ok(self
            .all(now)
            .await?
            .into_iter()
            .filter_map(|(npub, standing, tier)| change(&npub, &standing, tier))
            .collect())
    }
}

/// The label to publish if `tier` is not what `standing`'s last label states.
fn change(npub: &PublicKey, standing: &Standing, tier: Tier) -> Option<TierChange> {
    let labelled = standing
        .label
        .as_ref()
        .map_or(Tier::New, |label| label.tier);
    (labelled != tier).then(|| TierChange {
        npub: *npub,
        tier,
        superseded: standing.label.clone(),
    })
}

async fn all(store: &Store) -> Result<Vec<(PublicKey, Standing)>, StoreError> {
    store
        .read(|r| {
            let mut standings = Vec::new();
            for item in r.scan::<Standing>(Tree::Trust) {
                let (key, standing) = item?;
                if let Ok(npub) = PublicKey::from_slice(&key) {
                    standings.push((npub, standing));
                }
            }
            Ok(standings)
        })
        .await
}

#[cfg(test)]
mod tests {
    use nostr_sdk::{EventBuilder, Keys, Kind};

    use super::*;
    use crate::trust::Thresholds;

    fn policy() -> TrustPolicy {
        TrustPolicy {
            thresholds: Thresholds {
                known_paid_msat: 1_000,
                known_jobs: 1,
                ..Thresholds::default()
            },
            new_min_pow: 0,
            new_requests_per_minute: 2,
            trusted_credit_msat: 100_000,
            new_max_open_invoices: 1_500,
            publish_labels: true,
            publish_job_labels: true,
            allowlisted_free: true,
        }
    }

    fn request(keys: &Keys, pow: u8) -> Event {
        EventBuilder::new(Kind::from(5050), "")
            .pow(pow)
            .sign_with_keys(keys)
            .expect("sign")
    }

    #[tokio::test]
    async fn a_settlement_promotes_and_the_operator_blocks_and_both_ask_for_a_label() {
        let store = Store::temporary().expect("store");
        let trust = Trust::load(store.clone(), policy(), 0).await.expect("load");
        let alice_keys = Keys::generate();
        let alice = alice_keys.public_key();
        assert_eq!(trust.tier(&alice), Tier::New);
        store
            .commit(move |tx| {
                settled_in(tx, &alice, 1_500, 10)?;
                Ok::<_, crate::store::TxError<TrustError>>(())
            })
            .await
            .expect("settle");
        let change = trust
            .refresh(&alice, 20)
            .await
            .expect("refresh")
            .expect("changed");
        assert_eq!(
            (change.tier, change.superseded.clone()),
            (Tier::Known, None)
        );
        assert_eq!(trust.tier(&alice), Tier::Known);
        let label = PublishedLabel {
            id: "aa".repeat(32),
            tier: Tier::Known,
            created_at: 20,
        };
        trust
            .labelled(&alice, label.clone())
            .await
            .expect("labelled");
        assert_eq!(trust.refresh(&alice, 30).await.expect("refresh"), None);
        assert!(trust.unlabelled(30).await.expect("unlabelled").is_empty());

        let (standing, change) = trust
            .set(&alice, Some(Tier::Blocked), 40)
            .await
            .expect("set");
        assert_eq!(standing.paid_msat, 1_500, "history is kept");
        assert_eq!(change.expect("changed").superseded, Some(label));
        assert_eq!(trust.tier(&alice), Tier::Blocked);
        assert_eq!(
            trust.screen(&request(&alice_keys, 0)),
            Err(Refusal::Blocked)
        );
        assert_eq!(trust.screen(&request(&Keys::generate(), 0)), Ok(Tier::New));

        // Time alone promotes: bob has paid what `trusted` asks, but not for long enough yet.
        let aged = TrustPolicy {
            thresholds: Thresholds {
                trusted_paid_msat: 1_000,
                trusted_jobs: 1,
                trusted_age_secs: 100,
                ..policy().thresholds
            },
            ..policy()
        };
        let bob = Keys::generate().public_key();
        store
            .commit(move |tx| {
                settled_in(tx, &bob, 1_500, 10)?;
                Ok::<_, crate::store::TxError<TrustError>>(())
            })
            .await
            .expect("settle");
        let later = Trust::load(store.clone(), aged, 20).await.expect("load");
        assert_eq!(later.tier(&bob), Tier::Known);
        later.reload(110).await.expect("reload");
        assert_eq!(later.tier(&bob), Tier::Trusted, "a week (here 100 s) later");

        // A restart reads it all back.
        let again = Trust::load(store, policy(), 50).await.expect("load");
        assert_eq!(again.tier(&alice), Tier::Blocked);
        assert_eq!(again.unlabelled(50).await.expect("unlabelled").len(), 2);
    }

    #[tokio::test]
    async fn new_keys_show_their_work_and_share_one_bucket() {
        let store = Store::temporary().expect("store");
        let trust = Trust::load(
            store,
            TrustPolicy {
                new_min_pow: 8,
                ..policy()
            },
            0,
        )
        .await
        .expect("load");
        let now = Instant::now();
        let lazy = loop {
            // A request id with fewer than 8 leading zero bits (255 in 256 are).
            let event = request(&Keys::generate(), 0);
            if !event.id.check_pow(8) {
                break event;
            }
        };
        assert!(matches!(
            trust.screen(&lazy),
            Err(Refusal::Pow { needed: 8, found }) if found < 8
        ));
        assert_eq!(trust.screen(&request(&Keys::generate(), 8)), Ok(Tier::New));
        assert!(trust.take_new_key_slot(now) && trust.take_new_key_slot(now));
        assert!(
            !trust.take_new_key_slot(now),
            "two a minute for all new keys together"
        );
    }

    /// The hourly reload reads every standing, then replaces the tiers in memory: an
    /// operator's `set` landing between the two must not be undone by it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reload_never_puts_back_a_tier_the_operator_changed_meanwhile() {
        let store = Store::temporary().expect("store");
        let trust = std::sync::Arc::new(Trust::load(store, policy(), 0).await.expect("load"));
        let alice = Keys::generate().public_key();
        for round in 0..300u32 {
            let tier = if round % 2 == 0 {
                Tier::Trusted
            } else {
                Tier::Blocked
            };
            let reloading = {
                let trust = trust.clone();
                tokio::spawn(async move { trust.reload(0).await })
            };
            tokio::task::yield_now().await;
            trust.set(&alice, Some(tier), 0).await.expect("set");
            reloading.await.expect("join").expect("reload");
            assert_eq!(trust.tier(&alice), tier, "round {round}");
        }
    }
}
