//! Recovery on start: every unfinished job resumes from its persisted state.

use super::pipeline::Pipeline;
use super::state::JobState;
use crate::nip90::JobRequest;

/// What recovery found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    /// Jobs re-screened or re-quoted.
    pub requoted: usize,
    /// Jobs still waiting for payment.
    pub awaiting_payment: usize,
    /// Jobs queued to run, deliver or settle.
    pub queued: usize,
}

impl Pipeline {
    /// Resume every job that was not in a terminal state when the daemon stopped.
    pub async fn recover(&self) -> Recovered {
        let mut report = Recovered::default();
        let jobs = match self.inner.book.unfinished().await {
            Ok(jobs) => jobs,
            Err(e) => {
                tracing::error!(error = %e, "cannot list unfinished jobs");
                return report;
            }
        };
        for job in jobs {
            if job.door.is_http() {
                // Opened `Running` and paid: a `/v1/jobs` job runs again; a chat completion's
                // client is gone, so the worker fails it and releases its hold.
                report.queued += 1;
                self.enqueue(job, None).await;
                continue;
            }
            let event = match job.request_event() {
                Ok(event) => event,
                // A job past payment holds money: the worker fails and settles it (or settles
                // it as it stands), so what it holds goes back to the payer.
                Err(e)
                    if matches!(
                        job.state,
                        JobState::Paid
                            | JobState::Running
                            | JobState::AwaitingContinuation
                            | JobState::Delivered
                            | JobState::Failed
                    ) =>
                {
                    tracing::error!(job = %job.id, error = %e, "stored request unreadable; failing the job");
                    report.queued += 1;
                    self.enqueue(job, None).await;
                    continue;
                }
                Err(e) => {
                    tracing::error!(job = %job.id, error = %e, "stored request unreadable; skipping");
                    continue;
                }
            };
            match job.state {
                JobState::Received => {
                    let Some(request) = JobRequest::parse(&event) else {
                        continue;
                    };
                    report.requoted += 1;
                    let pipeline = self.clone();
                    self.inner
                        .tasks
                        .spawn(async move { pipeline.process(job, event, request).await });
                }
                JobState::Quoted => {
                    report.requoted += 1;
                    let pipeline = self.clone();
                    self.inner
                        .tasks
                        .spawn(async move { pipeline.ask_payment(job, &event, None).await });
                }
                // Given up with the text so far: its result is stored, deliver it.
                JobState::AwaitingContinuation if job.result_event.is_some() => {
                    report.queued += 1;
                    self.enqueue(job, None).await;
                }
                JobState::AwaitingPayment | JobState::AwaitingContinuation => {
                    report.awaiting_payment += 1;
                    // The invoice may have been persisted but never shown: show it again (the
                    // same signed event), then ask the wallet whether it was paid meanwhile
                    // (an unpaid continuation whose invoice expired is given up then).
                    let pipeline = self.clone();
                    self.inner.tasks.spawn(async move {
                        if job.state == JobState::AwaitingContinuation {
                            pipeline.show_partial(&job, &event).await;
                        }
                        if let Some(feedback) = job.last_feedback.as_deref() {
                            pipeline.republish(&job, feedback).await;
                        }
                        if let Some(invoice) = job.awaited_invoice() {
                            pipeline.check_payment(&invoice.payment_hash).await;
                        }
                    });
                }
                JobState::Paid | JobState::Running | JobState::Delivered | JobState::Failed => {
                    report.queued += 1;
                    self.enqueue(job, None).await;
                }
                JobState::Rejected
                | JobState::Settled
                | JobState::Expired
                | JobState::Cancelled => {}
            }
        }
        tracing::info!(
            requoted = report.requoted,
            awaiting_payment = report.awaiting_payment,
            queued = report.queued,
            "recovered unfinished jobs"
        );
        report
    }

    async fn republish(&self, job: &super::Job, json: &str) {
        use nostr_sdk::JsonUtil;
        if let Ok(event) = nostr_sdk::Event::from_json(json) {
            let _ = self
                .inner
                .outbox
                .publish(&event, &job.reply_relays, 3)
                .await;
        }
    }
}
