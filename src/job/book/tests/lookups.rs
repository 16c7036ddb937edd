//! What the reconciler looks up: the open invoices in the order they fall due, a bounded number
//! of late ones a pass, a challenge's only once past its expiry, and a job's zaps under the job.

use nostr_sdk::Keys;

use super::*;

const LATE_LOOKUP_SECS: u64 = 30 * 24 * 60 * 60;

fn hashes(found: &[(PaymentHash, PaymentRecord)]) -> Vec<PaymentHash> {
    found.iter().map(|(hash, _)| *hash).collect()
}

/// The payment hashes still open, for the reconciler.
pub(crate) async fn open_hashes(book: &Book) -> Vec<PaymentHash> {
    hashes(&book.open_payments().await.expect("open"))
}

#[tokio::test]
async fn old_unpaid_invoices_stay_open_until_a_lookup_closes_them() {
    let book = book();
    let record = |expires_at| PaymentRecord {
        expires_at,
        ..record(None, Keys::generate().public_key(), 1_000)
    };
    let long_ago = now() - LATE_LOOKUP_SECS - 60;
    let (old, recent) = (PaymentHash([1; 32]), PaymentHash([2; 32]));
    book.register_invoice(&old, record(long_ago))
        .await
        .expect("old");
    book.register_invoice(&recent, record(now() - 60))
        .await
        .expect("recent");
    // However long dvmd or the wallet was away, both are still looked up.
    let open = open_hashes(&book).await;
    assert!(open.contains(&old) && open.contains(&recent));
    // A lookup that says "unpaid" closes only the one past the grace period.
    assert!(book
        .close_payment(&old, LATE_LOOKUP_SECS)
        .await
        .expect("close"));
    assert!(!book
        .close_payment(&recent, LATE_LOOKUP_SECS)
        .await
        .expect("close"));
    let open = open_hashes(&book).await;
    assert_eq!(open, vec![recent]);
    // A consumed record is never closed.
    let paid = PaymentHash([3; 32]);
    book.register_invoice(&paid, record(long_ago))
        .await
        .expect("paid");
    book.confirm_payment(&paid, 1_000).await.expect("booked");
    assert!(
        book.open_payments()
            .await
            .expect("open")
            .iter()
            .all(|(hash, _)| *hash != paid),
        "a booked payment leaves the open index"
    );
    assert!(!book
        .close_payment(&paid, LATE_LOOKUP_SECS)
        .await
        .expect("close"));
    assert!(
        book.payment(&paid)
            .await
            .expect("read")
            .expect("record")
            .consumed
    );
}

/// A record of an invoice that expired `ago` seconds ago, for a top-up of `msat`.
fn expired(ago: u64) -> PaymentRecord {
    PaymentRecord {
        expires_at: now() - ago,
        ..record(None, Keys::generate().public_key(), 1_000)
    }
}

#[tokio::test]
async fn a_pass_reads_what_is_due_and_never_leaves_an_unexpired_invoice_behind() {
    let book = book();
    let t = now();
    // Five invoices that expired an hour ago unpaid and were never looked up since (dvmd was
    // down), one deferred to two hours ago, one to tomorrow, and two a customer may be paying.
    for n in 1..=5u8 {
        book.register_invoice(&PaymentHash([n; 32]), expired(3_600))
            .await
            .expect("expired");
    }
    let (earlier, tomorrow) = (PaymentHash([6; 32]), PaymentHash([7; 32]));
    for hash in [earlier, tomorrow] {
        book.register_invoice(&hash, expired(3_600))
            .await
            .expect("expired");
    }
    book.defer_lookup(&earlier, t - 7_200).await.expect("defer");
    book.defer_lookup(&tomorrow, t + 86_400)
        .await
        .expect("defer");
    let unexpired = [PaymentHash([0xf1; 32]), PaymentHash([0xf2; 32])];
    for hash in unexpired {
        book.register_invoice(&hash, record(None, Keys::generate().public_key(), 1_000))
            .await
            .expect("unexpired");
    }
    assert_eq!(book.open_payments().await.expect("open").len(), 9);

    // Everything due, with room for every late one: all but tomorrow's, the unexpired first,
    // then the late ones in the order they fell due.
    let due = hashes(&book.due_payments(t, 100, None).await.expect("due"));
    let mut expected = vec![unexpired[0], unexpired[1], earlier];
    expected.extend((1..=5u8).map(|n| PaymentHash([n; 32])));
    assert_eq!(due, expected);

    // Room for two late lookups: both unexpired invoices, and the two late ones due longest
    // (however many never-deferred ones sort before a deferred one by key).
    let due = hashes(&book.due_payments(t, 2, None).await.expect("due"));
    assert_eq!(
        due,
        vec![unexpired[0], unexpired[1], earlier, PaymentHash([1; 32])]
    );
    // Looked up, they are deferred: the next pass takes the next two, and so on until every
    // late one had its turn.
    let mut seen = Vec::new();
    for _ in 0..5 {
        let due = book.due_payments(t, 2, None).await.expect("due");
        for (hash, record) in &due {
            if record.expires_at < t {
                book.defer_lookup(hash, t + 600).await.expect("defer");
                seen.push(*hash);
            }
        }
        assert!(unexpired.iter().all(|hash| hashes(&due).contains(hash)));
    }
    seen.sort_by_key(|hash| hash.0);
    let mut late: Vec<_> = (1..=6u8).map(|n| PaymentHash([n; 32])).collect();
    late.sort_by_key(|hash| hash.0);
    assert_eq!(seen, late, "each late invoice looked up once");
    // A pass after a gap in the hints adds challenges due later, nothing else.
    assert!(!hashes(
        &book
            .due_payments(t, 100, Some(t + 2 * 86_400))
            .await
            .expect("due")
    )
    .contains(&tomorrow));
    // Tomorrow's falls due tomorrow.
    assert!(
        hashes(&book.due_payments(t + 86_400, 100, None).await.expect("due")).contains(&tomorrow)
    );
}

#[tokio::test]
async fn a_deferred_or_closed_invoice_is_found_by_its_new_due_time_or_not_at_all() {
    let book = book();
    let hash = PaymentHash([9; 32]);
    let t = now();
    book.register_invoice(&hash, expired(LATE_LOOKUP_SECS + 60))
        .await
        .expect("register");
    book.defer_lookup(&hash, t + 600).await.expect("defer");
    book.defer_lookup(&hash, t + 1_200)
        .await
        .expect("defer again");
    let keys = book
        .store()
        .read(|r| r.keys(Tree::OpenPayments).collect::<Result<Vec<_>, _>>())
        .await
        .expect("keys");
    assert_eq!(
        keys,
        vec![crate::store::open_payment_key(t + 1_200, &hash.0).to_vec()],
        "one index entry, under the last due time"
    );
    assert!(book
        .due_payments(t + 1_199, 10, None)
        .await
        .expect("due")
        .is_empty());
    assert_eq!(
        hashes(&book.due_payments(t + 1_200, 10, None).await.expect("due")),
        vec![hash]
    );
    // Closing (or booking) takes it out of the index, wherever it was due.
    assert!(book
        .close_payment(&hash, LATE_LOOKUP_SECS)
        .await
        .expect("close"));
    assert!(book.open_payments().await.expect("open").is_empty());
    // A late payment is still booked by a hint, and leaves nothing in the index.
    book.confirm_payment(&hash, 1_000).await.expect("booked");
    let keys = book
        .store()
        .read(|r| r.keys(Tree::OpenPayments).collect::<Result<Vec<_>, _>>())
        .await
        .expect("keys");
    assert!(keys.is_empty());
    let paid = PaymentHash([10; 32]);
    book.register_invoice(&paid, expired(60))
        .await
        .expect("register");
    book.defer_lookup(&paid, t + 30).await.expect("defer");
    book.confirm_payment(&paid, 1_000).await.expect("booked");
    assert!(book.open_payments().await.expect("open").is_empty());
}

#[tokio::test]
async fn a_jobs_zaps_are_found_under_the_job() {
    let book = book();
    let customer = Keys::generate();
    let job = quoted_for(&book, &customer, 2_000).await;
    let other = quoted_for(&book, &customer, 2_000).await;
    for (job, hash) in [(&job, 1u8), (&other, 2)] {
        book.await_payment(job, invoice(hash, 2_000), &feedback())
            .await
            .expect("awaiting");
    }
    let zap = |job: &Job| PaymentRecord {
        zap_request: Some("{}".to_owned()),
        ..record(Some(job.id), Keys::generate().public_key(), 2_000)
    };
    let (first, second, others) = (
        PaymentHash([11; 32]),
        PaymentHash([12; 32]),
        PaymentHash([13; 32]),
    );
    book.register_invoice(&first, zap(&job)).await.expect("zap");
    book.register_invoice(&second, zap(&job))
        .await
        .expect("zap");
    book.register_invoice(&others, zap(&other))
        .await
        .expect("zap");
    // A top-up is no zap of anything.
    book.register_invoice(
        &PaymentHash([14; 32]),
        record(None, customer.public_key(), 1),
    )
    .await
    .expect("top-up");
    let mut zaps = hashes(&book.open_zaps_of(&job.id).await.expect("zaps"));
    zaps.sort_by_key(|hash| hash.0);
    assert_eq!(zaps, vec![first, second]);
    // Booked, a zap is no longer open.
    book.confirm_payment(&first, 2_000).await.expect("booked");
    assert_eq!(
        hashes(&book.open_zaps_of(&job.id).await.expect("zaps")),
        vec![second]
    );
    assert_eq!(
        hashes(&book.open_zaps_of(&other.id).await.expect("zaps")),
        vec![others]
    );
}
