//! A NIP-90 customer: post a kind 5050 job to a relay, pay the invoice, print the result.
//!
//! ```text
//! cargo run --example customer -- --relay ws://127.0.0.1:7777 --dev-pay http://127.0.0.1:8080 "Why is the sky blue?"
//! ```
//! With `--dev-pay` the invoice is paid through dvmd's dev wallet (`POST /dev/pay`); without
//! it the invoice is printed for you to pay from any wallet. Exits non-zero on an `error`
//! feedback or a timeout.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use dvmd::customer::{self, Customer, Reply};
use dvmd::nip90::JobStatus;
use nostr_sdk::PublicKey;

#[derive(Parser)]
struct Args {
    /// Relay URL.
    #[arg(long, default_value = "ws://127.0.0.1:7777")]
    relay: String,
    /// Pay through this dvmd dev-mode HTTP URL instead of printing the invoice.
    #[arg(long)]
    dev_pay: Option<String>,
    /// Address the job to this service (hex pubkey); untargeted otherwise.
    #[arg(long)]
    service: Option<String>,
    /// Most to pay, msat.
    #[arg(long, default_value_t = 1_000_000)]
    bid: u64,
    /// Completion budget.
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// Seconds to wait for each step.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// The prompt.
    prompt: Vec<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("customer: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let prompt = args.prompt.join(" ");
    if prompt.trim().is_empty() {
        bail!("give a prompt");
    }
    let service = args.service.as_deref().map(PublicKey::parse).transpose()?;
    let timeout = Duration::from_secs(args.timeout);
    let mut customer = Customer::connect(&args.relay).await?;
    let max_tokens = args.max_tokens.to_string();
    let request = customer
        .post(customer::text_request(
            &prompt,
            &[("max_tokens", &max_tokens)],
            Some(args.bid),
            service,
        ))
        .await?;
    println!(
        "posted job {} as {}",
        request.id,
        customer.keys().public_key()
    );

    loop {
        let reply = customer
            .next_reply(&request.id, timeout)
            .await
            .context("no answer from any service")?;
        match reply {
            Reply::Feedback {
                status: Some(JobStatus::PaymentRequired),
                amount,
                info,
                ..
            } => {
                let amount = amount.context("payment-required without an amount tag")?;
                let bolt11 = amount
                    .bolt11
                    .context("payment-required without an invoice")?;
                println!("payment-required: {} msat ({info})", amount.msat);
                match &args.dev_pay {
                    Some(http) => {
                        let url = format!("{}/dev/pay", http.trim_end_matches('/'));
                        let response = reqwest::Client::new()
                            .post(&url)
                            .json(&serde_json::json!({ "bolt11": bolt11 }))
                            .send()
                            .await?;
                        if !response.status().is_success() {
                            bail!("dev pay failed: {}", response.text().await?);
                        }
                        println!("paid through the dev wallet");
                    }
                    None => println!("pay this invoice from your wallet:\n{bolt11}"),
                }
            }
            Reply::Feedback {
                status: Some(JobStatus::Error),
                info,
                ..
            } => bail!("error: {info}"),
            Reply::Feedback { status, info, .. } => {
                println!(
                    "{}: {info}",
                    status.map(|s| s.as_str()).unwrap_or("unknown status")
                )
            }
            Reply::Result(event) => {
                let charged = event
                    .tags
                    .iter()
                    .find_map(|t| match t.as_slice() {
                        [name, msat, ..] if name == "charged" => Some(msat.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
                println!("result (charged {charged} msat):\n{}", event.content);
                customer.shutdown().await;
                return Ok(());
            }
        }
    }
}
