//! The reconciler on a real pipeline, store and dev wallet: how many times a pass asks the
//! wallet, whatever was left unpaid.

use nostr_sdk::Keys;

use super::LATE_LOOKUPS_PER_PASS;
use crate::job::book::tests::record;
use crate::job::direct::tests::pipeline;
use crate::job::invoices::{index_open, CHALLENGE_LATE_SECS};
use crate::job::pipeline::unix_now;
use crate::job::tokens::{PaymentScheme, TokenRecord};
use crate::job::{BookError, PaymentRecord, Pipeline};
use crate::l402::Grant;
use crate::ledger::Account;
use crate::store::{Tree, TxError};
use crate::wallet::PaymentHash;

fn lookups(pipeline: &Pipeline) -> u64 {
    pipeline.inner.metrics.wallet_lookups()
}

/// An L402 challenge (with its HTTP `Payment` ones) for 5,000 msat, minted at `now`.
async fn challenge(pipeline: &Pipeline, now: u64) -> crate::job::tokens::Challenge {
    let scheme = PaymentScheme {
        key: &[1; 32],
        realm: "test",
    };
    let grant = Grant {
        valid_until: now + 3_600,
        model: "test".to_owned(),
        budget_msat: 100_000,
    };
    pipeline
        .l402_challenge(&[2; 32], scheme, 5_000, grant)
        .await
        .expect("challenge")
}

/// Two days after their expiry, `count` top-up invoices nobody paid were never looked up (dvmd
/// was down, or a flood of them came due at once). A pass asks the wallet about
/// [`LATE_LOOKUPS_PER_PASS`] of them and defers each it asked about; the next pass takes the
/// rest. Before, a pass looked up every one due, and read every open invoice to find them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_asks_the_wallet_about_a_bounded_number_of_late_invoices() {
    let (pipeline, _queue) = pipeline().await;
    let count = LATE_LOOKUPS_PER_PASS + 5;
    let expired_at = unix_now() - 2 * 86_400;
    pipeline
        .book()
        .store()
        .apply(move |tx| {
            let account = Account::from(Keys::generate().public_key());
            for n in 0..count {
                let mut hash = [0u8; 32];
                hash[..8].copy_from_slice(&(n as u64).to_be_bytes());
                let record = PaymentRecord {
                    expires_at: expired_at,
                    ..record(None, account, 1_000)
                };
                tx.put(Tree::Payments, &hash, &record)?;
                index_open(tx, &PaymentHash(hash), &record)?;
            }
            Ok::<_, TxError<BookError>>(())
        })
        .await
        .expect("invoices");
    let before = lookups(&pipeline);
    pipeline.reconcile_once().await;
    assert_eq!(
        lookups(&pipeline) - before,
        LATE_LOOKUPS_PER_PASS as u64,
        "one pass, a bounded number of late lookups"
    );
    pipeline.reconcile_once().await;
    assert_eq!(
        lookups(&pipeline) - before,
        count as u64,
        "the rest on the next pass"
    );
    pipeline.reconcile_once().await;
    assert_eq!(
        lookups(&pipeline) - before,
        count as u64,
        "each deferred once looked up"
    );
    let open = pipeline.book().open_payments().await.expect("open");
    assert_eq!(open.len(), count, "none closed: they are not that old");
    assert!(open.iter().all(|(_, r)| r.next_lookup_at > unix_now()));
}

/// Anyone can ask for an L402 challenge, so its invoice must not cost a wallet call on every
/// pass: its credential (which holds the preimage) makes us look it up, and the reconciler
/// looks it up once, past its expiry, for the books, and closes it then if unpaid. A top-up
/// (which nobody presents anything for) is looked up on every pass while it can be paid, and
/// stays open to late lookups after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_challenge_is_looked_up_once_past_its_expiry_and_then_closed() {
    let (pipeline, _queue) = pipeline().await;
    let now = unix_now();
    let challenge = challenge(&pipeline, now).await;
    let hash = challenge.invoice.payment_hash;
    let stored = pipeline
        .book()
        .payment(&hash)
        .await
        .expect("read")
        .expect("recorded");
    assert!(stored.spent_by_credential());
    assert_eq!(
        stored.next_lookup_at,
        challenge.invoice.expires_at + CHALLENGE_LATE_SECS + 1
    );
    let customer = Account::from(Keys::generate().public_key());
    let top_up = pipeline
        .top_up_invoice(customer, 5_000, 1_000_000)
        .await
        .expect("top-up")
        .payment_hash;
    let before = lookups(&pipeline);
    pipeline.reconcile_once().await;
    pipeline.reconcile_once().await;
    assert_eq!(
        lookups(&pipeline) - before,
        2,
        "the top-up on each pass, the challenge on neither"
    );
    // After a gap in the hints (a start, a lag), a pass asks about the challenge too: the books
    // then hold a payment whose hint was lost, before its credential comes.
    let before = lookups(&pipeline);
    pipeline.reconcile_after_gap().await;
    assert_eq!(
        lookups(&pipeline) - before,
        2,
        "the top-up and the challenge"
    );

    // A challenge and a top-up that expired unpaid a little longer ago than that.
    let expired = now - CHALLENGE_LATE_SECS - 10;
    let (old_challenge, old_top_up) = (PaymentHash([0xc1; 32]), PaymentHash([0xc2; 32]));
    let record = PaymentRecord {
        expires_at: expired,
        next_lookup_at: expired + CHALLENGE_LATE_SECS + 1,
        ..record(None, Account::Token(old_challenge), 5_000)
    };
    let token = TokenRecord {
        token_id: "00".repeat(32),
        amount_msat: 5_000,
        valid_until: now,
        model: "test".to_owned(),
        budget_msat: 5_000,
        issued_at: expired - 600,
    };
    pipeline
        .book()
        .register_token(&old_challenge, record, token, vec![])
        .await
        .expect("challenge");
    let top_up_record = PaymentRecord {
        expires_at: expired,
        ..crate::job::book::tests::record(None, customer, 5_000)
    };
    pipeline
        .book()
        .register_invoice(&old_top_up, top_up_record)
        .await
        .expect("old top-up");
    let before = lookups(&pipeline);
    pipeline.reconcile_once().await;
    assert_eq!(
        lookups(&pipeline) - before,
        3,
        "both old ones and the top-up"
    );
    let open = crate::job::book::tests::lookups::open_hashes(pipeline.book()).await;
    assert!(!open.contains(&old_challenge), "closed at its one lookup");
    assert!(open.contains(&old_top_up), "still looked up, later");
    assert!(open.contains(&top_up) && open.contains(&hash));
    assert!(
        pipeline
            .book()
            .payment(&old_challenge)
            .await
            .expect("read")
            .expect("kept")
            .closed,
        "closed, not forgotten: a hint or its credential still books a late payment"
    );
}

/// A challenge paid whose news was lost (no hint came) and whose record the reconciler closed
/// (its one lookup answered before the payment settled): the HTTP `Payment` credential
/// presented after the challenge expired is refused as expired, but its payment is booked
/// first, onto the token's account, where the L402 credential of the same 402 can spend or
/// withdraw it. Before, the expiry was refused before any lookup, and with the record closed
/// nothing would ever have looked it up again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_payment_credential_books_its_payment_before_it_is_refused_as_expired() {
    let (pipeline, _queue) = pipeline().await;
    let now = unix_now();
    let challenge = challenge(&pipeline, now).await;
    let hash = challenge.invoice.payment_hash;
    // Paid through the wallet, with no one following its hints.
    let wallet = crate::wallet::dev::DevWallet::open(pipeline.book().store().clone())
        .await
        .expect("the same dev wallet");
    let preimage = wallet
        .settle(&challenge.invoice.bolt11)
        .await
        .expect("paid");
    // Time passes: the challenge and its invoice expire, and the record is closed.
    let charge = challenge.payment.expect("a charge challenge");
    let (id, expired) = (charge.id.clone(), now - CHALLENGE_LATE_SECS - 10);
    pipeline
        .book()
        .store()
        .apply(move |tx| {
            let mut stored: crate::job::tokens::PaymentChallengeRecord = tx
                .get(Tree::MppChallenges, id.as_bytes())?
                .expect("stored challenge");
            stored.expires_at = expired;
            tx.put(Tree::MppChallenges, id.as_bytes(), &stored)?;
            let mut record: PaymentRecord = tx.get(Tree::Payments, &hash.0)?.expect("record");
            crate::job::invoices::unindex_open(tx, &hash, &record)?;
            record.expires_at = expired;
            tx.put(Tree::Payments, &hash.0, &record)?;
            index_open(tx, &hash, &record)?;
            Ok::<_, TxError<BookError>>(())
        })
        .await
        .expect("expired");
    assert!(pipeline
        .book()
        .close_payment(&hash, CHALLENGE_LATE_SECS)
        .await
        .expect("closed"));
    let credential = crate::mpp::Credential {
        challenge: charge,
        preimage,
        action: crate::mpp::Action::Charge,
    };
    let refused = pipeline.payment_account(&credential, true).await;
    assert!(
        matches!(
            refused,
            Err(crate::job::tokens::PaymentRefusal::Credential(
                crate::mpp::Refusal::Expired(_)
            ))
        ),
        "{refused:?}"
    );
    assert_eq!(
        pipeline
            .balance_of(Account::Token(hash))
            .await
            .expect("balance"),
        5_000,
        "booked onto the token's account all the same"
    );
}
