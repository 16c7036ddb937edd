//! Schema migrations: old stores open as the current schema with their records as they were,
//! and an unknown schema is refused.

use super::*;

#[test]
fn a_version_1_store_is_migrated() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        // A store as schema 1 left it: payment records, no index, entries numbered by sled.
        let db = raw_db(dir.path());
        let meta = db.open_tree("meta").expect("meta");
        meta.insert(META_SCHEMA_KEY, &1u64.to_be_bytes())
            .expect("version");
        let payments = db.open_tree("payments").expect("payments");
        for (key, consumed, closed) in [(1u8, false, None), (2, true, None), (3, false, Some(true))]
        {
            let mut record = serde_json::json!({ "consumed": consumed });
            if let Some(closed) = closed {
                record["closed"] = closed.into();
            }
            payments
                .insert([key; 32], serde_json::to_vec(&record).expect("json"))
                .expect("insert");
        }
        let entries = db.open_tree("entries").expect("entries");
        let entry = serde_json::json!({
            "kind": "expiry", "account": nostr_sdk::Keys::generate().public_key(), "msat": 0,
            "job": null, "payment_hash": null, "at": 0,
        });
        entries
            .insert(
                41u64.to_be_bytes(),
                serde_json::to_vec(&entry).expect("json"),
            )
            .expect("entry");
        db.flush().expect("flush");
    }
    let store = super::open_when_released(dir.path()).expect("open");
    let indexed: Vec<Vec<u8>> = store
        .read_blocking(|r| r.keys(Tree::OpenPayments).collect())
        .expect("keys");
    assert_eq!(
        indexed,
        vec![super::open_payment_key(0, &[1u8; 32]).to_vec()],
        "only the open record, due at once"
    );
    let (version, sequence) = store
        .read_blocking(|r| {
            Ok::<_, StoreError>((
                r.get_raw(Tree::Meta, META_SCHEMA_KEY)?,
                r.get_raw(Tree::Meta, ENTRY_SEQUENCE)?,
            ))
        })
        .expect("meta");
    assert_eq!(version.as_deref().and_then(be_u64), Some(SCHEMA_VERSION));
    assert_eq!(
        sequence.as_deref().and_then(be_u64),
        Some(42),
        "the ledger continues after the last entry"
    );
}

#[test]
fn a_version_4_store_gets_its_ledger_indexed_by_account() {
    use crate::ledger::{self, Entry, EntryKind};
    let dir = tempfile::tempdir().expect("tempdir");
    let alice = ledger::Account::from(nostr_sdk::Keys::generate().public_key());
    let bob = ledger::Account::from(nostr_sdk::Keys::generate().public_key());
    let entry = |kind, account, msat| Entry {
        kind,
        account,
        msat,
        job: None,
        payment_hash: None,
        at: 0,
    };
    {
        // Schema 4: entries and balances, no index.
        let db = raw_db(dir.path());
        let meta = db.open_tree("meta").expect("meta");
        meta.insert(META_SCHEMA_KEY, &4u64.to_be_bytes())
            .expect("version");
        meta.insert(ENTRY_SEQUENCE, &3u64.to_be_bytes())
            .expect("sequence");
        let entries = db.open_tree("entries").expect("entries");
        for (seq, e) in [
            entry(EntryKind::PaymentIn, alice, 1_000),
            entry(EntryKind::PaymentIn, bob, 500),
            entry(EntryKind::Charge, alice, 300),
        ]
        .iter()
        .enumerate()
        {
            entries
                .insert(
                    (seq as u64).to_be_bytes(),
                    serde_json::to_vec(e).expect("json"),
                )
                .expect("entry");
        }
        let accounts = db.open_tree("accounts").expect("accounts");
        accounts
            .insert(alice.key(), &700u64.to_be_bytes())
            .expect("alice");
        accounts
            .insert(bob.key(), &500u64.to_be_bytes())
            .expect("bob");
        db.flush().expect("flush");
    }
    let store = super::open_when_released(dir.path()).expect("open");
    let (alices, bobs, totals) = store
        .read_blocking(move |r| {
            Ok::<_, ledger::LedgerError>((
                ledger::entries_of(r, &alice, 10)?,
                ledger::entries_of(r, &bob, 10)?,
                ledger::check(r)?,
            ))
        })
        .expect("read");
    let seqs = |entries: &[(u64, Entry)]| entries.iter().map(|(seq, _)| *seq).collect::<Vec<_>>();
    assert_eq!(seqs(&alices), vec![2, 0], "alice's entries, newest first");
    assert_eq!(alices[0].1.kind, EntryKind::Charge);
    assert_eq!(seqs(&bobs), vec![1]);
    assert_eq!(totals.entries, 3);
    assert_eq!(totals.balances_msat, 1_200);
}

#[test]
fn an_unknown_schema_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let db = raw_db(dir.path());
        db.open_tree("meta")
            .expect("meta")
            .insert(META_SCHEMA_KEY, &99u64.to_be_bytes())
            .expect("version");
        db.flush().expect("flush");
    }
    assert!(matches!(
        super::open_when_released(dir.path()),
        Err(StoreError::Schema { found: 99 })
    ));
}

#[test]
fn a_version_5_store_opens_as_current_with_its_jobs_and_accounts_as_they_were() {
    old_store_opens_as_current(5);
}

#[test]
fn a_version_6_store_opens_as_current_with_its_jobs_and_accounts_as_they_were() {
    old_store_opens_as_current(6);
}

#[test]
fn a_version_8_store_opens_as_current_with_its_jobs_and_accounts_as_they_were() {
    old_store_opens_as_current(8);
}

#[test]
fn a_version_10_store_gets_its_open_payments_keyed_by_due_time_and_zaps_by_job() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = [7u8; 32];
    {
        // Schema 10: open payments keyed by hash alone, one deferred, one a zap of a job; a
        // migration cut short had already rekeyed the third.
        let db = raw_db(dir.path());
        let meta = db.open_tree("meta").expect("meta");
        meta.insert(META_SCHEMA_KEY, &10u64.to_be_bytes())
            .expect("version");
        let payments = db.open_tree("payments").expect("payments");
        let open = db.open_tree("open_payments").expect("open");
        let records = [
            serde_json::json!({ "consumed": false }),
            serde_json::json!({ "consumed": false, "next_lookup_at": 5_000 }),
            serde_json::json!({ "consumed": false, "next_lookup_at": 9,
                "job": hex::encode(job), "zap_request": "{}" }),
            // Booked, a zap of the same job: indexed under the job all the same.
            serde_json::json!({ "consumed": true, "job": hex::encode(job), "zap_request": "{}" }),
        ];
        for (n, record) in records.iter().enumerate() {
            let hash = [n as u8 + 1; 32];
            payments
                .insert(hash, serde_json::to_vec(record).expect("json"))
                .expect("payment");
            if n < 2 {
                open.insert(hash, &[] as &[u8]).expect("open");
            }
        }
        open.insert(super::open_payment_key(9, &[3; 32]), &[] as &[u8])
            .expect("rekeyed");
        db.flush().expect("flush");
    }
    let store = super::open_when_released(dir.path()).expect("open");
    let (open, zaps): (Vec<Vec<u8>>, Vec<Vec<u8>>) = store
        .read_blocking(|r| {
            Ok::<_, StoreError>((
                r.keys(Tree::OpenPayments).collect::<Result<_, _>>()?,
                r.keys(Tree::JobZaps).collect::<Result<_, _>>()?,
            ))
        })
        .expect("keys");
    assert_eq!(
        open,
        vec![
            super::open_payment_key(0, &[1; 32]).to_vec(),
            super::open_payment_key(9, &[3; 32]).to_vec(),
            super::open_payment_key(5_000, &[2; 32]).to_vec(),
        ],
        "each open payment once, by when it is due"
    );
    assert_eq!(
        zaps,
        vec![
            super::job_zap_key(&job, &[3; 32]).to_vec(),
            super::job_zap_key(&job, &[4; 32]).to_vec()
        ]
    );
}

fn old_store_opens_as_current(from: u64) {
    use crate::job::{Door, Job};
    use crate::ledger::{self, Account, Entry, EntryKind};
    use nostr_sdk::{EventBuilder, Keys, Kind};
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = Keys::generate();
    let request = EventBuilder::new(Kind::from(5050u16), "")
        .sign_with_keys(&keys)
        .expect("sign");
    let job = Job::received(&request, vec![], 1);
    // Received later, and a second, earlier job that a migration cut short had already copied
    // to its time key (its id key is still there too).
    let later = Job::received(
        &EventBuilder::new(Kind::from(5050u16), "later")
            .sign_with_keys(&keys)
            .expect("sign"),
        vec![],
        7,
    );
    let copied = Job::received(
        &EventBuilder::new(Kind::from(5050u16), "copied")
            .sign_with_keys(&keys)
            .expect("sign"),
        vec![],
        0,
    );
    let npub = Account::from(keys.public_key());
    {
        // Schema 5 to 8 as it was written: relay jobs under their ids and an npub's balance.
        let db = raw_db(dir.path());
        let meta = db.open_tree("meta").expect("meta");
        meta.insert(META_SCHEMA_KEY, &from.to_be_bytes())
            .expect("version");
        meta.insert(ENTRY_SEQUENCE, &0u64.to_be_bytes())
            .expect("sequence");
        let json = serde_json::to_string(&job).expect("json");
        assert!(
            !json.contains("door") && !json.contains("\"result\""),
            "{json}"
        );
        let jobs = db.open_tree("jobs").expect("jobs");
        for j in [&later, &job, &copied] {
            jobs.insert(j.id.as_bytes(), serde_json::to_vec(j).expect("json"))
                .expect("job");
        }
        jobs.insert(
            super::job_key(0, copied.id.as_bytes()),
            serde_json::to_vec(&copied).expect("json"),
        )
        .expect("copied");
        db.flush().expect("flush");
    }
    let store = super::open_when_released(dir.path()).expect("open");
    let token = Account::Token(crate::wallet::PaymentHash([9; 32]));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    for account in [npub, token] {
        let entry = Entry {
            kind: EntryKind::PaymentIn,
            account,
            msat: 1_000,
            job: None,
            payment_hash: None,
            at: 0,
        };
        runtime
            .block_on(store.commit(move |tx| ledger::post(tx, &entry)))
            .expect("post");
    }
    let id = job.id;
    let (version, stored, totals) = store
        .read_blocking(move |r| {
            Ok::<_, ledger::LedgerError>((
                r.get_raw(Tree::Meta, META_SCHEMA_KEY)?,
                crate::job::book::read_job(r, &id)?,
                ledger::check(r)?,
            ))
        })
        .expect("read");
    let keys: Vec<Vec<u8>> = store
        .read_blocking(|r| r.keys(Tree::Jobs).collect())
        .expect("keys");
    let expected: Vec<Vec<u8>> = [(0, &copied), (1, &job), (7, &later)]
        .iter()
        .map(|(at, j)| super::job_key(*at, j.id.as_bytes()).to_vec())
        .collect();
    assert_eq!(
        keys, expected,
        "every job once, under its time key, oldest first"
    );
    for j in [&copied, &later] {
        let id = j.id;
        let read = store
            .read_blocking(move |r| crate::job::book::read_job(r, &id))
            .expect("read");
        assert_eq!(read.as_ref(), Some(j), "found by id through the index");
    }
    assert_eq!(version.as_deref().and_then(be_u64), Some(SCHEMA_VERSION));
    let stored = stored.expect("the job");
    assert_eq!(stored.door, Door::Relay);
    assert_eq!(stored, job);
    assert_eq!((totals.accounts, totals.balances_msat), (2, 2_000));
}

/// The store's sled database opened directly, to write what an older dvmd left (without sled's
/// background flusher, as the store runs it).
fn raw_db(path: &std::path::Path) -> sled::Db {
    sled::Config::new()
        .path(path)
        .flush_every_ms(None)
        .open()
        .expect("sled")
}
