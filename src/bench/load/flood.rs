//! `dvmd bench load --flood N`: N fresh keys post one job request each while the measured
//! (known) customers run, over one websocket, at `--flood-rate` a second.

use std::time::{Duration, Instant};

use futures::SinkExt;
use nostr_sdk::{ClientMessage, Event, JsonUtil, Keys, PublicKey};
use tokio_tungstenite::tungstenite::Message;

use super::{metric, LoadOptions, Record};
use crate::bench::BenchError;
use crate::customer;

/// What the flood did.
pub(super) struct Flood {
    sent: usize,
    took: Duration,
}

/// `n` job requests, each signed by a fresh key (signed before the run, so signing costs the
/// bench nothing while it measures).
pub(super) fn sign(n: usize, service: PublicKey) -> Result<Vec<Event>, BenchError> {
    (0..n)
        .map(|i| {
            Ok(customer::text_request(
                &format!("flood {i}"),
                &[("max_tokens", "16")],
                None,
                Some(service),
            )
            .sign_with_keys(&Keys::generate())?)
        })
        .collect()
}

/// Offer `events` to `relay` at `rate` a second.
pub(super) async fn offer(
    relay: String,
    events: Vec<Event>,
    rate: f64,
) -> Result<Flood, BenchError> {
    let (mut socket, _) = tokio_tungstenite::connect_async(relay.as_str()).await?;
    let every = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let started = Instant::now();
    let start = tokio::time::Instant::now();
    for (n, event) in events.iter().enumerate() {
        tokio::time::sleep_until(start + every.mul_f64(n as f64)).await;
        let text = ClientMessage::event(event.clone()).as_json();
        socket.send(Message::Text(text.into())).await?;
    }
    let took = started.elapsed();
    let _ = socket.close(None).await;
    Ok(Flood {
        sent: events.len(),
        took,
    })
}

/// Print what the flood cost: requests refused (and how fast), and the wallet calls it caused.
pub(super) fn report(options: &LoadOptions, record: &Record, flood: Flood, metrics: &str) {
    let dropped = |reason: &str| {
        metric(
            metrics,
            &format!("dvmd_events_dropped_total{{reason=\"{reason}\"}}"),
        )
        .unwrap_or(0.0)
    };
    let refused = dropped("new_keys_busy") + dropped("no_proof_of_work") + dropped("rate_limited");
    let invoices = metric(metrics, "dvmd_request_to_invoice_seconds_count").unwrap_or(0.0);
    let customers_paid = if options.paid {
        record.completed.load(std::sync::atomic::Ordering::Relaxed) as f64
    } else {
        0.0
    };
    println!(
        "  flood                        : {} fresh keys, one request each, over {:.1} s",
        flood.sent,
        flood.took.as_secs_f64()
    );
    println!(
        "  flood refused before work    : {refused:>8.0} ({:.0}/s)",
        refused / flood.took.as_secs_f64().max(0.001)
    );
    println!(
        "  wallet invoices for the flood: {:>8.0} (new keys may hold at most [trust] new_max_open_invoices, default 1500)",
        (invoices - customers_paid).max(0.0)
    );
}
