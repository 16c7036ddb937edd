//! `dvmd bench http`: what NIP-98 costs a `/v1` call. A dev daemon in this process (dev wallet,
//! instant backend) answers `GET /healthz` (the HTTP round trip alone) and `GET /v1/account`
//! signed with NIP-98 (header checks, id and signature, the replay cache, and an account read
//! from the store), over one keep-alive loopback connection; headers are signed before the
//! clock starts, as a client would sign them. The verifier alone is timed too.

use std::time::{Duration, Instant};

use base64::Engine;
use nostr_sdk::{EventBuilder, JsonUtil, Keys, Kind, Tag, TagKind, Timestamp};

use super::{bench_daemon, report, tempdir, BenchError};
use crate::http::nip98::Verifier;

/// Run `calls` of each and print p50/p90/p99.
pub async fn run(calls: usize) -> Result<(), BenchError> {
    let daemon = bench_daemon(tempdir()?.join("http"), |_| {}).await?;
    let http = daemon.ready().http_url.clone();
    let client = reqwest::Client::new();
    let keys = Keys::generate();
    let url = format!("{http}/v1/account?limit=10");
    let warmup = (calls / 20).max(10);
    let headers = (0..calls + warmup)
        .map(|i| header(&keys, &url, i))
        .collect::<Result<Vec<_>, _>>()?;

    let mut health = Vec::with_capacity(calls);
    let mut account = Vec::with_capacity(calls);
    for (i, auth) in headers.iter().enumerate() {
        let t0 = Instant::now();
        let status = client.get(format!("{http}/healthz")).send().await?.status();
        let healthz = t0.elapsed();
        if !status.is_success() {
            return Err(format!("/healthz answered {status}").into());
        }
        let t0 = Instant::now();
        let response = client
            .get(&url)
            .header("Authorization", auth)
            .send()
            .await?;
        let status = response.status();
        response.bytes().await?;
        let signed = t0.elapsed();
        if !status.is_success() {
            return Err(format!("/v1/account answered {status}").into());
        }
        if i >= warmup {
            health.push(healthz);
            account.push(signed);
        }
    }

    let verifier = Verifier::new(60, calls + warmup);
    let mut verify = Vec::with_capacity(calls);
    for auth in headers.iter().skip(warmup) {
        let t0 = Instant::now();
        verifier
            .verify(Some(auth), &url, "GET", &[], Timestamp::now())
            .map_err(|e| format!("verify: {e}"))?;
        verify.push(t0.elapsed());
    }
    daemon.stop().await;

    println!("bench http: {calls} calls of each, one keep-alive loopback connection, dev daemon");
    report("GET /healthz", &mut health);
    report("GET /v1/account (NIP-98)", &mut account);
    report("NIP-98 verify alone", &mut verify);
    let overhead = median(&account).saturating_sub(median(&health));
    println!(
        "  {:<29}: p50 {:.3} ms",
        "NIP-98 + account read, over",
        overhead.as_secs_f64() * 1e3
    );
    Ok(())
}

fn median(sorted: &[Duration]) -> Duration {
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

/// A NIP-98 header for `GET url`, distinct per `n`.
fn header(keys: &Keys, url: &str, n: usize) -> Result<String, BenchError> {
    let event = EventBuilder::new(Kind::from(27235), "")
        .tags([
            Tag::custom(TagKind::custom("u"), [url.to_owned()]),
            Tag::custom(TagKind::custom("method"), ["GET"]),
            Tag::custom(TagKind::custom("nonce"), [n.to_string()]),
        ])
        .sign_with_keys(keys)?;
    Ok(format!(
        "Nostr {}",
        base64::engine::general_purpose::STANDARD.encode(event.as_json())
    ))
}
