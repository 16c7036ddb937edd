//! The sign-in page in a real headless Chromium (Debian's, driven by npm playwright-core) with a
//! NIP-07 `window.nostr` backed by a real key: sign in, top up (paid from the test LNbits), chat
//! with the real model (streamed), see the charge and the change, turn on auto-payout, withdraw.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use nostr_sdk::Keys;
use serde_json::Value;

use crate::harness;
use crate::withdraw::{bank, invoice, lnbits_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_signs_in_tops_up_chats_and_withdraws_in_a_browser() {
    let (lnbits, service, customer) = bank().await;
    let data = harness::data_dir();
    let daemon = harness::start(lnbits_config(data.path(), &lnbits, &service, |_| {}), None).await;
    let http = daemon.ready().http_url.clone();
    let keys = Keys::generate();
    let screenshot = data.path().join("sign-in.png");

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/browser.mjs");
    let mut browser = Command::new("node")
        .arg(script)
        .args(["--url", &format!("{http}/"), "--secret"])
        .arg(keys.secret_key().to_secret_hex())
        .arg("--screenshot")
        .arg(&screenshot)
        .env(
            "DVMD_NODE_PEERS",
            std::env::var("DVMD_NODE_PEERS").expect("DVMD_NODE_PEERS: run `make test`"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node browser.mjs");
    let mut to_browser = browser.stdin.take().expect("stdin");
    let mut from_browser = BufReader::new(browser.stdout.take().expect("stdout")).lines();
    let mut steps: Vec<Value> = Vec::new();
    loop {
        let line = tokio::task::block_in_place(|| from_browser.next())
            .expect("the browser stopped before it was done")
            .expect("read");
        let step: Value = serde_json::from_str(&line).expect("a JSON line");
        match step["step"].as_str() {
            Some("invoice") => {
                lnbits
                    .pay(&customer, step["bolt11"].as_str().expect("bolt11"))
                    .await;
                writeln!(to_browser, "paid").expect("write");
            }
            Some("withdraw") => {
                let bolt11 = invoice(&lnbits, &customer, 10).await;
                writeln!(to_browser, "{bolt11}").expect("write");
            }
            _ => {}
        }
        let done = step["step"] == "done";
        steps.push(step);
        if done {
            break;
        }
    }
    assert!(browser.wait().expect("wait").success());
    let step = |name: &str| {
        steps
            .iter()
            .find(|s| s["step"] == name)
            .unwrap_or_else(|| panic!("no step {name}: {steps:?}"))
            .clone()
    };
    assert_eq!(step("signed_in")["balance_msat"], 0);
    assert_eq!(step("topped_up")["balance_msat"], 50_000);
    let chatted = step("chatted");
    assert!(
        !chatted["text"].as_str().unwrap_or_default().is_empty(),
        "{chatted}"
    );
    eprintln!(
        "browser: sign-in to first answer {} ms (first words {} ms after asking)",
        chatted["sign_in_to_first_answer_ms"], chatted["first_answer_ms"]
    );
    // The job's row: charged the exact usage of what was reserved, the rest back.
    let rows = step("jobs")["rows"].clone();
    let row = &rows[0];
    assert_eq!(row[1], "http_chat", "{rows}");
    assert_eq!(row[2], "settled", "{rows}");
    let cell = |i: usize| {
        row[i]
            .as_str()
            .unwrap_or_default()
            .parse::<u64>()
            .expect("msat")
    };
    let (paid, charged, returned) = (cell(4), cell(5), cell(6));
    assert!(charged > 0 && paid == charged + returned, "{rows}");
    let cost = chatted["cost"].as_str().unwrap_or_default();
    assert!(cost.contains(&format!("charged {charged} msat")), "{cost}");

    let withdrawn = step("withdrawn");
    assert!(
        withdrawn["result"]
            .as_str()
            .unwrap_or_default()
            .starts_with("paid"),
        "{withdrawn}"
    );
    assert_eq!(
        withdrawn["balance_msat"],
        50_000 - charged - 10_000 - fee(&daemon, &keys).await,
        "{withdrawn}"
    );
    assert!(std::fs::metadata(&screenshot).expect("screenshot").len() > 10_000);
    if let Ok(keep) = std::env::var("DVMD_KEEP_SCREENSHOT") {
        std::fs::copy(&screenshot, keep).expect("copy the screenshot");
    }
    let settings = daemon
        .pipeline()
        .book()
        .settings(dvmd::ledger::Account::from(keys.public_key()))
        .await
        .expect("settings");
    assert!(settings.auto_payout, "the checkbox set it");
    daemon.stop().await;
    harness::ledger_ok(&harness::open_store(data.path()));
}

/// What the payout's routing fee cost (LNbits between its own wallets: nothing, normally).
async fn fee(daemon: &dvmd::daemon::Daemon, keys: &Keys) -> u64 {
    let account = dvmd::ledger::Account::from(keys.public_key());
    daemon
        .pipeline()
        .book()
        .store()
        .read(move |r| dvmd::ledger::entries_of(r, &account, 50))
        .await
        .expect("entries")
        .iter()
        .filter(|(_, e)| e.kind == dvmd::ledger::EntryKind::RoutingFee)
        .map(|(_, e)| e.msat)
        .sum()
}
