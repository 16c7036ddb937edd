//! Unit tests of the book, and the helpers other modules' tests use (`book::tests::*`).

use nostr_sdk::{EventBuilder, Keys, Kind};

use crate::ledger::Account;

use crate::job::invoices::PaymentOutcome;

use super::*;

pub(crate) fn book() -> Book {
    Book::new(Store::temporary().expect("store"))
}

async fn quoted_job(book: &Book, quote: u64) -> Job {
    let request = EventBuilder::new(Kind::from(5050), "")
        .sign_with_keys(&Keys::generate())
        .expect("sign");
    let job = Job::received(&request, vec![], now());
    assert!(matches!(
        book.admit(&job).await.expect("admit"),
        Admission::New
    ));
    book.transition(&job.id, JobState::Quoted, move |j| {
        j.quote_msat = Some(quote)
    })
    .await
    .expect("quoted")
}

pub(crate) async fn totals(book: &Book) -> crate::ledger::Totals {
    book.store().read(crate::job::audit).await.expect("ledger")
}

/// A `Quoted` job of `customer`.
pub(crate) async fn quoted_for(book: &Book, customer: &Keys, quote: u64) -> Job {
    // Distinct content, so requests signed in the same second get distinct ids.
    let nonce = Keys::generate().public_key().to_hex();
    let request = EventBuilder::new(Kind::from(5050), nonce)
        .sign_with_keys(customer)
        .expect("sign");
    let job = Job::received(&request, vec![], now());
    book.admit(&job).await.expect("admit");
    book.transition(&job.id, JobState::Quoted, move |j| {
        j.quote_msat = Some(quote)
    })
    .await
    .expect("quoted")
}

/// An open payment record for `msat` to `account`, paying `job` (or a top-up).
pub(crate) fn record(job: Option<JobId>, account: impl Into<Account>, msat: u64) -> PaymentRecord {
    PaymentRecord {
        job,
        account: account.into(),
        amount_msat: msat,
        expires_at: now() + 600,
        bolt11: String::new(),
        zap_request: None,
        consumed: false,
        closed: false,
        next_lookup_at: 0,
        continues: None,
    }
}

/// Credit `account` with a paid top-up of `msat` under payment hash `[hash; 32]`.
pub(crate) async fn top_up(book: &Book, account: impl Into<Account>, hash: u8, msat: u64) {
    let record = record(None, account, msat);
    let hash = PaymentHash([hash; 32]);
    book.register_invoice(&hash, record)
        .await
        .expect("register");
    book.confirm_payment(&hash, msat).await.expect("confirm");
}

/// `Running -> Delivered -> Settled` with `charge`.
pub(crate) async fn deliver(book: &Book, job: &Job, charge: u64) -> Job {
    book.settle_delivered(&job.id, charge, None)
        .await
        .expect("settle")
}

pub(crate) async fn balance(book: &Book, account: impl Into<Account>) -> u64 {
    let account = account.into();
    book.store()
        .read(move |r| crate::ledger::balance(r, &account))
        .await
        .expect("balance")
}

pub(crate) fn feedback() -> nostr_sdk::Event {
    EventBuilder::new(Kind::from(7000), "")
        .sign_with_keys(&Keys::generate())
        .expect("sign")
}

pub(crate) fn invoice(hash: u8, msat: u64) -> JobInvoice {
    JobInvoice {
        bolt11: format!("lnbcrt-test-{hash}"),
        payment_hash: PaymentHash([hash; 32]),
        amount_msat: msat,
        expires_at: now() + 600,
    }
}

#[tokio::test]
async fn duplicates_are_admitted_once() {
    let book = book();
    let job = quoted_job(&book, 1_000).await;
    match book
        .admit(&Job {
            state: JobState::Received,
            ..job.clone()
        })
        .await
        .expect("admit")
    {
        Admission::Duplicate(stored) => assert_eq!(stored.state, JobState::Quoted),
        Admission::New => panic!("a second sighting must not be new"),
    }
}

#[tokio::test]
async fn jobs_are_kept_in_the_order_they_arrived_and_found_by_id() {
    let book = book();
    let keys = Keys::generate();
    let mut jobs = Vec::new();
    for (n, at) in [30u64, 10, 20].into_iter().enumerate() {
        let request = EventBuilder::new(Kind::from(5050), n.to_string())
            .sign_with_keys(&keys)
            .expect("sign");
        let job = Job::received(&request, vec![], at);
        assert!(matches!(
            book.admit(&job).await.expect("admit"),
            Admission::New
        ));
        jobs.push(job);
    }
    // The same request seen again later (another relay, a restart) is the same job, though
    // "now" has moved on: the id index finds it, whatever its time key.
    let again = Job::received_as(
        &EventBuilder::new(Kind::from(5050), "0")
            .sign_with_keys(&keys)
            .expect("sign"),
        jobs[0].request.clone(),
        vec![],
        99,
    );
    assert_eq!(again.id, jobs[0].id);
    assert!(matches!(
        book.admit(&again).await.expect("admit"),
        Admission::Duplicate(stored) if stored.received_at == 30
    ));
    let changed = book
        .transition(&jobs[1].id, JobState::Quoted, |j| j.quote_msat = Some(5))
        .await
        .expect("quoted");
    assert_eq!(changed.received_at, 10);
    let all = book.all().await.expect("all");
    let order: Vec<u64> = all.iter().map(|j| j.received_at).collect();
    assert_eq!(order, vec![10, 20, 30], "one record each, oldest first");
    assert_eq!(all[0].state, JobState::Quoted, "updated in place");
    for job in &jobs {
        let found = book.get(&job.id).await.expect("get").expect("found");
        assert_eq!(found.received_at, job.received_at);
    }
    assert!(book.get(&JobId::random()).await.expect("get").is_none());

    // A write by a caller that holds the job finds it under its time key, without the index:
    // with its index entry gone, the job is still found through the job, and no longer by id.
    let third = jobs[2].id;
    book.store()
        .apply(move |tx| Ok::<_, TxError<BookError>>(tx.remove(Tree::JobKeys, third.as_bytes())?))
        .await
        .expect("index entry removed");
    let by_key = book
        .transition(&jobs[2], JobState::Quoted, |j| j.quote_msat = Some(7))
        .await
        .expect("found by its key");
    assert_eq!(by_key.quote_msat, Some(7));
    assert!(matches!(
        book.update(&third, |_, _| Ok(())).await,
        Err(BookError::NoJob(id)) if id == third
    ));
    // A copy whose time key is not the stored one (the same request seen again later) still
    // finds the stored job, through the index, and changes it in place.
    let changed = book
        .transition(&again, JobState::Quoted, |j| j.quote_msat = Some(9))
        .await
        .expect("found through the index");
    assert_eq!((changed.received_at, changed.quote_msat), (30, Some(9)));
    assert_eq!(book.all().await.expect("all").len(), 3, "no record added");
}

#[tokio::test]
async fn a_payment_hash_pays_once() {
    let book = book();
    let job = quoted_job(&book, 5_000).await;
    book.await_payment(&job, invoice(1, 5_000), &feedback())
        .await
        .expect("await");
    let hash = PaymentHash([1; 32]);
    assert!(matches!(
        book.confirm_payment(&hash, 5_000).await.expect("confirm"),
        PaymentOutcome::Paid(_)
    ));
    // A second hint, a replay, the reconciler racing the hint: all book nothing.
    assert_eq!(
        book.confirm_payment(&hash, 5_000).await.expect("confirm"),
        PaymentOutcome::AlreadyConsumed
    );
    assert_eq!(
        book.confirm_payment(&PaymentHash([9; 32]), 5_000)
            .await
            .expect("confirm"),
        PaymentOutcome::Unknown
    );
    let totals = totals(&book).await;
    assert_eq!(totals.payment_in_msat, 5_000);
    assert_eq!(
        book.get(&job.id).await.expect("get").expect("job").state,
        JobState::Paid
    );
}

#[tokio::test]
async fn one_invoice_cannot_be_attached_to_two_jobs() {
    let book = book();
    let first = quoted_job(&book, 1_000).await;
    let second = quoted_job(&book, 1_000).await;
    book.await_payment(&first, invoice(2, 1_000), &feedback())
        .await
        .expect("first");
    let err = book
        .await_payment(&second, invoice(2, 1_000), &feedback())
        .await;
    assert!(
        matches!(err, Err(BookError::PaymentHashReused(_))),
        "{err:?}"
    );
    assert_eq!(
        book.get(&second.id).await.expect("get").expect("job").state,
        JobState::Quoted
    );
    assert_eq!(
        book.payment(&PaymentHash([2; 32]))
            .await
            .expect("get")
            .expect("record")
            .job,
        Some(first.id)
    );
}

#[tokio::test]
async fn late_and_short_payments_are_credited_not_lost() {
    let book = book();
    let late = quoted_job(&book, 1_000).await;
    book.await_payment(&late, invoice(3, 1_000), &feedback())
        .await
        .expect("await");
    book.transition(&late.id, JobState::Expired, |_| {})
        .await
        .expect("expire");
    assert!(matches!(
        book.confirm_payment(&PaymentHash([3; 32]), 1_000)
            .await
            .expect("confirm"),
        PaymentOutcome::Credited { job: Some(_), .. }
    ));
    assert_eq!(
        book.get(&late.id).await.expect("get").expect("job").state,
        JobState::Expired
    );

    let short = quoted_job(&book, 2_000).await;
    book.await_payment(&short, invoice(4, 2_000), &feedback())
        .await
        .expect("await");
    assert!(matches!(
        book.confirm_payment(&PaymentHash([4; 32]), 1_500)
            .await
            .expect("confirm"),
        PaymentOutcome::Underpaid(_)
    ));
    assert_eq!(
        book.get(&short.id).await.expect("get").expect("job").state,
        JobState::AwaitingPayment
    );

    let customer_balance = balance(&book, late.customer).await;
    assert_eq!(customer_balance, 1_000);
    let totals = totals(&book).await;
    assert_eq!(totals.payment_in_msat, 2_500);
    assert_eq!(totals.balances_msat, 2_500);
}

#[tokio::test]
async fn settling_charges_at_most_what_was_paid() {
    let book = book();
    let job = quoted_job(&book, 3_000).await;
    book.await_payment(&job, invoice(5, 3_000), &feedback())
        .await
        .expect("await");
    book.confirm_payment(&PaymentHash([5; 32]), 3_000)
        .await
        .expect("confirm");
    // Settling before the job ran is refused by the transition table.
    assert!(matches!(
        book.settle(&job.id, 1).await,
        Err(BookError::Transition(_))
    ));
    book.transition(&job.id, JobState::Running, |_| {})
        .await
        .expect("run");
    book.transition(&job.id, JobState::Delivered, |_| {})
        .await
        .expect("deliver");
    let settled = book.settle(&job.id, 9_999).await.expect("settle");
    assert_eq!(settled.charge_msat, Some(3_000));
    // A second settlement of the same job is refused: it is terminal.
    assert!(book.settle(&job.id, 1).await.is_err());
    let totals = totals(&book).await;
    assert_eq!(totals.charge_msat, 3_000);
    assert_eq!(totals.balances_msat, 0);
}

#[tokio::test]
async fn a_failed_job_leaves_the_payment_as_credit() {
    let book = book();
    let job = quoted_job(&book, 4_000).await;
    book.await_payment(&job, invoice(6, 4_000), &feedback())
        .await
        .expect("await");
    book.confirm_payment(&PaymentHash([6; 32]), 4_000)
        .await
        .expect("confirm");
    book.transition(&job.id, JobState::Running, |_| {})
        .await
        .expect("run");
    book.transition(&job.id, JobState::Failed, |_| {})
        .await
        .expect("fail");
    book.settle(&job.id, 0).await.expect("settle");
    assert_eq!(balance(&book, job.customer).await, 4_000);
    let totals = totals(&book).await;
    assert_eq!(totals.refund_credit_msat, 4_000);
    assert_eq!(totals.charge_msat, 0);
}

#[tokio::test]
async fn a_quote_is_stored_with_the_write_that_follows_it() {
    let book = book();
    let customer = Keys::generate();
    let received = |content: &str| {
        let request = EventBuilder::new(Kind::from(5050), content)
            .sign_with_keys(&customer)
            .expect("sign");
        Job::received(&request, vec![], now())
    };
    let quoted = |job: &Job| {
        let mut job = job.clone();
        job.transition(JobState::Quoted, now()).expect("quoted");
        let estimate = crate::pricing::Estimate {
            p50_msat: 2_000,
            p90_msat: 2_500,
            cap_msat: 4_000,
            ..Default::default()
        };
        job.price_with(estimate, None);
        job
    };

    // Quoted in memory only: the store still says `Received`; the invoice's write stores the
    // quote with it.
    let job = received("one");
    book.admit(&job).await.expect("admit");
    let priced = quoted(&job);
    assert!(priced.quote_msat.is_some_and(|q| q > 0));
    let stored = book.get(&job.id).await.expect("get").expect("stored");
    assert_eq!(
        (stored.state, stored.quote_msat),
        (JobState::Received, None)
    );
    let awaiting = book
        .await_payment(&priced, invoice(21, 2_500), &feedback())
        .await
        .expect("invoice recorded");
    let stored = book.get(&job.id).await.expect("get").expect("stored");
    assert_eq!(stored, awaiting);
    assert_eq!(stored.state, JobState::AwaitingPayment);
    assert_eq!(
        (stored.quote_msat, stored.limit_msat, stored.estimate),
        (priced.quote_msat, priced.limit_msat, priced.estimate)
    );

    // The same through the credit: a reservation that does not cover the quote stores `Quoted`
    // with it.
    let job = received("two");
    book.admit(&job).await.expect("admit");
    top_up(&book, customer.public_key(), 22, 1_000).await;
    let reserved = book
        .spend_credit(&quoted(&job), None)
        .await
        .expect("credit reserved");
    assert_eq!(
        (reserved.state, reserved.credit_msat, reserved.quote_msat),
        (JobState::Quoted, 1_000, quoted(&job).quote_msat)
    );

    // A job cancelled before the quote is stored stays cancelled: the quote brings nothing back.
    let job = received("three");
    book.admit(&job).await.expect("admit");
    book.transition_durably(&job, JobState::Cancelled, |_| {})
        .await
        .expect("cancelled");
    assert!(matches!(
        book.await_payment(&quoted(&job), invoice(23, 2_500), &feedback())
            .await,
        Err(BookError::Transition(_))
    ));
    assert_eq!(
        book.get(&job.id).await.expect("get").expect("stored").state,
        JobState::Cancelled
    );
    assert!(book
        .payment(&PaymentHash([23; 32]))
        .await
        .expect("read")
        .is_none());
}

mod continuation;
mod debt;
pub(crate) mod lookups;

pub(crate) use debt::{owe, owed};
