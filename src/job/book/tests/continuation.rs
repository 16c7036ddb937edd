//! The book's continuations: a job that ran out of what it paid waits on an invoice for the
//! rest, which (or a zap standing in for it) pays once; given up, it is charged as generated.

use super::*;

/// A job paid `paid` that stopped at its budget having said `said`, now awaiting its
/// continuation on invoice `hash` for `more` msat.
async fn awaiting_continuation(book: &Book, paid: u64, hash: u8, more: u64) -> Job {
    let job = quoted_job(book, paid).await;
    book.await_payment(&job, invoice(hash, paid), &feedback())
        .await
        .expect("await");
    book.confirm_payment(&PaymentHash([hash; 32]), paid)
        .await
        .expect("confirm");
    book.transition(&job.id, JobState::Running, |_| {})
        .await
        .expect("run");
    let usage = crate::infer::Usage {
        prompt_tokens: 10,
        completion_tokens: 8,
    };
    book.await_continuation(
        &job.id,
        "so far".to_owned(),
        usage,
        invoice(hash + 100, more),
        &feedback(),
    )
    .await
    .expect("await continuation")
}

#[tokio::test]
async fn a_paid_continuation_adds_to_what_the_job_holds_and_pays_once() {
    let book = book();
    let job = awaiting_continuation(&book, 3_000, 11, 2_000).await;
    assert_eq!(job.state, JobState::AwaitingContinuation);
    assert_eq!(job.result.as_deref(), Some("so far"));
    assert_eq!(job.held_msat, 3_000, "the first payment stays held");
    // The first invoice's hash was consumed: paying it again does not continue the job.
    assert_eq!(
        book.confirm_payment(&PaymentHash([11; 32]), 3_000)
            .await
            .expect("again"),
        PaymentOutcome::AlreadyConsumed
    );
    // Short: credited, the job keeps waiting.
    let continued = PaymentHash([111; 32]);
    let outcome = book.confirm_payment(&continued, 1_999).await.expect("pay");
    assert!(
        matches!(outcome, PaymentOutcome::Underpaid(_)),
        "{outcome:?}"
    );
    assert_eq!(balance(&book, job.customer).await, 1_999);

    let job = awaiting_continuation(&book, 3_000, 12, 2_000).await;
    let outcome = book
        .confirm_payment(&PaymentHash([112; 32]), 2_000)
        .await
        .expect("pay");
    let PaymentOutcome::Paid(paid) = outcome else {
        panic!("{outcome:?}");
    };
    assert_eq!(
        (paid.state, paid.paid_msat, paid.held_msat),
        (JobState::Paid, 5_000, 5_000)
    );
    book.transition(&job.id, JobState::Running, |_| {})
        .await
        .expect("run on");
    deliver(&book, &job, 4_200).await;
    // Charged the whole run from both payments; the rest is the customer's.
    assert_eq!(balance(&book, job.customer).await, 800);
    let totals = totals(&book).await;
    assert_eq!(totals.charge_msat, 4_200);
}

/// A zap that stands in for a continuation invoice pays that continuation once, only while
/// the job waits on it: registered for it, paid, the job goes on; a second such zap, and one
/// for a continuation the job no longer waits on, are refused at registration or credited.
#[tokio::test]
async fn a_zap_pays_the_continuation_it_stands_in_for_once() {
    let book = book();
    let job = awaiting_continuation(&book, 3_000, 14, 2_000).await;
    let zap = |continues: u8| PaymentRecord {
        continues: Some(PaymentHash([continues; 32])),
        ..record(Some(job.id), job.customer, 2_000)
    };
    // Standing in for another invoice than the one the job waits on: not for this job.
    assert!(matches!(
        book.register_invoice(&PaymentHash([201; 32]), zap(99))
            .await,
        Err(BookError::NotAwaitingPayment(..))
    ));
    book.register_invoice(&PaymentHash([202; 32]), zap(114))
        .await
        .expect("zap for the continuation");
    book.register_invoice(&PaymentHash([203; 32]), zap(114))
        .await
        .expect("another, while it waits");
    let outcome = book
        .confirm_payment(&PaymentHash([202; 32]), 2_000)
        .await
        .expect("zapped");
    let PaymentOutcome::Paid(paid) = outcome else {
        panic!("{outcome:?}");
    };
    assert_eq!((paid.paid_msat, paid.held_msat), (5_000, 5_000));
    // The second zap, and the continuation's own invoice, find the job moved on: credited.
    for hash in [203, 114] {
        let outcome = book
            .confirm_payment(&PaymentHash([hash; 32]), 2_000)
            .await
            .expect("late");
        assert!(
            matches!(outcome, PaymentOutcome::Credited { .. }),
            "{outcome:?}"
        );
    }
    assert_eq!(balance(&book, job.customer).await, 4_000);
    // And no zap can be registered for it any more.
    assert!(matches!(
        book.register_invoice(&PaymentHash([204; 32]), zap(114))
            .await,
        Err(BookError::NotAwaitingPayment(..))
    ));
}

#[tokio::test]
async fn a_continuation_given_up_is_charged_as_generated_and_a_late_payment_is_credited() {
    let book = book();
    let job = awaiting_continuation(&book, 3_000, 13, 2_000).await;
    // Given up: the result is stored (the job stays awaiting until it is delivered).
    book.update_durably(&job.id, |stored, _| {
        stored.result_event = Some("{}".to_owned());
        stored.charge_msat = Some(2_900);
        Ok(())
    })
    .await
    .expect("give up");
    let outcome = book
        .confirm_payment(&PaymentHash([113; 32]), 2_000)
        .await
        .expect("late");
    assert!(
        matches!(outcome, PaymentOutcome::Credited { .. }),
        "{outcome:?}"
    );
    let settled = deliver(&book, &job, 2_900).await;
    assert_eq!(settled.state, JobState::Settled);
    assert_eq!(balance(&book, job.customer).await, 2_000 + 100);
    let totals = totals(&book).await;
    assert_eq!(totals.charge_msat, 2_900);
}
