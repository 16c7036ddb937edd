//! Payouts booked and settled on a real store, and the fee bound.

use super::*;
use crate::job::book::tests::{balance, book, top_up, totals};
use nostr_sdk::Keys;

fn payout(account: Account, hash: u8, amount_msat: u64, max_fee_msat: u64) -> Payout {
    Payout {
        account,
        bolt11: "lnbcrt...".to_owned(),
        payment_hash: PaymentHash([hash; 32]),
        amount_msat,
        max_fee_msat,
        expires_at: u64::MAX,
        state: PayoutState::Pending,
        note: None,
        created_at: 1,
        updated_at: 1,
    }
}

#[tokio::test]
async fn a_payout_holds_amount_and_fee_then_returns_the_unused_fee() {
    let (book, alice) = (book(), Account::from(Keys::generate().public_key()));
    top_up(&book, alice, 1, 10_000).await;
    book.begin_payout(payout(alice, 9, 6_000, 1_000))
        .await
        .expect("begins");
    assert_eq!(balance(&book, alice).await, 3_000);
    assert_eq!(totals(&book).await.in_flight_msat, 7_000);
    // A wallet that spent more than allowed: the customer pays the most allowed.
    let paid = book
        .finish_payout(&PaymentHash([9; 32]), PayoutState::Paid { fee_msat: 5_000 })
        .await
        .expect("paid");
    assert_eq!(paid.state, PayoutState::Paid { fee_msat: 1_000 });
    let totals = totals(&book).await;
    assert_eq!((totals.in_flight_msat, totals.routing_fee_msat), (0, 1_000));
    assert_eq!(balance(&book, alice).await, 3_000);
    // The answer twice: nothing moves again, a later "failed" included.
    for state in [PayoutState::Paid { fee_msat: 0 }, PayoutState::Failed] {
        let again = book
            .finish_payout(&PaymentHash([9; 32]), state)
            .await
            .expect("again");
        assert_eq!(again.state, PayoutState::Paid { fee_msat: 1_000 });
    }
    assert_eq!(balance(&book, alice).await, 3_000);
    assert_eq!(totals.payout_msat, 6_000);
}

#[tokio::test]
async fn a_failed_payout_gives_it_all_back_and_a_hash_pays_once() {
    let (book, alice) = (book(), Account::from(Keys::generate().public_key()));
    top_up(&book, alice, 1, 10_000).await;
    book.begin_payout(payout(alice, 9, 6_000, 1_000))
        .await
        .expect("begins");
    book.finish_payout(&PaymentHash([9; 32]), PayoutState::Failed)
        .await
        .expect("failed");
    assert_eq!(balance(&book, alice).await, 10_000);
    let again = book.begin_payout(payout(alice, 9, 1_000, 0)).await;
    assert!(matches!(again, Err(PayoutRefusal::Hash(_))), "{again:?}");
    // Our own invoice (the top-up's hash) is never paid out.
    let own = book.begin_payout(payout(alice, 1, 1_000, 0)).await;
    assert!(matches!(own, Err(PayoutRefusal::Hash(_))), "{own:?}");
    // Amount plus the most fee must be on the balance.
    let short = book.begin_payout(payout(alice, 7, 9_500, 600)).await;
    assert!(
        matches!(short, Err(PayoutRefusal::Balance { .. })),
        "{short:?}"
    );
    assert_eq!(balance(&book, alice).await, 10_000);
    assert_eq!(totals(&book).await.in_flight_msat, 0);
}

#[test]
fn the_most_fee_is_base_plus_ppm() {
    let fee = PayoutFee {
        base_msat: 10_000,
        ppm: 5_000,
    };
    assert_eq!(fee.max_for(0), 10_000);
    assert_eq!(fee.max_for(1_000_000), 15_000);
    assert_eq!(fee.max_for(u64::MAX), 10_000 + u64::MAX / 200);
}

/// A payout repays what its account owes first: a balance never pays out money its account
/// owes for jobs run before they were paid.
#[tokio::test]
async fn a_payout_repays_what_its_account_owes_first() {
    use crate::job::book::tests::{owe, owed};
    let (book, alice) = (book(), Account::from(Keys::generate().public_key()));
    top_up(&book, alice, 1, 10_000).await;
    owe(&book, alice, 2_000).await;
    assert_eq!(balance(&book, alice).await, 10_000);
    let all = book.begin_payout(payout(alice, 9, 10_000, 0)).await;
    assert!(
        matches!(
            all,
            Err(PayoutRefusal::Balance {
                balance_msat: 8_000,
                ..
            })
        ),
        "{all:?}"
    );
    assert_eq!(
        owed(&book, alice).await,
        2_000,
        "a refused payout moves nothing"
    );
    book.begin_payout(payout(alice, 9, 8_000, 0))
        .await
        .expect("what is not owed");
    assert_eq!(owed(&book, alice).await, 0);
    assert_eq!(balance(&book, alice).await, 0);
}
