//! An independent implementation as the customer: PyPI nostr-sdk (Python bindings of
//! rust-nostr), sharing no code with dvmd, runs one paid job against `dvmd run --dev`.

use std::process::Command;

use dvmd::job::JobState;

use crate::harness::{self, DaemonProcess};

#[test]
fn python_nostr_sdk_customer_runs_a_paid_job() {
    let python = std::env::var("DVMD_PEERS_PYTHON")
        .expect("DVMD_PEERS_PYTHON not set: run `make test` (it installs the peer venv)");
    let data = harness::data_dir();
    let daemon = DaemonProcess::spawn(data.path(), harness::free_port(), harness::free_port(), "");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/customer.py");
    let output = Command::new(python)
        .arg(script)
        .args(["--relay", &daemon.relay_url])
        .args(["--dev-pay-url", &format!("{}/dev/pay", daemon.http_url)])
        .args(["--service-pubkey", &daemon.pubkey])
        .args(["--prompt", "Say hello to Nostr."])
        .args(["--timeout", "120"])
        .output()
        .expect("run customer.py");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "customer.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("payment-required"), "{stdout}");
    assert!(stdout.contains("content"), "{stdout}");
    daemon.terminate();

    let store = harness::open_store(data.path());
    let jobs = harness::jobs(&store);
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].state, JobState::Settled);
    let totals = harness::ledger_ok(&store);
    assert_eq!(totals.payment_in_msat, jobs[0].paid_msat);
}
