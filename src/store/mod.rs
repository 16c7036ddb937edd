//! Persistent state in sled: the trees dvmd keeps, their keys, and the schema version.
//!
//! Every record is JSON (small, inspectable with `dvmd jobs`); keys are raw bytes (32-byte event
//! ids and payment hashes, 8-byte big-endian sequence numbers). Modules that own a record type do
//! their reads and writes through the trees opened here, and money-moving changes go through one
//! multi-tree sled transaction followed by [`Store::flush`] before any side effect they allow.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The schema this build reads and writes. Bump with a migration when a record changes shape.
/// 2: the `open_payments` index (built from `payments` when a version 1 store is opened).
pub const SCHEMA_VERSION: u64 = 2;

const META_SCHEMA_KEY: &[u8] = b"schema_version";

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed (IO, corruption).
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    /// A record could not be (de)serialized.
    #[error("store: bad record in {tree}: {source}")]
    Codec {
        /// The tree holding the record.
        tree: &'static str,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// The data directory was written by another schema version.
    #[error("store: schema version {found} on disk, this build reads {SCHEMA_VERSION}")]
    Schema {
        /// The version found on disk.
        found: u64,
    },
    /// The data directory is locked by another process.
    #[error("store: {0} is in use by another dvmd process (stop the daemon first)")]
    Locked(String),
}

/// The sled database and its trees.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    /// Job records by request event id.
    pub jobs: sled::Tree,
    /// Invoices we issued, by payment hash: which job each pays, and whether it was consumed.
    pub payments: sled::Tree,
    /// Index of the payment hashes the reconciler still looks up (neither consumed nor closed),
    /// kept in the same transactions as `payments`, so a pass costs O(open), not O(history).
    pub open_payments: sled::Tree,
    /// Ledger balances by customer pubkey.
    pub accounts: sled::Tree,
    /// Ledger entries by sequence number.
    pub entries: sled::Tree,
    /// The dev wallet's invoices and preimages.
    pub dev_wallet: sled::Tree,
    /// Our feedback event ids to the job they answer (zaps of a feedback pay its job).
    pub feedback: sled::Tree,
    /// Schema version, keys and checkpoints.
    pub meta: sled::Tree,
}

impl Store {
    /// Open (or create) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|e| match e {
                // sled reports a held file lock as an IO error mentioning the lock.
                sled::Error::Io(io) if io.to_string().contains("lock") => {
                    StoreError::Locked(dir.display().to_string())
                }
                other => StoreError::Sled(other),
            })?;
        Self::with_db(db)
    }

    /// Open a throwaway store in a temporary directory (tests and benchmarks).
    pub fn temporary() -> Result<Self, StoreError> {
        Self::with_db(sled::Config::new().temporary(true).open()?)
    }

    fn with_db(db: sled::Db) -> Result<Self, StoreError> {
        let store = Self {
            jobs: db.open_tree("jobs")?,
            payments: db.open_tree("payments")?,
            open_payments: db.open_tree("open_payments")?,
            accounts: db.open_tree("accounts")?,
            entries: db.open_tree("entries")?,
            dev_wallet: db.open_tree("dev_wallet")?,
            feedback: db.open_tree("feedback")?,
            meta: db.open_tree("meta")?,
            db,
        };
        store.check_schema()?;
        Ok(store)
    }

    fn check_schema(&self) -> Result<(), StoreError> {
        let found = match self.meta.get(META_SCHEMA_KEY)? {
            None => SCHEMA_VERSION,
            Some(raw) => be_u64(&raw).unwrap_or(0),
        };
        match found {
            SCHEMA_VERSION => {}
            1 => self.index_open_payments()?,
            found => return Err(StoreError::Schema { found }),
        }
        self.meta
            .insert(META_SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())?;
        Ok(())
    }

    /// Migration 1 -> 2: index every payment record that is neither consumed nor closed.
    fn index_open_payments(&self) -> Result<(), StoreError> {
        #[derive(serde::Deserialize)]
        struct Flags {
            consumed: bool,
            #[serde(default)]
            closed: bool,
        }
        let mut indexed = 0usize;
        for item in self.payments.iter() {
            let (hash, raw) = item?;
            let flags: Flags = decode("payments", &raw)?;
            if !flags.consumed && !flags.closed {
                self.open_payments.insert(hash, &[] as &[u8])?;
                indexed += 1;
            }
        }
        self.db.flush()?;
        tracing::info!(indexed, "store migrated to schema 2 (open payments index)");
        Ok(())
    }

    /// Make everything written so far durable. Call before acting on a money-moving change.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await?;
        Ok(())
    }

    /// A fresh monotonic id (ledger sequence numbers).
    pub fn next_id(&self) -> Result<u64, StoreError> {
        Ok(self.db.generate_id()?)
    }
}

/// Serialize a record for a tree.
pub fn encode<T: Serialize>(tree: &'static str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|source| StoreError::Codec { tree, source })
}

/// Deserialize a record read from a tree.
pub fn decode<T: DeserializeOwned>(tree: &'static str, raw: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(raw).map_err(|source| StoreError::Codec { tree, source })
}

/// Read a big-endian u64 (sequence numbers, versions).
pub fn be_u64(raw: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(raw.try_into().ok()?))
}

/// Serialize inside a sled transaction, aborting it on failure.
pub fn tx_encode<T: Serialize>(
    tree: &'static str,
    value: &T,
) -> Result<Vec<u8>, sled::transaction::ConflictableTransactionError<StoreError>> {
    encode(tree, value).map_err(sled::transaction::ConflictableTransactionError::Abort)
}

/// Deserialize inside a sled transaction, aborting it on failure.
pub fn tx_decode<T: DeserializeOwned>(
    tree: &'static str,
    raw: &[u8],
) -> Result<T, sled::transaction::ConflictableTransactionError<StoreError>> {
    decode(tree, raw).map_err(sled::transaction::ConflictableTransactionError::Abort)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_1_store_gets_its_open_payments_indexed() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            // A store as schema 1 left it: payment records, no index.
            let db = sled::open(dir.path()).expect("sled");
            let meta = db.open_tree("meta").expect("meta");
            meta.insert(META_SCHEMA_KEY, &1u64.to_be_bytes())
                .expect("version");
            let payments = db.open_tree("payments").expect("payments");
            for (key, consumed, closed) in
                [(1u8, false, None), (2, true, None), (3, false, Some(true))]
            {
                let mut record = serde_json::json!({ "consumed": consumed });
                if let Some(closed) = closed {
                    record["closed"] = closed.into();
                }
                payments
                    .insert([key; 32], serde_json::to_vec(&record).expect("json"))
                    .expect("insert");
            }
            db.flush().expect("flush");
        }
        let store = Store::open(dir.path()).expect("open");
        let indexed: Vec<Vec<u8>> = store
            .open_payments
            .iter()
            .keys()
            .map(|k| k.expect("key").to_vec())
            .collect();
        assert_eq!(indexed, vec![vec![1u8; 32]], "only the open record");
        let version = store.meta.get(META_SCHEMA_KEY).expect("get").expect("set");
        assert_eq!(be_u64(&version), Some(SCHEMA_VERSION));
    }

    #[test]
    fn an_unknown_schema_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let db = sled::open(dir.path()).expect("sled");
            db.open_tree("meta")
                .expect("meta")
                .insert(META_SCHEMA_KEY, &99u64.to_be_bytes())
                .expect("version");
            db.flush().expect("flush");
        }
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::Schema { found: 99 })
        ));
    }
}
