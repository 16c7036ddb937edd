//! The persisted job record.

use crate::ledger::Account;
use nostr_sdk::{Event, JsonUtil};

use super::id::JobId;
use serde::{Deserialize, Serialize};

use super::state::{IllegalTransition, JobState};
use crate::infer::Usage;
use crate::pricing::{Estimate, RateCard, Receipt};
use crate::wallet::PaymentHash;

fn is_relay(door: &Door) -> bool {
    *door == Door::Relay
}

/// The invoice a job waits on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobInvoice {
    /// BOLT11 string.
    pub bolt11: String,
    /// Its payment hash.
    pub payment_hash: PaymentHash,
    /// Amount asked, msat.
    pub amount_msat: u64,
    /// Unix seconds.
    pub expires_at: u64,
}

/// What quoting a paid job decided. The quote is not a write of its own: it is stored with the
/// write that follows it (the invoice, the credit reserved, or a pay-after start), one write a
/// job fewer, since nothing is shown or moved on the quote alone. A crash in between leaves
/// the job `Received`, and recovery quotes it again (an invoice issued meanwhile was never
/// shown, and expires).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quote {
    quote_msat: Option<u64>,
    limit_msat: Option<u64>,
    estimate: Option<Estimate>,
}

/// The door a job came in by, which decides where its answers go (the delivery port): the job
/// core calls the relay outbox for relay jobs, and the waiting response or the stored record for
/// HTTP jobs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Door {
    /// A NIP-90 request event on a relay: feedback and the result are signed events published
    /// through the outbox; `Delivered` means a relay acked the result.
    #[default]
    Relay,
    /// `POST /v1/jobs`: the result is stored for `GET /v1/jobs/{id}` (`Delivered` means stored),
    /// and an unfinished job resumes after a restart like a relay job.
    HttpJob,
    /// `POST /v1/chat/completions`: the answer is written to the waiting response, streamed or
    /// whole (`Delivered` means written). Its client is gone after a restart, so an unfinished
    /// job then fails and what it holds is released.
    HttpChat,
}

impl Door {
    /// Whether this is one of the HTTP doors.
    pub fn is_http(self) -> bool {
        self != Self::Relay
    }

    /// The label for logs and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Relay => "relay",
            Self::HttpJob => "http_job",
            Self::HttpChat => "http_chat",
        }
    }
}

/// One job, from request to settlement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// The request event id.
    pub id: JobId,
    /// The customer.
    pub customer: Account,
    /// Request kind.
    pub kind: u16,
    /// The door it came in by.
    #[serde(default, skip_serializing_if = "is_relay")]
    pub door: Door,
    /// For a relay job, the request event JSON exactly as received (the result's `request` tag;
    /// re-parsed on recovery). For an HTTP job, the [`HttpRequest`] as it will run, in JSON.
    ///
    /// [`HttpRequest`]: super::direct::HttpRequest
    pub request: String,
    /// Current state.
    pub state: JobState,
    /// Why it was rejected or failed.
    pub reason: Option<String>,
    /// Unix seconds when first seen. Part of the job's store key, so it never changes.
    pub received_at: u64,
    /// Unix seconds of the last transition.
    pub updated_at: u64,
    /// Relays to answer on besides our write relays: the request's `relays` tag and the relay
    /// it arrived from.
    pub reply_relays: Vec<String>,
    /// What the job must be funded with before it runs, msat: enough for 96% of such jobs (at
    /// least the p90), never above the bid (for records from before the estimator, the worst
    /// case).
    pub quote_msat: Option<u64>,
    /// The estimate quoted (p50, p90, confidence, cap, prompt tokens counted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate: Option<Estimate>,
    /// The most the job may hold, msat: its cap, never above the bid. Credit is reserved up to
    /// this, so a job paid from credit can run to its cap; `None` means `quote_msat`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_msat: Option<u64>,
    /// The invoice, once issued.
    pub invoice: Option<JobInvoice>,
    /// The invoice for the rest of a job that stopped at its budget before it was done (see
    /// [`super::continuation`]); `invoice` stays the one that paid for the start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continuation: Option<JobInvoice>,
    /// What the wallet confirmed as paid, msat.
    pub paid_msat: u64,
    /// What the job reserved from the customer's credit, msat: all of the quote for a job paid
    /// from credit, part of it when the invoice asks only for the difference.
    #[serde(default)]
    pub credit_msat: u64,
    /// What the ledger holds for this job now (its reserved credit and its payment), msat;
    /// released when it settles or ends unpaid. Zero for records from before holds, whose
    /// payment is charged from the balance as it was then.
    #[serde(default)]
    pub held_msat: u64,
    /// Run before it is paid (a `trusted` npub's request that names us): nothing is held; the
    /// charge becomes a debt at settlement, and the result carries an invoice for it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pay_after: bool,
    /// Who paid, when not the customer (someone else zapped the job). The charge and the
    /// change go to the account that paid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer: Option<Account>,
    /// What the job was charged, msat (after it ran).
    pub charge_msat: Option<u64>,
    /// Exact token usage.
    pub usage: Option<Usage>,
    /// The usage receipt (rates, paid, charged, returned, why it stopped) of an HTTP job, as
    /// shown (a relay job's is in its signed result event).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<Receipt>,
    /// The signed result event, persisted before it is published (relay jobs).
    pub result_event: Option<String>,
    /// The generated text, persisted before any of it counts as delivered (HTTP jobs); for a
    /// relay job continued after its budget, the text generated so far (its `usage` counts it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    /// The latest signed feedback event, replayed to duplicates of the request.
    pub last_feedback: Option<String>,
}

impl Job {
    /// A freshly received job.
    pub fn received(request: &Event, reply_relays: Vec<String>, now: u64) -> Self {
        Self::received_as(
            request,
            crate::event_json::to_json(request),
            reply_relays,
            now,
        )
    }

    /// [`Job::received`] with the request already serialized as `json`.
    pub fn received_as(request: &Event, json: String, reply_relays: Vec<String>, now: u64) -> Self {
        let mut job = Self::new(
            request.id.into(),
            request.pubkey.into(),
            request.kind.as_u16(),
            Door::Relay,
            json,
            now,
        );
        job.reply_relays = reply_relays;
        job
    }

    /// A job just `Received`, with nothing decided yet.
    pub(super) fn new(
        id: JobId,
        customer: Account,
        kind: u16,
        door: Door,
        request: String,
        now: u64,
    ) -> Self {
        Self {
            id,
            customer,
            kind,
            door,
            request,
            state: JobState::Received,
            reason: None,
            received_at: now,
            updated_at: now,
            reply_relays: Vec::new(),
            quote_msat: None,
            estimate: None,
            limit_msat: None,
            invoice: None,
            continuation: None,
            paid_msat: 0,
            credit_msat: 0,
            held_msat: 0,
            pay_after: false,
            payer: None,
            charge_msat: None,
            usage: None,
            receipt: None,
            result_event: None,
            result: None,
            last_feedback: None,
        }
    }

    /// Move to `next` if the transition table allows it.
    pub fn transition(&mut self, next: JobState, now: u64) -> Result<(), IllegalTransition> {
        self.state.check_transition(next)?;
        self.state = next;
        self.updated_at = now;
        Ok(())
    }

    /// The account that paid for the job: charged for it, and credited with the change.
    pub fn payer(&self) -> Account {
        self.payer.unwrap_or(self.customer)
    }

    /// What the job may be charged at most: its payment and the credit it reserved.
    pub fn funds_msat(&self) -> u64 {
        self.paid_msat.saturating_add(self.credit_msat)
    }

    /// The most credit the job may reserve, msat.
    pub fn limit_msat(&self) -> u64 {
        self.limit_msat.or(self.quote_msat).unwrap_or(0)
    }

    /// Price the job as `estimate` says for a customer who bid `bid_msat` (see
    /// [`Estimate::ask`]).
    pub fn price_with(&mut self, estimate: Estimate, bid_msat: Option<u64>) {
        let ask = estimate.ask(bid_msat);
        self.quote_msat = Some(ask.due_msat);
        self.limit_msat = Some(ask.limit_msat);
        self.estimate = Some(estimate);
    }

    /// The quote of a `Quoted` job, to store with the write that follows it.
    pub fn quote(&self) -> Option<Quote> {
        (self.state == JobState::Quoted).then_some(Quote {
            quote_msat: self.quote_msat,
            limit_msat: self.limit_msat,
            estimate: self.estimate,
        })
    }

    /// `Received -> Quoted` with `quote`, inside the write that follows the quote (see
    /// [`Quote`]); nothing when there is none or the job has moved on (a job quoted before, or
    /// cancelled meanwhile, which the write's own transition then refuses).
    pub fn take_quote(&mut self, quote: Option<Quote>, at: u64) -> Result<(), IllegalTransition> {
        match quote {
            Some(quote) if self.state == JobState::Received => {
                self.transition(JobState::Quoted, at)?;
                self.quote_msat = quote.quote_msat;
                self.limit_msat = quote.limit_msat;
                self.estimate = quote.estimate;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The completion tokens the job's funds pay for, when that is less than it asked for:
    /// generation stops there. `None` for a free job or one funded to its cap.
    pub fn budget_tokens(&self, card: &RateCard) -> Option<u32> {
        let estimate = self.estimate?;
        if self.quote_msat == Some(0) {
            return None;
        }
        // A job that ran before (and is continued) knows its prompt's exact count.
        let prompt_tokens = self
            .usage
            .map_or(estimate.prompt_tokens, |u| u.prompt_tokens);
        let tokens = card.completion_tokens_within(self.spendable_msat(), prompt_tokens);
        (tokens < estimate.max_tokens).then_some(tokens)
    }

    /// The receipt of its run: charged for `usage` within what it may be charged (a pay-after
    /// job's charge is owed: nothing paid, nothing returned).
    pub fn receipt_for(
        &self,
        card: RateCard,
        usage: crate::infer::Usage,
        finish: crate::pricing::Finish,
    ) -> Receipt {
        if self.pay_after {
            Receipt::owed(card, usage, self.limit_msat(), finish)
        } else {
            Receipt::new(card, usage, self.funds_msat(), finish)
        }
    }

    /// What the job may be charged: its funds, or for a pay-after job its limit (what it may owe).
    pub fn spendable_msat(&self) -> u64 {
        if self.pay_after {
            self.limit_msat()
        } else {
            self.funds_msat()
        }
    }

    /// Whether the job waits for `hash` to pay for its continuation: it stopped at its budget,
    /// showed that invoice, and was not given up yet (a given-up job has its result).
    pub fn continues_on(&self, hash: &PaymentHash) -> bool {
        self.state == JobState::AwaitingContinuation
            && self.result_event.is_none()
            && self
                .continuation
                .as_ref()
                .is_some_and(|i| i.payment_hash == *hash)
    }

    /// The invoice the job waits on now: the continuation's while it awaits one.
    pub fn awaited_invoice(&self) -> Option<&JobInvoice> {
        match self.state {
            JobState::AwaitingContinuation => self.continuation.as_ref(),
            _ => self.invoice.as_ref(),
        }
    }

    /// The request event, re-parsed from the stored JSON.
    pub fn request_event(&self) -> Result<Event, nostr_sdk::event::Error> {
        Event::from_json(&self.request)
    }
}
