//! A group of writes as one sled transaction: the writer's side of each caller's write
//! ([`Pending`]) and the transaction that runs a group ([`Trees::transact_group`]).
//!
//! One transaction a group, not one a write: sled 0.34 writes (and syncs) its log twice for
//! every transaction (`PageCache::pin_log`), whatever its size. Each write still keeps or drops
//! its changes on its own (see [`super::tx::Overlay`]).

use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use tokio::sync::oneshot;

use super::writer::{self, Change};
use super::{StoreError, Trees, Tx, TxError, TxFailure};

impl Trees {
    /// Run a group of writes in one sled transaction over every tree (on the writer thread).
    /// Each write keeps its changes or drops them on its own; sled's failure, or a conflict
    /// after which sled runs the whole group again, is the group's.
    pub(super) fn transact_group(&self, writes: &mut [writer::Write]) -> Result<(), sled::Error> {
        let writes = std::cell::RefCell::new(writes);
        self.trees
            .as_slice()
            .transaction(|views| {
                for write in writes.borrow_mut().iter_mut() {
                    let tx = Tx {
                        views,
                        overlay: Default::default(),
                    };
                    if write.change.run(&tx)? {
                        tx.overlay.into_inner().apply(views)?;
                    }
                }
                Ok::<(), ConflictableTransactionError<std::convert::Infallible>>(())
            })
            .map_err(|e| match e {
                TransactionError::Storage(e) => e,
                TransactionError::Abort(never) => match never {},
            })
    }
}

/// A caller's write as the writer runs it: the change, and where its outcome goes.
pub(super) struct Pending<R, E, F> {
    change: F,
    /// The outcome of the last run (sled may run a group again after a conflict).
    outcome: Option<Result<R, E>>,
    reply: oneshot::Sender<Result<R, E>>,
}

impl<R, E, F> Pending<R, E, F> {
    /// `change`, to be answered on `reply`.
    pub(super) fn new(change: F, reply: oneshot::Sender<Result<R, E>>) -> Self {
        Self {
            change,
            outcome: None,
            reply,
        }
    }
}

impl<R, E, F> Change for Pending<R, E, F>
where
    F: Fn(&Tx<'_>) -> Result<R, TxError<E>> + Send,
    R: Send,
    E: From<StoreError> + Send,
{
    fn run(
        &mut self,
        tx: &Tx<'_>,
    ) -> Result<bool, ConflictableTransactionError<std::convert::Infallible>> {
        let (outcome, keep) = match (self.change)(tx) {
            Ok(value) => (Ok(value), true),
            Err(TxError::Abort(e)) => (Err(e), false),
            Err(TxError::Store(TxFailure(inner))) => match inner {
                ConflictableTransactionError::Abort(codec) => (Err(E::from(codec)), false),
                ConflictableTransactionError::Storage(e) => {
                    return Err(ConflictableTransactionError::Storage(e))
                }
                // Conflict (and anything sled adds to its non-exhaustive enum): run again.
                _ => return Err(ConflictableTransactionError::Conflict),
            },
        };
        self.outcome = Some(outcome);
        Ok(keep)
    }

    fn answer(self: Box<Self>, done: Result<(), StoreError>) {
        let answer = match (self.outcome, done) {
            // A refusal stands whatever happened to the group.
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(value)), Ok(())) => Ok(value),
            // Applied but not durable, or never applied: the caller must not act on it.
            (_, Err(e)) => Err(E::from(e)),
            (None, Ok(())) => Err(E::from(StoreError::WriterFailed(
                "the write was never run".to_owned(),
            ))),
        };
        let _ = self.reply.send(answer);
    }
}
