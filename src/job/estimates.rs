//! The pipeline's estimator: quoting from it, feeding it every job that ran, and keeping what it
//! learned in the store so a restart does not forget it.
//!
//! The estimator ([`crate::pricing::estimator`]) is pure; here it sits behind a mutex (each call
//! is a few hundred nanoseconds of arithmetic) and is saved to the `meta` tree every
//! [`SAVE_EVERY`] jobs and when the daemon stops. Losing the last few observations in a crash
//! costs only a little learning, never money, so the save rides the next group commit rather
//! than paying an fsync of its own.

use super::pipeline::Pipeline;
use super::record::Job;
use crate::infer::Usage;
use crate::pricing::{Estimate, Estimator, Outcome};
use crate::store::{decode, encode, StoreError, Tree};

/// Where the estimator is kept in the `meta` tree.
const KEY: &[u8] = b"pricing_estimator";
/// Jobs learned between saves.
pub const SAVE_EVERY: u32 = 50;

/// The estimator and how much it learned since it was saved.
#[derive(Debug, Default)]
pub struct Learned {
    estimator: Estimator,
    unsaved: u32,
}

impl Pipeline {
    /// The estimate for a job of `kind` on our model.
    pub(crate) fn estimate(&self, kind: u16, prompt_tokens: u32, max_tokens: u32) -> Estimate {
        let config = &self.inner.config;
        self.learned().estimator.estimate(
            &config.rate_card,
            &config.model,
            kind,
            prompt_tokens,
            max_tokens,
        )
    }

    /// Learn from `job`, which generated `usage` (stopped at its budget when `truncated`).
    /// Jobs quoted before the estimator existed, free jobs, and jobs whose client left before
    /// the end teach nothing. A save that falls due runs in a task of its own, off the
    /// worker's path.
    pub(crate) fn learn(&self, job: &Job, usage: Usage, truncated: bool) {
        let Some(estimate) = job.estimate else {
            return;
        };
        let config = &self.inner.config;
        let outcome = Outcome {
            estimate,
            completion_tokens: usage.completion_tokens,
            cost_msat: config.rate_card.charge(usage),
            truncated,
            funds_msat: job.funds_msat(),
        };
        let due = {
            let mut learned = self.learned();
            learned.estimator.observe(&config.model, job.kind, &outcome);
            let coverage = learned.estimator.coverage(&config.model, job.kind);
            self.inner.metrics.estimated(coverage.coverage, truncated);
            learned.unsaved += 1;
            learned.unsaved >= SAVE_EVERY
        };
        if due {
            let pipeline = self.clone();
            self.inner.tasks.spawn(async move {
                if let Err(e) = pipeline.save_estimates(false).await {
                    tracing::warn!(error = %e, "cannot save the estimator");
                }
            });
        }
    }

    /// Load what an earlier run learned (call once, before jobs are quoted). A stored state
    /// that does not parse is logged and set aside: the estimator starts from its priors.
    pub async fn load_estimates(&self) -> Result<(), StoreError> {
        let raw = self
            .inner
            .book
            .store()
            .read(|r| r.get_raw(Tree::Meta, KEY))
            .await?;
        let Some(raw) = raw else { return Ok(()) };
        match decode::<Estimator>(Tree::Meta.name(), &raw) {
            Ok(estimator) => self.learned().estimator = estimator,
            Err(e) => {
                tracing::warn!(error = %e, "the stored estimator does not parse; starting from the priors")
            }
        }
        Ok(())
    }

    /// Save what the estimator learned, made durable when `durable` (at shutdown).
    pub async fn save_estimates(&self, durable: bool) -> Result<(), StoreError> {
        let raw = {
            let mut learned = self.learned();
            learned.unsaved = 0;
            encode(Tree::Meta.name(), &learned.estimator)?
        };
        let write =
            move |tx: &crate::store::Tx<'_>| -> Result<(), crate::store::TxError<StoreError>> {
                tx.put_raw(Tree::Meta, KEY, &raw)?;
                Ok(())
            };
        let store = self.inner.book.store();
        if durable {
            store.commit(write).await
        } else {
            store.apply(write).await
        }
    }

    /// Coverage so far for `kind` (for the benchmark and the API).
    pub fn coverage(&self, kind: u16) -> crate::pricing::estimator::Coverage {
        self.learned()
            .estimator
            .coverage(&self.inner.config.model, kind)
    }

    fn learned(&self) -> std::sync::MutexGuard<'_, Learned> {
        // A panic while holding it leaves plain numbers behind, still usable.
        self.inner
            .estimator
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
