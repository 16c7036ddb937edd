//! The HTTP listener's limits on connections: idle and dripping connections are closed, one
//! address cannot hold them all, and the daemon keeps answering.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness;

/// A connection to `addr` from `127.0.0.2`: another address on this host than `127.0.0.1`,
/// whose connections are not limited per address.
async fn connect_from_elsewhere(addr: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.2:0".parse().expect("addr"))
        .expect("bind 127.0.0.2");
    socket
        .connect(addr.parse().expect("addr"))
        .await
        .expect("connect")
}

/// Read until the server closes the connection (or `limit` passes: `None`).
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((started + limit).into(), stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// A request for `/healthz` on an open connection; whether it was answered 200.
async fn healthz_on(stream: &mut TcpStream) -> bool {
    let request = "GET /healthz HTTP/1.1\r\nHost: dvmd\r\n\r\n";
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = vec![0u8; 4096];
    match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => buf[..n].starts_with(b"HTTP/1.1 200"),
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_dripping_connections_are_closed_and_one_address_cannot_hold_them_all() {
    const DEADLINE: Duration = Duration::from_secs(2);
    let data = harness::data_dir();
    let config = harness::dev_config(data.path(), |file| {
        file.http.max_connections_per_ip = 3;
        file.http.header_timeout_secs = DEADLINE.as_secs();
    });
    let daemon = harness::start(config, None).await;
    let addr = daemon
        .ready()
        .http_url
        .trim_start_matches("http://")
        .to_owned();

    // Three connections from one address: one kept alive between requests, one that sends
    // nothing, one that sends blank lines (which end no request) and then nothing. A fourth
    // is closed at once.
    let mut kept = connect_from_elsewhere(&addr).await;
    assert!(healthz_on(&mut kept).await);
    let silent = connect_from_elsewhere(&addr).await;
    let mut blank = connect_from_elsewhere(&addr).await;
    blank.write_all(b"\r\n\r\n").await.expect("write");
    let mut fourth = connect_from_elsewhere(&addr).await;
    assert!(
        !healthz_on(&mut fourth).await,
        "a connection over the address's most is closed unanswered"
    );
    // Kept alive, it serves the next request in time.
    tokio::time::sleep(DEADLINE / 4).await;
    assert!(
        healthz_on(&mut kept).await,
        "a kept-alive connection serves on"
    );

    // Each is closed once its next request's headers are overdue.
    for (what, mut stream) in [("kept alive", kept), ("silent", silent), ("blank", blank)] {
        let closed = closed_within(&mut stream, DEADLINE * 4).await;
        assert!(closed.is_some(), "{what}: closed at the header deadline");
    }

    // As is one that drips valid header lines, a byte at a time: without a deadline it could
    // go on for hours before its headers grew too large.
    let mut drip = connect_from_elsewhere(&addr).await;
    let head = b"GET /healthz HTTP/1.1\r\n".iter();
    let dripped = async {
        for byte in head.chain(b"X-Drip: 1\r\n".iter().cycle()) {
            if drip.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert!(
        tokio::time::timeout(Duration::from_secs(30), dripped)
            .await
            .is_ok(),
        "a connection dripping its headers is closed"
    );

    // Their slots are free again.
    let mut fresh = connect_from_elsewhere(&addr).await;
    assert!(healthz_on(&mut fresh).await, "a new connection is served");

    // This host's own clients (a proxy, a benchmark's customers) are not limited per address.
    let mut local = Vec::new();
    for _ in 0..6 {
        let mut stream = TcpStream::connect(&addr).await.expect("connect");
        assert!(
            healthz_on(&mut stream).await,
            "a local connection is served"
        );
        local.push(stream);
    }
    daemon.stop().await;
}
