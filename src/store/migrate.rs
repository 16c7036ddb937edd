//! Schema migrations, run on open before the writer starts.

use super::{
    account_entry_key, be_u64, decode, job_key, job_zap_key, open_payment_key, StoreError, Tree,
    Trees, ENTRY_SEQUENCE, META_SCHEMA_KEY, SCHEMA_VERSION,
};

/// Bring a store written by an older schema up to [`SCHEMA_VERSION`], before the writer starts.
pub(super) fn migrate(trees: &Trees) -> Result<(), StoreError> {
    let meta = &trees.trees[Tree::Meta as usize];
    let found = match meta.get(META_SCHEMA_KEY)? {
        None => SCHEMA_VERSION,
        Some(raw) => be_u64(&raw).unwrap_or(0),
    };
    match found {
        SCHEMA_VERSION => {}
        1 => {
            index_open_payments(trees)?;
            count_entries(trees)?;
            index_entries_by_account(trees)?;
        }
        2 => {
            count_entries(trees)?;
            index_entries_by_account(trees)?;
        }
        // 3 -> 4 adds holds: nothing on disk changes shape.
        3 | 4 => index_entries_by_account(trees)?,
        // 5 -> 6 adds HTTP jobs, token accounts and `l402_tokens`, 6 -> 7 `payouts`,
        // `account_settings` and the payout entry kinds, 7 -> 8 `mpp_challenges`: nothing is
        // rewritten (nor is anything for 9 -> 10, which adds `trust`).
        5..=10 => {}
        found => return Err(StoreError::Schema { found }),
    }
    if found < 9 {
        key_jobs_by_time(trees)?;
    }
    if found < 11 {
        key_open_payments_by_due(trees)?;
        index_zaps_by_job(trees)?;
    }
    if found != SCHEMA_VERSION {
        tracing::info!(from = found, to = SCHEMA_VERSION, "store migrated");
    }
    if meta.get(ENTRY_SEQUENCE)?.is_none() {
        meta.insert(ENTRY_SEQUENCE, &0u64.to_be_bytes())?;
    }
    meta.insert(META_SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())?;
    trees.db.flush()?;
    Ok(())
}

/// Migration 1 -> 2: index every payment record that is neither consumed nor closed.
fn index_open_payments(trees: &Trees) -> Result<(), StoreError> {
    #[derive(serde::Deserialize)]
    struct Flags {
        consumed: bool,
        #[serde(default)]
        closed: bool,
    }
    let open = &trees.trees[Tree::OpenPayments as usize];
    let mut indexed = 0usize;
    for item in trees.trees[Tree::Payments as usize].iter() {
        let (hash, raw) = item?;
        let flags: Flags = decode("payments", &raw)?;
        if !flags.consumed && !flags.closed {
            open.insert(hash, &[] as &[u8])?;
            indexed += 1;
        }
    }
    tracing::info!(indexed, "store migrated to schema 2 (open payments index)");
    Ok(())
}

/// Migration 10 -> 11: key every open payment by when it is next due a lookup
/// ([`open_payment_key`]). Each is written under its new key before its old one is removed, so
/// a migration cut short resumes where it stopped.
fn key_open_payments_by_due(trees: &Trees) -> Result<(), StoreError> {
    #[derive(serde::Deserialize)]
    struct Due {
        #[serde(default)]
        next_lookup_at: u64,
    }
    let open = &trees.trees[Tree::OpenPayments as usize];
    let payments = &trees.trees[Tree::Payments as usize];
    let mut old = Vec::new();
    for key in open.iter().keys() {
        if let Ok(hash) = <[u8; 32]>::try_from(key?.as_ref()) {
            old.push(hash);
        }
    }
    for hash in &old {
        if let Some(raw) = payments.get(hash)? {
            let due: Due = decode("payments", &raw)?;
            open.insert(open_payment_key(due.next_lookup_at, hash), &[] as &[u8])?;
        }
        open.remove(hash)?;
    }
    tracing::info!(
        rekeyed = old.len(),
        "store migrated to schema 11 (open payments by due time)"
    );
    Ok(())
}

/// Migration 10 -> 11: index every zap invoice of a job under the job.
fn index_zaps_by_job(trees: &Trees) -> Result<(), StoreError> {
    use hex::FromHex;

    #[derive(serde::Deserialize)]
    struct Zap {
        /// The job id, hex.
        job: Option<String>,
        zap_request: Option<serde::de::IgnoredAny>,
    }
    let index = &trees.trees[Tree::JobZaps as usize];
    let mut indexed = 0usize;
    for item in trees.trees[Tree::Payments as usize].iter() {
        let (hash, raw) = item?;
        let zap: Zap = decode("payments", &raw)?;
        let job = zap.job.and_then(|hex| <[u8; 32]>::from_hex(&hex).ok());
        let (Some(job), Some(_), Ok(hash)) =
            (job, zap.zap_request, <[u8; 32]>::try_from(hash.as_ref()))
        else {
            continue;
        };
        index.insert(job_zap_key(&job, &hash), &[] as &[u8])?;
        indexed += 1;
    }
    tracing::info!(indexed, "store migrated to schema 11 (zaps by job)");
    Ok(())
}

/// Migration 2 -> 3: the ledger sequence continues after the last entry sled's id generator
/// numbered.
fn count_entries(trees: &Trees) -> Result<(), StoreError> {
    let next = match trees.trees[Tree::Entries as usize].last()? {
        Some((key, _)) => be_u64(&key).map_or(0, |last| last + 1),
        None => 0,
    };
    trees.trees[Tree::Meta as usize].insert(ENTRY_SEQUENCE, &next.to_be_bytes())?;
    tracing::info!(next, "store migrated to schema 3 (ledger sequence in meta)");
    Ok(())
}

/// Migration 4 -> 5: index every ledger entry under its account.
fn index_entries_by_account(trees: &Trees) -> Result<(), StoreError> {
    #[derive(serde::Deserialize)]
    struct Named {
        account: nostr_sdk::PublicKey,
    }
    let index = &trees.trees[Tree::AccountEntries as usize];
    let mut indexed = 0usize;
    for item in trees.trees[Tree::Entries as usize].iter() {
        let (seq, raw) = item?;
        let entry: Named = decode("entries", &raw)?;
        index.insert(
            account_entry_key(&entry.account.to_bytes(), &seq),
            &[] as &[u8],
        )?;
        indexed += 1;
    }
    tracing::info!(
        indexed,
        "store migrated to schema 5 (ledger entries by account)"
    );
    Ok(())
}

/// Migration 8 -> 9: move every job from its id key to its time key ([`job_key`]) and index it
/// by id. Each job is written under its new key before its old key is removed, so a migration
/// cut short by a crash resumes where it stopped (the schema version moves only at the end).
fn key_jobs_by_time(trees: &Trees) -> Result<(), StoreError> {
    #[derive(serde::Deserialize)]
    struct Received {
        received_at: u64,
    }
    let jobs = &trees.trees[Tree::Jobs as usize];
    let index = &trees.trees[Tree::JobKeys as usize];
    // The old keys first (32 bytes each), so the scan never meets a key it just wrote.
    let mut old = Vec::new();
    for key in jobs.iter().keys() {
        let key = key?;
        if let Ok(id) = <[u8; 32]>::try_from(key.as_ref()) {
            old.push(id);
        }
    }
    for id in &old {
        let Some(raw) = jobs.get(id)? else { continue };
        let received: Received = decode("jobs", &raw)?;
        jobs.insert(job_key(received.received_at, id), raw)?;
        index.insert(id, &received.received_at.to_be_bytes())?;
        jobs.remove(id)?;
    }
    tracing::info!(
        moved = old.len(),
        "store migrated to schema 9 (jobs keyed by time)"
    );
    Ok(())
}
