//! What "durable" means on disk: a write the store calls durable has been through `fdatasync`
//! (which flushes the disk's write cache and the file size the log grew by), not only
//! `sync_file_range` (which sled 0.34 used: pages written back, but a power cut could still
//! lose them). Seen from outside, with strace, on the real binary and a real store.

use nostr_sdk::Keys;

/// `dvmd trust set` on a stopped daemon's store makes one durable write and closes the store.
/// Every sync it asks of the kernel is traced.
#[test]
fn a_durable_write_reaches_the_disk_through_fdatasync() {
    let data = tempfile::tempdir().expect("temp dir");
    let trace = data.path().join("syncs.strace");
    let out = std::process::Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-e",
            "trace=fsync,fdatasync,sync_file_range,syncfs,sync",
        ])
        .arg("-o")
        .arg(&trace)
        .arg(env!("CARGO_BIN_EXE_dvmd"))
        .args(["trust", "set"])
        .arg(Keys::generate().public_key().to_hex())
        .arg("blocked")
        .arg("--data-dir")
        .arg(data.path())
        .output()
        .expect("strace runs (make deps installs it)");
    assert!(out.status.success(), "{out:?}");
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(answer["tier"], "blocked", "the write was made: {answer}");

    let syncs = std::fs::read_to_string(&trace).expect("strace wrote its log");
    let calls = |name: &str| {
        syncs
            .lines()
            .filter(|line| line.contains(&format!("{name}(")))
            .count()
    };
    assert!(
        calls("fdatasync") >= 1,
        "the durable write went through fdatasync:\n{syncs}"
    );
    assert_eq!(
        calls("sync_file_range"),
        0,
        "no write is called durable on sync_file_range alone:\n{syncs}"
    );
}
