//! Typed views of the trees: [`Tx`] inside a write (on the writer thread) and [`Reader`] for
//! reads (on a reader thread, never a tokio worker).
//!
//! Records are JSON; keys are raw bytes. Domain modules describe their writes as closures over
//! a `Tx` and never see sled.
//!
//! The writer runs a whole group of writes in one sled transaction (see `writer`), and each
//! write still commits or rolls back on its own: a `Tx` keeps the write's changes in an
//! [`Overlay`] that its own reads see first, and the writer copies the overlay into the
//! group's transaction only if the write succeeds.

use std::cell::RefCell;
use std::collections::HashMap;

use serde::de::DeserializeOwned;
use serde::Serialize;
use sled::transaction::{ConflictableTransactionError, TransactionalTree};

use super::{decode, encode, StoreError, Tree};

/// A failure of the store inside a write: sled failed or asked for a retry, or a record did not
/// (de)serialize. Opaque: the closure passes it on with `?`.
#[derive(Debug)]
pub struct TxFailure(pub(super) ConflictableTransactionError<StoreError>);

impl From<sled::transaction::UnabortableTransactionError> for TxFailure {
    fn from(e: sled::transaction::UnabortableTransactionError) -> Self {
        Self(e.into())
    }
}

fn codec(e: StoreError) -> TxFailure {
    TxFailure(ConflictableTransactionError::Abort(e))
}

/// Why a write closure stopped: the domain refused (nothing is written), or the store failed.
#[derive(Debug)]
pub enum TxError<E> {
    /// The domain refused the change; the transaction is rolled back and `E` returned.
    Abort(E),
    /// The store failed.
    Store(TxFailure),
}

impl<E> From<TxFailure> for TxError<E> {
    fn from(e: TxFailure) -> Self {
        Self::Store(e)
    }
}

impl<E> TxError<E> {
    /// Convert the domain error (a module calling another module's transactional code).
    pub fn map_abort<F>(self, f: impl FnOnce(E) -> F) -> TxError<F> {
        match self {
            Self::Abort(e) => TxError::Abort(f(e)),
            Self::Store(e) => TxError::Store(e),
        }
    }
}

/// One write's changes not yet in the group's transaction: `None` removes the key. Keyed by
/// tree index and key; the last change to a key wins.
#[derive(Default)]
pub(super) struct Overlay(HashMap<(usize, Vec<u8>), Option<Vec<u8>>>);

impl Overlay {
    /// Copy the changes into the group's transaction (the write succeeded).
    pub(super) fn apply(
        self,
        views: &[TransactionalTree],
    ) -> Result<(), sled::transaction::UnabortableTransactionError> {
        for ((tree, key), value) in self.0 {
            match value {
                Some(value) => views[tree].insert(key, value)?,
                None => views[tree].remove(key)?,
            };
        }
        Ok(())
    }
}

/// The trees as one write sees them: every read sees the writes made before it, in this write
/// and in the writes before it, and this write's changes all commit together or not at all.
pub struct Tx<'a> {
    pub(super) views: &'a [TransactionalTree],
    pub(super) overlay: RefCell<Overlay>,
}

impl Tx<'_> {
    fn read(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, TxFailure> {
        if let Some(value) = self.overlay.borrow().0.get(&(tree as usize, key.to_vec())) {
            return Ok(value.clone());
        }
        Ok(self.views[tree as usize].get(key)?.map(|raw| raw.to_vec()))
    }

    fn write(&self, tree: Tree, key: &[u8], value: Option<Vec<u8>>) {
        self.overlay
            .borrow_mut()
            .0
            .insert((tree as usize, key.to_vec()), value);
    }

    /// The record under `key`.
    pub fn get<T: DeserializeOwned>(&self, tree: Tree, key: &[u8]) -> Result<Option<T>, TxFailure> {
        let decoded = match self.overlay.borrow().0.get(&(tree as usize, key.to_vec())) {
            Some(Some(raw)) => Some(decode(tree.name(), raw)),
            Some(None) => return Ok(None),
            None => None,
        };
        let decoded = match decoded {
            Some(decoded) => decoded,
            None => match self.views[tree as usize].get(key)? {
                Some(raw) => decode(tree.name(), &raw),
                None => return Ok(None),
            },
        };
        decoded.map(Some).map_err(codec)
    }

    /// The raw bytes under `key` (indexes, counters).
    pub fn get_raw(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, TxFailure> {
        self.read(tree, key)
    }

    /// Whether `key` is present.
    pub fn contains(&self, tree: Tree, key: &[u8]) -> Result<bool, TxFailure> {
        Ok(self.read(tree, key)?.is_some())
    }

    /// Store `value` under `key`.
    pub fn put<T: Serialize>(&self, tree: Tree, key: &[u8], value: &T) -> Result<(), TxFailure> {
        let raw = encode(tree.name(), value).map_err(codec)?;
        self.write(tree, key, Some(raw));
        Ok(())
    }

    /// Store raw bytes under `key`.
    pub fn put_raw(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<(), TxFailure> {
        self.write(tree, key, Some(value.to_vec()));
        Ok(())
    }

    /// Remove `key`.
    pub fn remove(&self, tree: Tree, key: &[u8]) -> Result<(), TxFailure> {
        self.write(tree, key, None);
        Ok(())
    }

    /// The next number of the sequence `name` (kept in `meta`, so it commits with the write
    /// that uses it: a rolled-back write leaves no gap).
    pub fn next_sequence(&self, name: &[u8]) -> Result<u64, TxFailure> {
        let next = self
            .get_raw(Tree::Meta, name)?
            .and_then(|raw| super::be_u64(&raw))
            .unwrap_or(0);
        self.put_raw(Tree::Meta, name, &(next + 1).to_be_bytes())?;
        Ok(next)
    }
}

/// Read access to the trees. Each call reads the latest applied state; a scan is not a
/// snapshot (writes applied meanwhile may or may not show).
pub struct Reader<'a> {
    pub(super) trees: &'a [sled::Tree],
}

impl Reader<'_> {
    fn tree(&self, tree: Tree) -> &sled::Tree {
        &self.trees[tree as usize]
    }

    /// The record under `key`.
    pub fn get<T: DeserializeOwned>(
        &self,
        tree: Tree,
        key: &[u8],
    ) -> Result<Option<T>, StoreError> {
        match self.tree(tree).get(key)? {
            Some(raw) => decode(tree.name(), &raw).map(Some),
            None => Ok(None),
        }
    }

    /// The raw bytes under `key`.
    pub fn get_raw(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree(tree).get(key)?.map(|raw| raw.to_vec()))
    }

    /// Every key of `tree`, in order.
    pub fn keys(&self, tree: Tree) -> impl Iterator<Item = Result<Vec<u8>, StoreError>> + '_ {
        self.tree(tree).iter().keys().map(|key| Ok(key?.to_vec()))
    }

    /// The keys of `tree` in `range`, in order.
    pub fn keys_in<K: AsRef<[u8]>>(
        &self,
        tree: Tree,
        range: impl std::ops::RangeBounds<K>,
    ) -> impl Iterator<Item = Result<Vec<u8>, StoreError>> + '_ {
        self.tree(tree)
            .range(range)
            .keys()
            .map(|key| Ok(key?.to_vec()))
    }

    /// Every (key, raw value) of `tree`, in key order.
    pub fn scan_raw(
        &self,
        tree: Tree,
    ) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), StoreError>> + '_ {
        self.tree(tree).iter().map(|item| {
            let (key, raw) = item?;
            Ok((key.to_vec(), raw.to_vec()))
        })
    }

    /// The keys of `tree` starting with `prefix`, last first.
    pub fn keys_with_prefix_rev(
        &self,
        tree: Tree,
        prefix: &[u8],
    ) -> impl Iterator<Item = Result<Vec<u8>, StoreError>> + '_ {
        self.tree(tree)
            .scan_prefix(prefix)
            .keys()
            .rev()
            .map(|key| Ok(key?.to_vec()))
    }

    /// The (key, record) pairs of `tree` with keys in `range`, in key order.
    pub fn scan_range<T: DeserializeOwned, K: AsRef<[u8]>>(
        &self,
        tree: Tree,
        range: impl std::ops::RangeBounds<K>,
    ) -> impl Iterator<Item = Result<(Vec<u8>, T), StoreError>> + '_ {
        self.tree(tree).range(range).map(move |item| {
            let (key, raw) = item?;
            Ok((key.to_vec(), decode(tree.name(), &raw)?))
        })
    }

    /// Every (key, record) of `tree`, in key order.
    pub fn scan<T: DeserializeOwned>(
        &self,
        tree: Tree,
    ) -> impl Iterator<Item = Result<(Vec<u8>, T), StoreError>> + '_ {
        self.tree(tree).iter().map(move |item| {
            let (key, raw) = item?;
            Ok((key.to_vec(), decode(tree.name(), &raw)?))
        })
    }
}
