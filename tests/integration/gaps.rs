//! A relay that drops the daemon's connection loses no job: requests posted while the daemon
//! is away are served once it is back (it reconnects on its own and fetches what it missed).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dvmd::config::{Config, FileConfig, Overrides, RelayEntry, RelaysFile};
use dvmd::customer::{self, Customer};
use dvmd::infer::instant::InstantBackend;
use dvmd::job::JobState;
use dvmd::relay::EmbeddedRelay;
use tokio_util::sync::CancellationToken;

use crate::harness;

async fn relay_on(addr: SocketAddr) -> CancellationToken {
    let relay = EmbeddedRelay::bind(addr).await.expect("bind");
    let stop = CancellationToken::new();
    tokio::spawn(relay.run(stop.clone()));
    stop
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_posted_while_the_daemon_is_disconnected_are_served_after_it_reconnects() {
    let addr: SocketAddr = format!("127.0.0.1:{}", harness::free_port())
        .parse()
        .expect("addr");
    let url = format!("ws://{addr}");
    let first = relay_on(addr).await;

    let data = harness::data_dir();
    dvmd::identity::init(data.path()).expect("init");
    let relays = RelaysFile {
        relay: vec![RelayEntry {
            url: url.clone(),
            read: true,
            write: true,
        }],
    };
    let mut file = FileConfig::default();
    file.pricing.base_fee_msat = 0;
    file.pricing.prompt_msat_per_1k_tokens = 0;
    file.pricing.completion_msat_per_1k_tokens = 0;
    let config = Config::build(
        file,
        relays,
        Overrides {
            data_dir: Some(data.path().to_owned()),
            http_listen: Some("127.0.0.1:0".into()),
            ..Overrides::default()
        },
    )
    .expect("config");
    let daemon = harness::start(config, Some(Arc::new(InstantBackend::new("back again")))).await;
    let service = daemon.ready().pubkey;

    // The relay goes away (every connection closed, every stored event gone) and comes back
    // on the same address; the daemon is not connected yet when the requests arrive.
    first.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = relay_on(addr).await;
    let mut alice = Customer::connect(&url).await.expect("connect");
    let mut requests = Vec::new();
    for i in 0..5 {
        let request = alice
            .post(customer::text_request(
                &format!("while you were away {i}"),
                &[("max_tokens", "4")],
                None,
                Some(service),
            ))
            .await
            .expect("post");
        requests.push(request);
    }
    for request in &requests {
        let result = harness::result(&mut alice, &request.id).await;
        assert_eq!(result.content, "back again");
    }
    for request in &requests {
        harness::wait_for_state(daemon.pipeline().book(), &request.id, JobState::Settled).await;
    }
    alice.shutdown().await;
    daemon.stop().await;
    second.cancel();
}
