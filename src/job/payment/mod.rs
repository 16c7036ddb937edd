//! Payments in: settlement hints from the wallet and the reconciler that looks up every open
//! invoice, so a missed hint or a restart loses nothing.
//!
//! A hint is only a reason to ask. The job moves to `Paid` only on our own wallet's
//! `lookup` answer, booked by `Book::confirm_payment`, which consumes the payment hash in the
//! same transaction: two hints, a hint racing the reconciler, or a replayed hint all book once.

use std::time::{Duration, Instant};

use futures::StreamExt;
use nostr_sdk::Event;

use super::id::JobId;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::invoices::PaymentOutcome;
use super::pipeline::{Pipeline, FEEDBACK_ATTEMPTS};
use super::state::JobState;
use crate::nip57;
use crate::nip90::{self, JobStatus};
use crate::relay::outbox::Undelivered;
use crate::wallet::{PaymentHash, PaymentStatus};

/// Wallet lookups one reconcile pass keeps in flight at once.
pub const RECONCILE_LOOKUPS_IN_FLIGHT: usize = 8;

/// The longest wait between two lookups of an invoice past expiry.
const LATE_LOOKUP_EVERY: u64 = 24 * 60 * 60;

/// Lookups of invoices past expiry one reconcile pass makes at most (those not yet expired are
/// all looked up). However many invoices went unpaid (each was asked for by someone, and a
/// flood of fresh keys can ask for many), a pass asks the wallet a bounded number of times;
/// the rest wait, oldest first, for the next pass. A hint books a payment at any time.
pub const LATE_LOOKUPS_PER_PASS: usize = 1000;

impl Pipeline {
    /// Follow the wallet's settlement hints until `cancel` fires.
    pub async fn watch_settlements(self, cancel: CancellationToken) {
        let mut hints = self.inner.wallet.settlements();
        loop {
            let hint = tokio::select! {
                _ = cancel.cancelled() => break,
                hint = hints.recv() => hint,
            };
            match hint {
                Ok(hash) => {
                    self.inner.metrics.settlement_hint();
                    self.hinted(hash);
                }
                Err(RecvError::Lagged(missed)) => {
                    // Beside the hints, not instead of them: a long pass must not stall them.
                    // One such pass at a time: a burst of lags starts one, not one each.
                    let lag_pass = &self.inner.lag_pass;
                    if lag_pass.swap(true, std::sync::atomic::Ordering::AcqRel) {
                        tracing::warn!(
                            missed,
                            "settlement hints lagged; a reconcile pass is already running"
                        );
                        continue;
                    }
                    tracing::warn!(missed, "settlement hints lagged; reconciling now");
                    let pipeline = self.clone();
                    self.inner.tasks.spawn(async move {
                        pipeline.reconcile_after_gap().await;
                        pipeline
                            .inner
                            .lag_pass
                            .store(false, std::sync::atomic::Ordering::Release);
                    });
                }
                Err(RecvError::Closed) => break,
            }
        }
    }

    /// Look `hash` up because of a hint. A flood of hints for one hash (webhooks are
    /// unauthenticated) costs at most one lookup in flight plus one more after it.
    fn hinted(&self, hash: PaymentHash) {
        {
            let mut checking = self
                .inner
                .checking
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(again) = checking.get_mut(&hash) {
                *again = true;
                return;
            }
            checking.insert(hash, false);
        }
        let pipeline = self.clone();
        self.inner.tasks.spawn(async move {
            loop {
                pipeline.check_payment(&hash).await;
                let mut checking = pipeline
                    .inner
                    .checking
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                match checking.get_mut(&hash) {
                    Some(again) if *again => *again = false,
                    _ => {
                        checking.remove(&hash);
                        break;
                    }
                }
            }
        });
    }

    /// Look up every open invoice every `reconcile_interval_secs` until `cancel` fires.
    pub async fn reconcile(self, cancel: CancellationToken) {
        let every = Duration::from_secs(self.inner.config.reconcile_interval_secs.max(1));
        // The hints of a payment made while dvmd was down are gone. Until a pass after the gap
        // heard from the wallet on every invoice (it may start before the wallet is reachable),
        // the next pass is one too.
        let mut after_gap = true;
        loop {
            if after_gap {
                after_gap = !self.reconcile_after_gap().await;
            } else {
                self.reconcile_once().await;
            }
            // Payouts in flight, too (first on start: the recovery of a payout interrupted
            // between its booking and the wallet's answer).
            self.reconcile_payouts().await;
            // Sessions idle out even when the wallet no longer offers them (their refund is then
            // declined, and the rest stays on the account).
            self.close_idle_sessions().await;
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }

    /// One pass over the open invoices that are due: every unexpired one, and those past
    /// expiry whose backoff is over (see [`Pipeline::not_paid`]), at most
    /// [`LATE_LOOKUPS_PER_PASS`] of these.
    pub async fn reconcile_once(&self) {
        self.pass(false).await;
    }

    /// [`Pipeline::reconcile_once`] after settlement hints may have been lost (at start, and
    /// when they lagged): every challenge's invoice that can still be paid as well, which a
    /// regular pass leaves to its credential and to one lookup past its expiry. So the books
    /// hold a payment whose hint was lost within a pass, not only once its credential comes.
    /// Whether the wallet answered every lookup.
    pub async fn reconcile_after_gap(&self) -> bool {
        self.pass(true).await
    }

    /// One pass; whether the wallet answered every lookup it made.
    async fn pass(&self, challenges: bool) -> bool {
        let now = super::pipeline::unix_now();
        // A challenge is due a minute past its invoice's expiry: those issued under the
        // configured expiry, or a longer one from before a restart, or a wallet's own default
        // (an hour for BOLT11).
        let until = challenges.then(|| {
            now + self.inner.config.invoice_expiry_secs.max(3_600)
                + super::invoices::CHALLENGE_LATE_SECS
                + 1
        });
        let due = match self
            .inner
            .book
            .due_payments(now, LATE_LOOKUPS_PER_PASS, until)
            .await
        {
            Ok(due) => due,
            Err(e) => {
                tracing::error!(error = %e, "cannot list open invoices");
                return false;
            }
        };
        self.recount_open_invoices(&due, now);
        // A few lookups at a time: a pass over many open invoices does not wait on each in
        // turn, and never has more than this many wallet calls in flight.
        let answered = std::sync::atomic::AtomicBool::new(true);
        futures::stream::iter(due)
            .for_each_concurrent(RECONCILE_LOOKUPS_IN_FLIGHT, |(hash, _)| {
                let answered = &answered;
                async move {
                    if !self.check_payment(&hash).await {
                        answered.store(false, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            })
            .await;
        answered.into_inner()
    }

    /// Ask our wallet about `hash` and book what it says; `false` when the store or the wallet
    /// could not answer.
    pub async fn check_payment(&self, hash: &PaymentHash) -> bool {
        let inner = &self.inner;
        let record = match inner.book.payment(hash).await {
            Ok(Some(record)) if !record.consumed => record,
            Ok(_) => {
                tracing::debug!(payment_hash = %hash, "hint for an unknown or consumed payment hash");
                return true;
            }
            Err(e) => {
                tracing::error!(payment_hash = %hash, error = %e, "cannot read payment");
                return false;
            }
        };
        inner.metrics.wallet_lookup();
        let status = match inner.wallet.lookup(hash).await {
            Ok(status) => status,
            Err(e) => {
                tracing::warn!(payment_hash = %hash, error = %e, "wallet lookup failed; the reconciler retries");
                return false;
            }
        };
        match status {
            PaymentStatus::Paid { amount_msat } => {
                if self.book_payment(hash, amount_msat).await && record.zap_request.is_some() {
                    self.publish_zap_receipt(*hash);
                }
            }
            PaymentStatus::Expired => {
                if let Some(job) = &record.job {
                    self.expire_unless_zapped(job, hash).await
                }
                self.not_paid(hash, &record).await;
            }
            PaymentStatus::Pending => self.not_paid(hash, &record).await,
            PaymentStatus::Unknown => {
                tracing::warn!(payment_hash = %hash, job = ?record.job, "the wallet does not know an invoice it issued");
                self.not_paid(hash, &record).await;
            }
        }
        true
    }

    /// The wallet just said `hash` is not paid (pending, expired or unknown to it). Past the
    /// invoice's expiry plus `unpaid_grace_secs` its job expires, whatever the wallet calls
    /// it; the hash is still looked up, with a backoff that grows with its age up to once a
    /// day, until `late_lookup_secs` after expiry (a challenge's, which its credential looks
    /// up: [`CHALLENGE_LATE_SECS`]), when this answer closes it. Only a lookup that answered
    /// closes a record, never the clock alone, and a hint books it at any time.
    ///
    /// [`CHALLENGE_LATE_SECS`]: super::invoices::CHALLENGE_LATE_SECS
    async fn not_paid(&self, hash: &PaymentHash, record: &super::PaymentRecord) {
        let config = &self.inner.config;
        let now = super::pipeline::unix_now();
        if now <= record.expires_at {
            return;
        }
        if let Some(job) = &record.job {
            // A job stopped at its budget whose continuation went unpaid ends with what it has.
            self.give_up_continuation(job, Some(hash), "unpaid").await;
        }
        let overdue = now - record.expires_at;
        if overdue > config.unpaid_grace_secs {
            if let Some(job) = &record.job {
                self.expire_unless_zapped(job, hash).await;
            }
        }
        let late = if record.spent_by_credential() {
            super::invoices::CHALLENGE_LATE_SECS
        } else {
            config.late_lookup_secs
        };
        match self.inner.book.close_payment(hash, late).await {
            Ok(true) => {
                return tracing::info!(payment_hash = %hash, "invoice still unpaid long after expiry; no longer looked up")
            }
            Ok(false) => {}
            Err(e) => {
                return tracing::warn!(payment_hash = %hash, error = %e, "cannot close payment record")
            }
        }
        let backoff = (overdue / 2).clamp(config.reconcile_interval_secs.max(1), LATE_LOOKUP_EVERY);
        let mut next = now + backoff;
        if overdue <= config.unpaid_grace_secs {
            // The job still waits: look again no later than its grace ends, to expire it then.
            next = next.min(record.expires_at + config.unpaid_grace_secs + 1);
        }
        if let Err(e) = self.inner.book.defer_lookup(hash, next).await {
            tracing::warn!(payment_hash = %hash, error = %e, "cannot defer lookup");
        }
    }

    /// Whether a zap standing in for the continuation invoice `hash` (its record
    /// [`continues`](super::PaymentRecord::continues) it) may have paid it: each such open zap
    /// is looked up in our wallet now, and one found paid is booked, which pays the
    /// continuation. A continuation is given up for its unpaid invoice only when this is
    /// `false`, so a zap paid in time whose news was lost (a restart, a missed hint) makes the
    /// job run on rather than be credited. A store or wallet error counts as "may have": the
    /// next pass decides.
    pub(super) async fn zap_may_have_paid(&self, job: &JobId, hash: &PaymentHash) -> bool {
        self.zaps_may_have_paid(job, |_, record| record.continues == Some(*hash))
            .await
    }

    /// `job` expires for its unpaid invoice `hash`, unless a zap of the job may have paid it
    /// ([`Pipeline::zap_may_have_paid`], for the job's own zaps): a zap paid in time whose news
    /// was lost (a missed hint, the daemon down across the invoice's expiry) then pays the job,
    /// rather than being credited while the customer is told to post again.
    async fn expire_unless_zapped(&self, job: &JobId, hash: &PaymentHash) {
        let zapped = self.zaps_may_have_paid(job, |zap, _| zap != hash).await;
        if !zapped {
            self.expire(job).await;
        }
    }

    /// Look up every open zap of `job` that `stands_in` picks, booking one found paid; whether
    /// one may have paid (found paid, or not looked up: an error).
    async fn zaps_may_have_paid(
        &self,
        job: &JobId,
        stands_in: impl Fn(&PaymentHash, &super::PaymentRecord) -> bool,
    ) -> bool {
        let inner = &self.inner;
        let open = match inner.book.open_zaps_of(job).await {
            Ok(open) => open,
            Err(e) => {
                tracing::error!(error = %e, "cannot list open invoices");
                return true;
            }
        };
        let mut may_have = false;
        for (zap, _) in open.iter().filter(|(zap, r)| stands_in(zap, r)) {
            inner.metrics.wallet_lookup();
            match inner.wallet.lookup(zap).await {
                Ok(PaymentStatus::Paid { amount_msat }) => {
                    if self.book_payment(zap, amount_msat).await {
                        self.publish_zap_receipt(*zap);
                    }
                    may_have = true;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(payment_hash = %zap, error = %e, "wallet lookup failed; what the zap stands in for waits for the next pass");
                    may_have = true;
                }
            }
        }
        may_have
    }

    /// Book a confirmed payment; `true` if this call booked it (not a repeat).
    async fn book_payment(&self, hash: &PaymentHash, amount_msat: u64) -> bool {
        let inner = &self.inner;
        let confirmed_at = Instant::now();
        let booked = inner.book.confirm_payment(hash, amount_msat).await;
        let fresh = matches!(
            booked,
            Ok(PaymentOutcome::Paid(_)
                | PaymentOutcome::Credited { .. }
                | PaymentOutcome::Underpaid(_))
        );
        match booked {
            Ok(PaymentOutcome::Paid(job)) => {
                self.release_invoice_slot(&job.customer);
                inner.metrics.payment_confirmed(amount_msat);
                inner.metrics.entered(JobState::Paid);
                tracing::info!(job = %job.id, msat = amount_msat, payment_hash = %hash, "invoice paid");
                self.enqueue(*job, Some(confirmed_at)).await;
            }
            Ok(PaymentOutcome::Credited { account, job }) => {
                if job.is_some() {
                    // A job's invoice held a slot; a top-up's never did.
                    self.release_invoice_slot(&account);
                }
                inner.metrics.payment_confirmed(amount_msat);
                tracing::info!(%account, job = ?job, msat = amount_msat, "payment credited to the account");
            }
            Ok(PaymentOutcome::Underpaid(job)) => {
                self.release_invoice_slot(&job.customer);
                inner.metrics.payment_confirmed(amount_msat);
                tracing::warn!(job = %job.id, msat = amount_msat, "payment below the invoice amount; credited to the customer");
                if job.continues_on(hash) {
                    // Its invoice is spent: nothing else can pay for the rest.
                    self.give_up_continuation(&job.id, None, "underpaid").await;
                }
            }
            Ok(PaymentOutcome::AlreadyConsumed | PaymentOutcome::Unknown) => {}
            Err(e) => tracing::error!(payment_hash = %hash, error = %e, "cannot book payment"),
        }
        fresh
    }

    /// Publish the NIP-57 receipt for the zap of `hash` (booked, its receipt owed) in a task of
    /// its own, so a wallet pass never waits on relays.
    fn publish_zap_receipt(&self, hash: PaymentHash) {
        let pipeline = self.clone();
        self.inner
            .tasks
            .spawn(async move { pipeline.deliver_zap_receipt(&hash).await });
    }

    /// Publish the receipt for the zap of `hash` to the zap request's relays and ours until one
    /// takes it (relays that cannot be reached are retried for as long as the daemon runs, as
    /// a result is), then record it out. The booking is made durable first: a receipt is a
    /// public claim of payment. The receipt is dated when the zap was booked, so publishing it
    /// again (after a crash before it was recorded out) makes the same event, which relays and
    /// clients count once. One every relay refuses stays owed, for the next start.
    async fn deliver_zap_receipt(&self, hash: &PaymentHash) {
        let inner = &self.inner;
        let (due, record) = match (
            inner.book.zap_receipt_due(hash).await,
            inner.book.payment(hash).await,
        ) {
            (Ok(Some(paid_at)), Ok(Some(record))) => (paid_at, record),
            (Ok(None), _) | (_, Ok(None)) => return,
            (Err(e), _) | (_, Err(e)) => {
                return tracing::error!(payment_hash = %hash, error = %e, "cannot read the zap to receipt")
            }
        };
        let Some(zap_request) = &record.zap_request else {
            return;
        };
        let request = match nip57::parse_zap_request_unchecked_amount(zap_request) {
            Ok(request) => request,
            Err(e) => return tracing::error!(error = %e, "stored zap request unreadable"),
        };
        if let Err(e) = inner.book.store().sync().await {
            return tracing::error!(error = %e, "cannot persist zap payment");
        }
        let paid_at = nostr_sdk::Timestamp::from_secs(due);
        let receipt = self.sign(nip57::receipt(&request, &record.bolt11, None, paid_at));
        let delivered = inner
            .outbox
            .deliver(&receipt, &request.relays, inner.config.result_refusals)
            .await;
        match delivered {
            Ok(_) => {
                tracing::info!(zap = %request.event.id, sender = %request.event.pubkey, receipt = %receipt.id, "zap receipt published");
                if let Err(e) = inner.book.zap_receipt_published(hash).await {
                    tracing::warn!(payment_hash = %hash, error = %e, "zap receipt published, not recorded; it goes out again (the same event) on the next start");
                }
            }
            Err(Undelivered::Refused(refusals)) => {
                let said: Vec<String> = refusals
                    .iter()
                    .map(|(relay, message)| format!("{relay}: {message}"))
                    .collect();
                tracing::error!(zap = %request.event.id, refusals = %said.join("; "), "every write relay refused the zap receipt; it is tried again on the next start")
            }
            Err(Undelivered::Stopped) => {
                tracing::info!(zap = %request.event.id, "zap receipt not published yet; it goes out on the next start")
            }
        }
    }

    /// Publish every zap receipt still owed (see [`Book::zap_receipts_due`]), one after
    /// another in the caller's task (so however many a long outage left, one is in flight).
    /// On start.
    ///
    /// [`Book::zap_receipts_due`]: super::Book::zap_receipts_due
    pub async fn publish_due_zap_receipts(&self) {
        let due = match self.inner.book.zap_receipts_due().await {
            Ok(due) => due,
            Err(e) => return tracing::error!(error = %e, "cannot read the zap receipts owed"),
        };
        if !due.is_empty() {
            tracing::info!(
                count = due.len(),
                "publishing zap receipts owed since before the restart"
            );
        }
        for (hash, _) in due {
            self.deliver_zap_receipt(&hash).await;
        }
    }

    /// `AwaitingPayment -> Expired`, with an `error` feedback saying so.
    async fn expire(&self, id: &JobId) {
        // Durable before the customer is told to post again: a late payment for this invoice
        // must then be credited, never run the job as well.
        let expired = self
            .inner
            .book
            .transition_durably(id, JobState::Expired, |_| {})
            .await;
        match expired {
            Ok(job) => {
                self.inner.metrics.entered(JobState::Expired);
                tracing::info!(job = %id, "invoice expired unpaid");
                self.label_job(&job);
                if let Ok(event) = job.request_event() {
                    self.expired_feedback(&job, &event).await;
                }
            }
            Err(e) => tracing::debug!(job = %id, error = %e, "not expiring"),
        }
    }

    async fn expired_feedback(&self, job: &super::Job, event: &Event) {
        let feedback = nip90::feedback(
            event,
            JobStatus::Error,
            "the invoice expired unpaid; post the request again for a new one",
            None,
        );
        self.send_feedback(job, feedback, FEEDBACK_ATTEMPTS).await;
    }
}

#[cfg(test)]
mod tests;
