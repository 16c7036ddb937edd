//! Where job records live in the store: under their time key ([`job_key`]: `received_at`,
//! then the id), found by id through `Tree::JobKeys`. These four functions (and [`JobRef`])
//! are the only code that knows it (see "Jobs are keyed by time" in ARCHITECTURE.md).

use crate::job::id::JobId;
use crate::job::record::Job;
use crate::store::{be_u64, job_key, Reader, StoreError, Tree, Tx, TxFailure};

/// How a write finds a job: by id, through the `JobKeys` index, or straight under its store key
/// when the caller holds the job (its `received_at` never changes): one sled read, not two.
/// Every job write on the way from request to settlement is made by a caller that holds it.
#[derive(Debug, Clone, Copy)]
pub struct JobRef {
    id: JobId,
    received_at: Option<u64>,
}

impl JobRef {
    /// The job's id.
    pub fn id(&self) -> &JobId {
        &self.id
    }
}

impl From<&JobId> for JobRef {
    fn from(id: &JobId) -> Self {
        Self {
            id: *id,
            received_at: None,
        }
    }
}

impl From<&Job> for JobRef {
    fn from(job: &Job) -> Self {
        Self {
            id: job.id,
            received_at: Some(job.received_at),
        }
    }
}

/// Inside a transaction: the job stored under `job`, if any. A key that finds nothing (a
/// caller's copy that was never stored) falls back to the index, so a hint never hides a job.
pub(in crate::job) fn find_job(
    tx: &Tx<'_>,
    job: impl Into<JobRef>,
) -> Result<Option<Job>, TxFailure> {
    let JobRef { id, received_at } = job.into();
    if let Some(received_at) = received_at {
        if let Some(found) = tx.get(Tree::Jobs, &job_key(received_at, id.as_bytes()))? {
            return Ok(Some(found));
        }
    }
    match tx
        .get_raw(Tree::JobKeys, id.as_bytes())?
        .as_deref()
        .and_then(be_u64)
    {
        Some(received_at) => tx.get(Tree::Jobs, &job_key(received_at, id.as_bytes())),
        None => Ok(None),
    }
}

/// Inside a transaction: store a job that is not in the book yet, and index it by id.
pub(in crate::job) fn insert_job(tx: &Tx<'_>, job: &Job) -> Result<(), TxFailure> {
    let id = job.id.as_bytes();
    tx.put_raw(Tree::JobKeys, id, &job.received_at.to_be_bytes())?;
    tx.put(Tree::Jobs, &job_key(job.received_at, id), job)
}

/// Inside a transaction: store the new state of a job read with [`find_job`] or
/// [`stored_job`] (its key never changes: `received_at` is set once, when it arrives).
pub(in crate::job) fn put_job(tx: &Tx<'_>, job: &Job) -> Result<(), TxFailure> {
    tx.put(
        Tree::Jobs,
        &job_key(job.received_at, job.id.as_bytes()),
        job,
    )
}

/// The job stored under `id`, if any, for a read.
pub(crate) fn read_job(reader: &Reader<'_>, id: &JobId) -> Result<Option<Job>, StoreError> {
    match reader
        .get_raw(Tree::JobKeys, id.as_bytes())?
        .as_deref()
        .and_then(be_u64)
    {
        Some(received_at) => reader.get(Tree::Jobs, &job_key(received_at, id.as_bytes())),
        None => Ok(None),
    }
}
