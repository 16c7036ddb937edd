//! Nostr Wallet Connect: the wallet conformance suite and a paid job against a real, independent
//! NIP-47 service (npm @getalby/sdk `NWCWalletService`, `tests/peers/nwc_service.mjs`) backed by
//! LNbits, over an in-process relay.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use dvmd::job::JobState;
use dvmd::relay::EmbeddedRelay;
use dvmd::wallet::nwc::{NwcConfig, NwcWallet};
use dvmd::wallet::secret::Secret;
use tokio_util::sync::CancellationToken;

use crate::harness;
use crate::lnbits::{Lnbits, LnbitsAccount};
use crate::wallets::{conformance, LnbitsCounterparty};

/// The NIP-47 wallet service, as a child process.
pub struct NwcService {
    child: Child,
    /// Its `nostr+walletconnect://` URI.
    pub uri: String,
}

impl NwcService {
    /// Start the service for `account` on `relay_url` and wait for its ready line.
    pub fn start(relay_url: &str, lnbits: &Lnbits, account: &LnbitsAccount) -> Self {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/nwc_service.mjs");
        let peers = std::env::var("DVMD_NODE_PEERS")
            .expect("DVMD_NODE_PEERS not set: run `make test` (it installs the npm peers)");
        let mut child = Command::new("node")
            .arg(script)
            .args(["--relay", relay_url, "--lnbits", &lnbits.url])
            .args(["--adminkey", &account.adminkey, "--inkey", &account.inkey])
            .env("DVMD_NODE_PEERS", peers)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn node nwc_service.mjs");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("ready line");
        let uri = line
            .trim()
            .strip_prefix("nwc ready uri=")
            .unwrap_or_else(|| panic!("unexpected first line from the NWC service: {line:?}"))
            .to_owned();
        Self { child, uri }
    }
}

impl Drop for NwcService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn relay() -> (String, CancellationToken) {
    let relay = EmbeddedRelay::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let url = relay.url();
    let cancel = CancellationToken::new();
    tokio::spawn(relay.run(cancel.clone()));
    (url, cancel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nwc_wallet_conforms() {
    let lnbits = Lnbits::start().await;
    let service = lnbits.create_wallet("dvmd").await;
    let customer = lnbits.create_wallet("customer").await;
    lnbits.fund(&service, 10).await;
    lnbits.fund(&customer, 100_000).await;
    let (relay_url, stop_relay) = relay().await;
    let nwc = NwcService::start(&relay_url, &lnbits, &service);
    let wallet = NwcWallet::connect(NwcConfig {
        uri: Secret::new(nwc.uri.clone(), "test"),
        timeout: Duration::from_secs(20),
    })
    .await
    .expect("connect");
    conformance(
        Arc::new(wallet),
        &LnbitsCounterparty {
            lnbits: &lnbits,
            account: customer,
        },
    )
    .await;
    stop_relay.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paid_job_through_nwc() {
    let lnbits = Lnbits::start().await;
    let service = lnbits.create_wallet("dvmd").await;
    let customer = lnbits.create_wallet("customer").await;
    lnbits.fund(&customer, 10_000).await;
    let (relay_url, stop_relay) = relay().await;
    let nwc = NwcService::start(&relay_url, &lnbits, &service);
    let data = harness::data_dir();
    let config = harness::dev_config(data.path(), |file| {
        harness::use_nwc(file, data.path(), &nwc.uri);
    });
    let backend = Arc::new(dvmd::infer::instant::InstantBackend::new("paid over NWC"));
    let daemon = harness::start(config, Some(backend)).await;
    let ready = daemon.ready().clone();
    let (mut alice, request, quote, bolt11) = harness::hello_job(&ready.relay_url).await;
    lnbits.pay(&customer, &bolt11).await;
    let result = harness::result(&mut alice, &request.id).await;
    assert_eq!(result.content, "paid over NWC");
    let job =
        harness::wait_for_state(daemon.pipeline().book(), &request.id, JobState::Settled).await;
    assert_eq!(job.paid_msat, quote);
    alice.shutdown().await;
    daemon.stop().await;
    stop_relay.cancel();
    let totals = harness::ledger_ok(&harness::open_store(data.path()));
    assert_eq!(totals.payment_in_msat, quote);
    assert_eq!(lnbits.balance_msat(&service).await, quote);
}
