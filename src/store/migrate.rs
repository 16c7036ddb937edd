//! Schema migrations, run on open before the writer starts.

use super::{
    account_entry_key, be_u64, decode, StoreError, Tree, Trees, ENTRY_SEQUENCE, META_SCHEMA_KEY,
    SCHEMA_VERSION,
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
        // 5 -> 6 adds HTTP jobs, token accounts and `l402_tokens`: nothing is rewritten.
        5 => tracing::info!("store migrated to schema 8 (HTTP jobs, L402 tokens, payouts)"),
        // 6 -> 7 adds `payouts`, `account_settings` and the payout entry kinds: nothing is
        // rewritten.
        6 => tracing::info!("store migrated to schema 8 (payouts, HTTP Payment challenges)"),
        // 7 -> 8 adds `mpp_challenges`: nothing is rewritten.
        7 => tracing::info!("store migrated to schema 8 (HTTP Payment challenges)"),
        found => return Err(StoreError::Schema { found }),
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
