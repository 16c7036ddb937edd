//! Debt: money that comes back onto a balance (change, released credit, credit a zap frees)
//! repays what its account owes before anything can spend it again.

use nostr_sdk::Keys;

use super::*;

/// What a pay-after job settling leaves owed when the balance is held elsewhere (by a credit
/// job running at the same time): `msat` lent and charged, with nothing to repay it from.
pub(crate) async fn owe(book: &Book, account: Account, msat: u64) {
    book.store()
        .apply(move |tx| {
            for kind in [
                crate::ledger::EntryKind::Debt,
                crate::ledger::EntryKind::Charge,
            ] {
                let entry = crate::ledger::Entry {
                    kind,
                    account,
                    msat,
                    job: None,
                    payment_hash: None,
                    at: now(),
                };
                crate::ledger::post(tx, &entry)?;
            }
            Ok::<_, TxError<crate::ledger::LedgerError>>(())
        })
        .await
        .expect("owed");
}

pub(crate) async fn owed(book: &Book, account: Account) -> u64 {
    book.store()
        .read(move |r| crate::ledger::owed(r, &account))
        .await
        .expect("owed")
}

/// Money that comes back onto a balance repays what its account owes before anything can
/// spend it again: here a credit job's change, after a pay-after job of the same npub settled
/// while the credit job held the whole balance. (Before, only a new payment repaid a debt, and
/// the change could be withdrawn with the debt still owed.)
#[tokio::test]
async fn a_jobs_change_repays_what_its_account_owes() {
    let (book, alice) = (book(), Keys::generate());
    let account = Account::from(alice.public_key());
    top_up(&book, alice.public_key(), 1, 10_000).await;
    let job = quoted_for(&book, &alice, 10_000).await;
    let job = book.spend_credit(&job, None).await.expect("reserved");
    assert_eq!(job.state, JobState::Running);
    assert_eq!(balance(&book, account).await, 0);
    owe(&book, account, 2_000).await;
    assert_eq!(owed(&book, account).await, 2_000);

    deliver(&book, &job, 3_000).await;
    assert_eq!(owed(&book, account).await, 0, "the change repaid it");
    assert_eq!(balance(&book, account).await, 5_000);
    let totals = totals(&book).await;
    assert_eq!((totals.debt_msat, totals.debt_repaid_msat), (2_000, 2_000));
}

/// The same for credit a job reserved and gave back unused: a job that waited on its invoice
/// for the rest of its quote and expired. (Before, the released credit came back spendable
/// while its account's debt stood, and the npub could be demoted for a debt its own balance
/// covered.)
#[tokio::test]
async fn released_credit_repays_what_its_account_owes() {
    let (book, alice) = (book(), Keys::generate());
    let account = Account::from(alice.public_key());
    top_up(&book, alice.public_key(), 1, 500).await;
    let job = quoted_for(&book, &alice, 1_000).await;
    book.spend_credit(&job, None).await.expect("reserved");
    book.await_payment(&job, invoice(2, 500), &feedback())
        .await
        .expect("await");
    owe(&book, account, 800).await;
    book.transition_durably(&job.id, JobState::Expired, |_| {})
        .await
        .expect("expired");
    assert_eq!(
        owed(&book, account).await,
        300,
        "the 500 released repaid it first"
    );
    assert_eq!(balance(&book, account).await, 0);
    let totals = totals(&book).await;
    assert_eq!((totals.debt_msat, totals.debt_repaid_msat), (800, 500));
}

/// A job that reserved credit when it was quoted and is asked to pay again (a restart) does
/// not start pay-after, even if its npub may now: it pays from its credit and an invoice.
/// A pay-after settlement takes no hold, so its credit stayed reserved for a job that ended.
#[tokio::test]
async fn a_job_holding_credit_does_not_start_pay_after() {
    let (book, alice) = (book(), Keys::generate());
    top_up(&book, alice.public_key(), 1, 500).await;
    let job = quoted_for(&book, &alice, 1_000).await;
    let job = book.spend_credit(&job, None).await.expect("reserved");
    assert_eq!((job.state, job.held_msat), (JobState::Quoted, 500));
    let opened = book
        .open_pay_after(&job, 1_000_000, String::new())
        .await
        .expect("read");
    assert!(opened.is_err(), "{opened:?}");
}

/// And when someone else pays a job's whole quote (a zap), the credit its customer reserved
/// comes back: it repays the customer's debt first.
#[tokio::test]
async fn credit_a_zap_frees_repays_what_the_customer_owes() {
    let (book, alice) = (book(), Keys::generate());
    let account = Account::from(alice.public_key());
    top_up(&book, alice.public_key(), 1, 300).await;
    let job = quoted_for(&book, &alice, 1_000).await;
    book.spend_credit(&job, None).await.expect("reserved");
    book.await_payment(&job, invoice(8, 700), &feedback())
        .await
        .expect("await");
    owe(&book, account, 200).await;
    let bob = Keys::generate().public_key();
    let outcome = book
        .confirm_external(
            &PaymentHash([9; 32]),
            record(Some(job.id), bob, 1_000),
            1_000,
        )
        .await
        .expect("confirm");
    assert!(matches!(outcome, PaymentOutcome::Paid(_)), "{outcome:?}");
    assert_eq!(owed(&book, account).await, 0);
    assert_eq!(balance(&book, account).await, 100);
}
