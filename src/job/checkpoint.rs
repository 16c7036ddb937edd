//! Where intake resumes after downtime: per stream of events that must not be missed (zap
//! receipts from an external provider, cancellations), the newest `created_at` handled,
//! persisted in the store's `meta`.

use super::book::{Book, BookError};
use crate::store::{be_u64, Tree};

/// A stream of events intake resumes from a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Zap receipts signed by the trusted external provider.
    Receipts,
    /// Kind 5 deletions of job requests.
    Deletions,
}

impl Stream {
    fn key(self) -> &'static [u8] {
        match self {
            Self::Receipts => b"checkpoint/receipts",
            Self::Deletions => b"checkpoint/deletions",
        }
    }
}

impl Book {
    /// The newest `created_at` (unix seconds) handled on `stream`, if any was recorded.
    pub async fn checkpoint(&self, stream: Stream) -> Result<Option<u64>, BookError> {
        self.store()
            .read(move |r| {
                Ok(r.get_raw(Tree::Meta, stream.key())?
                    .and_then(|raw| be_u64(&raw)))
            })
            .await
    }

    /// Record that `stream` was handled up to `at`; an older `at` changes nothing. Applied, not
    /// awaited durable: a checkpoint lost to a crash only makes the next start look a little
    /// further back, and what it finds again is booked once.
    pub async fn advance_checkpoint(&self, stream: Stream, at: u64) -> Result<(), BookError> {
        self.store()
            .apply(move |tx| {
                let stored = tx
                    .get_raw(Tree::Meta, stream.key())?
                    .and_then(|raw| be_u64(&raw));
                if stored.is_none_or(|stored| stored < at) {
                    tx.put_raw(Tree::Meta, stream.key(), &at.to_be_bytes())?;
                }
                Ok(())
            })
            .await
    }
}

/// The `meta` key of when `provider` was first trusted.
fn provider_key(provider: &nostr_sdk::PublicKey) -> Vec<u8> {
    format!("zap-provider-since/{}", provider.to_hex()).into_bytes()
}

impl Book {
    /// When this service first trusted `provider`'s zap receipts (unix seconds): recorded,
    /// durably, as `now` by the first call, which the daemon makes when it starts. A receipt whose
    /// invoice was made before then is a zap of the operator's npub from before (a tip, paid
    /// to the operator), not a top-up: a relay that sends us such old receipts would otherwise
    /// have them credited to their senders, to withdraw.
    pub async fn provider_trusted_since(
        &self,
        provider: &nostr_sdk::PublicKey,
        now: u64,
    ) -> Result<u64, BookError> {
        let key = provider_key(provider);
        let read = key.clone();
        let stored = self
            .store()
            .read(move |r| {
                Ok::<_, BookError>(r.get_raw(Tree::Meta, &read)?.and_then(|raw| be_u64(&raw)))
            })
            .await?;
        if let Some(since) = stored {
            return Ok(since);
        }
        self.store()
            .commit(move |tx| {
                if let Some(since) = tx.get_raw(Tree::Meta, &key)?.and_then(|raw| be_u64(&raw)) {
                    return Ok(since);
                }
                tx.put_raw(Tree::Meta, &key, &now.to_be_bytes())?;
                Ok(now)
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    #[tokio::test]
    async fn a_checkpoint_only_moves_forward() {
        let book = Book::new(Store::temporary().expect("store"));
        assert_eq!(book.checkpoint(Stream::Receipts).await.expect("read"), None);
        book.advance_checkpoint(Stream::Receipts, 100)
            .await
            .expect("advance");
        book.advance_checkpoint(Stream::Receipts, 50)
            .await
            .expect("advance");
        assert_eq!(
            book.checkpoint(Stream::Receipts).await.expect("read"),
            Some(100)
        );
        assert_eq!(
            book.checkpoint(Stream::Deletions).await.expect("read"),
            None
        );
    }

    #[tokio::test]
    async fn a_provider_is_trusted_since_it_was_first_asked_about() {
        let book = Book::new(Store::temporary().expect("store"));
        let (one, two) = (
            nostr_sdk::Keys::generate().public_key(),
            nostr_sdk::Keys::generate().public_key(),
        );
        let since = |provider, now| book.provider_trusted_since(provider, now);
        assert_eq!(since(&one, 100).await.expect("first"), 100);
        assert_eq!(since(&one, 200).await.expect("again"), 100);
        assert_eq!(since(&two, 300).await.expect("another"), 300);
    }
}
