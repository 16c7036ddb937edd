//! dvmd sells AI inference on Nostr for Lightning payments (NIP-90 data vending machine).
//!
//! # How a job flows
//! ```text
//! relay::intake   verify id+sig (nip90::Verified), screen (kind, p-targeting, age,
//!                 the author's trust tier: blocked, NIP-13 work and a shared bucket for new
//!                 keys, then the npub's own bucket)
//!                 -> job::Pipeline::handle (waits for one of INTAKE_TASKS permits);
//!                 gaps (lagged buffer, reconnected relay) are fetched again;
//!                 a kind 5 from the customer cancels a job not yet paid
//! job::pipeline   task: dedup insert -> quote (pricing; refuse what could not be delivered)
//!                 -> free: Running | credit covers it: reserve + Running (book.spend_credit)
//!                 | trusted npub that names us: Running on credit it owes (job::pay_after;
//!                 the result carries the invoice) | invoice for the rest (wallet)
//!                 -> commit AwaitingPayment -> `payment-required` (relay::outbox)
//! job::zap        LNURL callback (http::lnurl): a zap naming the job gets its own invoice
//! job::account    HTTP /v1 (http::api, NIP-98 says whose): balance and history, top-up
//!                 invoices that credit the npub (booked like any payment: job::payment)
//! job::direct     HTTP jobs (http::chat /v1/chat/completions, http::jobs /v1/jobs): priced
//!                 like relay jobs, opened Running with the quote reserved from the account
//!                 (COMMIT, or 402 + a top-up invoice), run by the same workers, answered on
//!                 their door (job::Door: the waiting response, streamed or whole, or the
//!                 stored record), charged the exact usage
//! job::tokens     L402 (http::l402, l402): a call with no credential gets 402 with a
//!                 macaroon and an invoice (COMMIT first) whose payment credits the token's
//!                 own account; `L402 <macaroon>:<preimage>` spends from it; the same 402
//!                 offers the HTTP `Payment` scheme (mpp) for the same invoice, its challenge
//!                 stored by id and accepted once
//! job::sessions   HTTP `Payment` sessions (http::session): the 402's invoice is a deposit
//!                 (`open`), calls spend it (`bearer`), a dry stream waits for a `topUp`
//!                 (a transfer into the session's account), `close` or idling refunds the
//!                 rest to an amountless return invoice (job::payouts, two phases)
//! job::payment    wallet settlement hint (coalesced per hash) or reconciler
//!                 -> wallet.lookup(hash)
//!                 -> book.confirm_payment: consume hash + payment_in + reserve + Paid, one tx
//!                 -> bounded run queue
//! job::worker     Running -> `processing` beside infer::Backend (bounded pool)
//!                 -> commit signed result -> delivery task: publish until acked (or every
//!                 relay refused: Failed, credited) -> Delivered -> `success`
//!                 -> book.settle: release the hold, charge exact usage, Settled (and count
//!                 the charge towards the payer's trust tier, same write)
//! job::continuation a relay job out of budget before it is done: AwaitingContinuation
//!                 (text so far + invoice for the rest, COMMIT) -> `partial` +
//!                 `payment-required`; paid -> Paid -> the worker runs on from the text so
//!                 far; unpaid at the deadline or cancelled -> the text so far is the result
//! job::reputation a tier change -> NIP-32 label (trust::labels), the old one deleted
//! job::prune      hourly: records of jobs that ended without money, once their request is
//!                 too old to be admitted again
//! job::recovery   on start, every unfinished job resumes from its persisted state
//! ```
//! A job's id is a [`job::JobId`] (a relay job's is its request event id); a ledger account is
//! a [`ledger::Account`] (an npub, or the payment hash of a paid L402 challenge).
//!
//! Every state change goes through the one transition table in [`job::state`] and is persisted
//! before the side effect it allows. Money is msat everywhere; the [`ledger`] invariant is
//! `sum(payment_in) = sum(charge) + sum(payout) + sum(expiry) + sum(balances) + held`, where
//! `held` is what running jobs hold (`reserve - release`); [`job::audit`] checks it per job.
//!
//! # Where things live
//! - Pure protocol and policy (no IO): [`nip90`] (tag model), [`nip57`], [`l402`]
//!   (macaroons), [`mpp`] (the HTTP `Payment` scheme), [`pricing`], [`job::state`], the tiers
//!   and labels of [`trust`] (its registry keeps them in memory over the store).
//! - External systems behind traits: [`wallet::Wallet`] (dev, LNbits, NWC; plus an LNURL-pay
//!   client for payouts), [`infer::Backend`] (embedded llama.cpp, any OpenAI-compatible server).
//! - Events' ids and signatures are checked once per process: [`signatures`]; events are
//!   written as JSON by [`event_json`].
//! - IO: [`relay`] (pool, outbox, intake, our embedded relay), [`store`] (sled behind one
//!   writer thread that commits in groups: the only module that names sled), [`http`].
//! - Wiring and lifecycle: [`daemon`]; configuration: [`config`]; the CLI is `src/bin/dvmd/`;
//!   figures: [`mod@bench`].
//!
//! See `ARCHITECTURE.md` for the data flow, the job state table, the money rules and the store
//! writer, and `nips/` for the protocol texts dvmd follows.

#![warn(missing_docs)]

pub mod bench;
pub mod config;
pub mod customer;
pub mod daemon;
pub mod event_json;
pub mod http;
pub mod identity;
pub mod incident;
pub mod infer;
pub mod job;
pub mod l402;
pub mod ledger;
pub mod limits;
pub mod metrics;
pub mod mpp;
pub mod nip57;
pub mod nip89;
pub mod nip90;
pub mod pricing;
pub mod relay;
pub mod signatures;
pub mod store;
pub mod trust;
pub mod wallet;
