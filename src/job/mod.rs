//! Jobs: the record, the state machine, the book that persists them with their money, and the
//! pipeline that drives a request from intake to settlement.
//!
//! - [`state`]: `JobState` and the one transition table.
//! - [`record`]: the persisted `Job`.
//! - [`book`]: the store transactions that move a job and the ledger together.
//! - [`invoices`]: the invoices we issued and the payments booked against them.
//! - [`pipeline`]: screening and quoting a request, asking for payment.
//! - [`payment`]: settlement hints and the reconciler; only a wallet lookup moves a job to `Paid`.
//! - [`worker`]: the bounded worker pool that runs paid jobs, delivers and settles them.
//! - [`recovery`]: resuming every unfinished job on start.
//! - [`direct`]: jobs that come in paid through an HTTP door, and their answers.
//! - [`account`]: an account's balance and history, and invoices that top it up.
//! - [`tokens`], [`sessions`]: L402 tokens and HTTP `Payment` charges, and `Payment` sessions.

pub mod account;
pub mod auto_payout;
pub mod book;
pub mod cancel;
pub mod checkpoint;
pub mod continuation;
pub mod direct;
pub mod estimates;
pub mod holds;
pub mod id;
pub mod invoices;
pub mod open_invoices;
pub mod pay_after;
pub mod payment;
pub mod payouts;
pub mod pipeline;
pub mod prune;
pub mod quote;
pub mod record;
pub mod recovery;
pub mod reputation;
pub mod sessions;
pub mod settle;
pub mod state;
pub mod tokens;
pub mod worker;
pub mod zap;

pub use book::{Admission, Book, BookError};
pub use holds::audit;
pub use id::JobId;
pub use invoices::{PaymentOutcome, PaymentRecord};
pub use pipeline::{JobConfig, Pipeline, Screening, WorkQueue};
pub use record::{Door, Job, JobInvoice};
pub use state::{IllegalTransition, JobState};
