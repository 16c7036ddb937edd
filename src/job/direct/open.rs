//! Pricing and opening an HTTP call: the write that stores it `Running` with its quote
//! reserved, under the id the call names, using the `charge` credential that paid for it.

use super::HttpRequest;
use crate::job::book::BookError;
use crate::job::holds::PaidBy;
use crate::job::id::JobId;
use crate::job::pipeline::{unix_now, Pipeline};
use crate::job::record::{Door, Job};
use crate::job::state::JobState;
use crate::ledger::Account;
use crate::nip90::{RequestError, TextGeneration};
use crate::pricing::Estimate;

/// The account an HTTP call spends from, and what paid into it for this call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpPayer {
    /// The account.
    pub account: Account,
    /// The challenge of the HTTP `Payment` `charge` credential whose payment is on `account`,
    /// if one pays for this call: the open uses it ([`PaidBy::Charge`]).
    pub charge: Option<String>,
}

/// A priced HTTP request, ready to open.
#[derive(Debug, Clone, PartialEq)]
pub struct Priced {
    /// The request.
    pub request: HttpRequest,
    /// What it is expected to cost.
    pub estimate: Estimate,
    /// The caller's bid, if any: the most it may cost.
    pub bid_msat: Option<u64>,
    /// What the account must hold to open it, msat: the p90, never above the bid. Opening
    /// reserves up to the cap (within the bid) when the balance has it.
    pub quote_msat: u64,
}

impl Priced {
    /// The same call with the most it may cost lowered to `bid_msat` (its quote with it),
    /// priced from the estimate already made; refused when the bid cannot pay for its prompt
    /// and one token.
    pub fn within(mut self, bid_msat: u64) -> Result<Self, RequestError> {
        let bid = self.bid_msat.map_or(bid_msat, |bid| bid.min(bid_msat));
        crate::job::quote::check_bid(bid, &self.estimate)?;
        self.bid_msat = Some(bid);
        self.quote_msat = self.estimate.ask(Some(bid)).due_msat;
        Ok(self)
    }
}

/// Why an HTTP job did not open.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The account's balance does not cover the quote.
    #[error("the balance of {balance_msat} msat does not cover the quote of {quote_msat} msat")]
    Shortfall {
        /// The quote.
        quote_msat: u64,
        /// The spendable balance.
        balance_msat: u64,
    },
    /// The store failed.
    #[error(transparent)]
    Book(#[from] BookError),
    /// The task that opens and queues the job ended without an answer (it panicked).
    #[error("the job could not be opened: {0}")]
    Interrupted(String),
}

impl Job {
    /// A job that comes in through an HTTP door, not yet stored: `id` is the one the call
    /// names (its NIP-98 auth event's, or its `Idempotency-Key`'s; see
    /// [`Pipeline::open_http`]), else random.
    pub fn http(
        id: Option<JobId>,
        account: Account,
        door: Door,
        kind: u16,
        priced: &Priced,
        now: u64,
    ) -> Self {
        let request = serde_json::to_string(&priced.request).unwrap_or_default();
        let id = id.unwrap_or_else(JobId::random);
        let mut job = Self::new(id, account, kind, door, request, now);
        job.price_with(priced.estimate, priced.bid_msat);
        job
    }
}

impl Pipeline {
    /// Price a validated generation of `kind` for an HTTP door: the model must be ours, the
    /// prompt and its budget must fit the context window, and a bid must pay for at least the
    /// prompt and one token (the checks a relay job's quote makes).
    pub async fn price_http(
        &self,
        kind: u16,
        generation: TextGeneration,
        bid_msat: Option<u64>,
    ) -> Result<Priced, RequestError> {
        let estimate = self.price(kind, &generation).await?;
        if let Some(bid) = bid_msat {
            crate::job::quote::check_bid(bid, &estimate)?;
        }
        Ok(Priced {
            request: HttpRequest {
                generation: generation.request,
                max_tokens: generation.max_tokens,
                prompt_tokens: estimate.prompt_tokens,
                session: None,
            },
            quote_msat: estimate.ask(bid_msat).due_msat,
            estimate,
            bid_msat,
        })
    }

    /// [`Pipeline::open_http`], then the opened job queued for a worker (its answer going to
    /// `live`), in a task of its own. The caller may go away between the two: an HTTP client
    /// that disconnects drops its handler, and every future the handler awaits with it. Had the
    /// handler opened and queued the job itself, that left the job stored `Running`, its quote
    /// held from the balance (a `Payment` `charge` credential used, a session's funds held), and
    /// nothing to run or release it until the next start.
    #[allow(clippy::too_many_arguments)]
    pub async fn start_http(
        &self,
        id: Option<JobId>,
        payer: HttpPayer,
        door: Door,
        kind: u16,
        priced: Priced,
        answer_now: bool,
        live: Option<super::LiveSink>,
    ) -> Result<Job, OpenError> {
        let pipeline = self.clone();
        let started = tokio::spawn(async move {
            let job = pipeline
                .open_http(id, payer, door, kind, &priced, answer_now)
                .await?;
            pipeline.run_http(job.clone(), live).await;
            Ok(job)
        });
        started
            .await
            .unwrap_or_else(|e| Err(OpenError::Interrupted(e.to_string())))
    }

    /// Open a priced HTTP job on `account`: store it `Running` with its whole quote reserved
    /// from the account's balance, in one write. Nothing is stored when the balance does not
    /// cover the quote. The write is durable before this returns when `answer_now` (a stream's
    /// first chunk, or a 202, follows at once); a whole response is only written after the
    /// result's commit, which makes this write durable too (commits are in order), so it
    /// saves an fsync. A crash before then loses the job and its reservation together:
    /// nothing was charged and nothing was answered.
    ///
    /// A call that names its job (`id`: a NIP-98 call's auth event id, or [`JobId::idempotent`]
    /// of an unsigned call's `Idempotency-Key`) opens it under that id: the same call made
    /// again finds it stored and gets [`BookError::JobExists`], in the same write that would
    /// reserve its quote, so one request never pays for two jobs (the verifier's replay cache
    /// is in memory, and a restart empties it).
    ///
    /// A call paid by an HTTP `Payment` `charge` credential names its challenge
    /// ([`HttpPayer::charge`]): the challenge is used in that same write, after those checks,
    /// so a call refused there (its job exists, or the balance falls short of a quote that
    /// moved) leaves it unused, and of two calls racing with one credential one opens.
    pub async fn open_http(
        &self,
        id: Option<JobId>,
        payer: HttpPayer,
        door: Door,
        kind: u16,
        priced: &Priced,
        answer_now: bool,
    ) -> Result<Job, OpenError> {
        let HttpPayer { account, charge } = payer;
        let mut job = Job::http(id, account, door, kind, priced, unix_now());
        if priced.request.session.is_some() {
            // A session call opens with what the session has, if that pays for its prompt and
            // one token; a stream that runs dry asks for a top-up.
            let balance = self.balance_of(account).await?;
            let floor = self
                .inner
                .config
                .rate_card
                .quote(priced.request.prompt_tokens, 1);
            if balance < floor {
                return Err(OpenError::Shortfall {
                    quote_msat: floor,
                    balance_msat: balance,
                });
            }
            job.quote_msat = job.quote_msat.map(|quote| quote.min(balance));
        } else if self.runs_free(&account) {
            // Nothing to reserve, nothing charged, no budget to stop at.
            job.quote_msat = Some(0);
            job.limit_msat = Some(0);
        }
        let pay_after = self.may_pay_after_http(&account);
        let paid_by = match (priced.request.session, charge) {
            (Some(session), _) => PaidBy::Session(session),
            (None, Some(challenge)) => PaidBy::Charge(challenge),
            (None, None) => PaidBy::Balance,
        };
        let opened = match self
            .inner
            .book
            .open_on_credit(job.clone(), answer_now, paid_by)
            .await?
        {
            // Short of balance, but trusted: run now, and pay for what it used after.
            Err(_) if pay_after => {
                let credit = self.inner.trust.policy().trusted_credit_msat;
                match self
                    .inner
                    .book
                    .open_pay_after_new(job, credit, answer_now)
                    .await?
                {
                    Ok(job) => {
                        tracing::info!(job = %job.id, door = door.as_str(), account = %job.customer, limit_msat = job.limit_msat(), "http job runs before it is paid");
                        Ok(job)
                    }
                    Err(balance) => Err(balance),
                }
            }
            opened => opened,
        };
        match opened {
            Ok(job) => {
                let metrics = &self.inner.metrics;
                metrics.entered(JobState::Received);
                metrics.entered(JobState::Quoted);
                metrics.entered(JobState::Running);
                if !job.pay_after {
                    metrics.paid_from_credit(job.quote_msat.unwrap_or(0));
                }
                metrics.http_job_opened(door == Door::HttpChat);
                tracing::info!(job = %job.id, door = door.as_str(), account = %job.customer, quote_msat = priced.quote_msat, "http job opened");
                Ok(job)
            }
            Err(balance_msat) => Err(OpenError::Shortfall {
                quote_msat: priced.quote_msat,
                balance_msat,
            }),
        }
    }

    /// An HTTP job by id, if `account` owns it.
    pub async fn http_job(&self, id: &JobId, account: &Account) -> Result<Option<Job>, BookError> {
        Ok(self
            .inner
            .book
            .get(id)
            .await?
            .filter(|job| job.door.is_http() && job.customer == *account))
    }
}
