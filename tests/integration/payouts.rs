//! Payouts: paying a BOLT11 invoice and a Lightning address from the operator's wallet, against
//! a second dvmd's LNURL endpoint, through the library and through `dvmd wallet pay`.

use std::process::Command;
use std::sync::Arc;

use dvmd::wallet::lnbits::{LnbitsConfig, LnbitsWallet};
use dvmd::wallet::secret::Secret;
use dvmd::wallet::{lnurl, Wallet, WalletError};

use crate::harness;
use crate::lnbits::{Lnbits, LnbitsAccount};

pub async fn daemon_b(
    data: &std::path::Path,
    lnbits: &Lnbits,
    account: &LnbitsAccount,
) -> dvmd::daemon::Daemon {
    let key = data.join("lnbits.inkey");
    std::fs::write(&key, &account.inkey).expect("write key");
    let config = harness::dev_config(data, |file| {
        file.wallet.backend = "lnbits".into();
        file.wallet.lnbits.url = lnbits.url.clone();
        file.wallet.lnbits.invoice_key_env = None;
        file.wallet.lnbits.invoice_key_file = Some(key);
    });
    harness::start(
        config,
        Some(Arc::new(dvmd::infer::instant::InstantBackend::new("b"))),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pay_an_invoice_and_a_lightning_address_of_another_dvmd() {
    let lnbits = Lnbits::start().await;
    let a_account = lnbits.create_wallet("operator-a").await;
    let b_account = lnbits.create_wallet("operator-b").await;
    lnbits.fund(&a_account, 50_000).await;
    let a = LnbitsWallet::new(LnbitsConfig {
        url: lnbits.url.clone(),
        invoice_key: Secret::new(a_account.inkey.clone(), "test"),
        admin_key: Some(Secret::new(a_account.adminkey.clone(), "test")),
        webhook_url: None,
        websocket: false,
    })
    .expect("wallet");
    let data_b = harness::data_dir();
    let b = daemon_b(data_b.path(), &lnbits, &b_account).await;
    let host = b.ready().http_url.trim_start_matches("http://").to_owned();
    let address = format!("dvmd@{host}");

    // A Lightning address: resolved, the invoice checked (amount, metadata hash), then paid.
    let before = a.balance().await.expect("balance");
    let sent = lnurl::pay(&a, &address, Some(7_000), 1_000)
        .await
        .expect("pay the address");
    assert_eq!(sent.fee_msat, 0, "internal LNbits payment");
    assert_eq!(a.balance().await.expect("balance"), before - 7_000);

    // B's LNbits wallet only issues whole sats: B refuses an amount it cannot invoice exactly,
    // instead of handing out a rounded invoice that LUD-06 payers must reject.
    let odd: serde_json::Value = reqwest::get(format!(
        "{}/lnurlp/dvmd/callback?amount=7500",
        b.ready().http_url
    ))
    .await
    .expect("callback")
    .json()
    .await
    .expect("json");
    assert_eq!(odd["status"], "ERROR", "{odd}");
    assert!(
        odd["reason"]
            .as_str()
            .is_some_and(|r| r.contains("whole number of sats")),
        "{odd}"
    );

    // Out of range and malformed targets are refused before any money moves.
    let huge = lnurl::pay(&a, &address, Some(2_000_000_000), 1_000).await;
    assert!(matches!(huge, Err(WalletError::Refused(_))), "{huge:?}");
    assert!(
        lnurl::pay(&a, &address, None, 1_000).await.is_err(),
        "an address needs an amount"
    );
    assert!(lnurl::pay(&a, "nobody@127.0.0.1:1", Some(1_000), 0)
        .await
        .is_err());
    assert_eq!(a.balance().await.expect("balance"), before - 7_000);

    // B books the tip once its wallet confirms it: credited to B's own account.
    b.pipeline().reconcile_once().await;
    let b_pubkey = b.ready().pubkey;
    b.stop().await;
    let store = harness::open_store(data_b.path());
    let totals = harness::ledger_ok(&store);
    assert_eq!(totals.payment_in_msat, 7_000);
    assert_eq!(harness::balance(&store, &b_pubkey), 7_000);
    drop(store);

    // A BOLT11 invoice, through the CLI with the operator's config.
    let (bolt11, _) = lnbits.create_invoice(&b_account, 3, "payout").await;
    let data_a = harness::data_dir();
    let key = data_a.path().join("a.inkey");
    let admin = data_a.path().join("a.adminkey");
    std::fs::write(&key, &a_account.inkey).expect("write");
    std::fs::write(&admin, &a_account.adminkey).expect("write");
    let config = data_a.path().join("dvmd.toml");
    std::fs::write(
        &config,
        format!(
            "[wallet]\nbackend = \"lnbits\"\n[wallet.lnbits]\nurl = \"{}\"\ninvoice_key_file = \"{}\"\nadmin_key_file = \"{}\"\nwebsocket = false\n",
            lnbits.url,
            key.display(),
            admin.display()
        ),
    )
    .expect("write config");
    let dvmd = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_dvmd"))
            .args(args)
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(data_a.path())
            .output()
            .expect("run dvmd")
    };
    let paid = dvmd(&["wallet", "pay", &bolt11, "--max-fee-msat", "100"]);
    let stdout = String::from_utf8_lossy(&paid.stdout);
    assert!(
        paid.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&paid.stderr)
    );
    assert!(stdout.contains("paid; preimage"), "{stdout}");
    let balance = dvmd(&["wallet", "balance"]);
    let stdout = String::from_utf8_lossy(&balance.stdout);
    assert!(
        stdout.contains(&format!("{} msat", before - 10_000)),
        "{stdout}"
    );
    // No secret reaches the output.
    let stderr = String::from_utf8_lossy(&balance.stderr);
    assert!(!stdout.contains(&a_account.adminkey) && !stderr.contains(&a_account.adminkey));
    assert!(!stderr.contains(&a_account.inkey));
}

/// A payout dvmd cannot settle (its wallet cannot say what became of it) is settled by the
/// operator's word, with the daemon stopped: `failed` gives the amount and its most fee back,
/// once; a payout no longer pending is left as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_settles_a_stuck_payout_by_hand() {
    use dvmd::job::payouts::{Payout, PayoutState};
    use dvmd::job::{Book, PaymentRecord};
    use dvmd::wallet::PaymentHash;

    let data = harness::data_dir();
    let alice = nostr_sdk::Keys::generate().public_key();
    let hash = PaymentHash([7; 32]);
    {
        let book = Book::new(harness::open_store(data.path()));
        let top_up = PaymentHash([1; 32]);
        let record = PaymentRecord {
            job: None,
            account: alice.into(),
            amount_msat: 10_000,
            expires_at: u64::MAX,
            bolt11: String::new(),
            zap_request: None,
            consumed: false,
            closed: false,
            next_lookup_at: 0,
            continues: None,
        };
        book.register_invoice(&top_up, record)
            .await
            .expect("register");
        book.confirm_payment(&top_up, 10_000).await.expect("paid");
        let payout = Payout {
            account: alice.into(),
            bolt11: "lnbcrt1stuck".to_owned(),
            payment_hash: hash,
            amount_msat: 6_000,
            max_fee_msat: 1_000,
            expires_at: 1,
            state: PayoutState::Pending,
            note: None,
            created_at: 1,
            updated_at: 1,
        };
        book.begin_payout(payout).await.expect("begins");
        assert_eq!(harness::balance(book.store(), &alice), 3_000);
    }
    let dvmd = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_dvmd"))
            .args(args)
            .arg("--data-dir")
            .arg(data.path())
            .output()
            .expect("run dvmd")
    };
    let hex = hash.to_hex();
    let settled = dvmd(&["account", "settle-payout", "--payment-hash", &hex, "failed"]);
    assert!(settled.status.success(), "{settled:?}");
    let shown: serde_json::Value = serde_json::from_slice(&settled.stdout).expect("json");
    assert_eq!(shown["state"], "failed", "{shown}");
    let again = dvmd(&["account", "settle-payout", "--payment-hash", &hex, "paid"]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("not pending"),
        "{again:?}"
    );
    let store = harness::open_store(data.path());
    assert_eq!(harness::balance(&store, &alice), 10_000, "given back once");
    harness::ledger_ok(&store);
}
