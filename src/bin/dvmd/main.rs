//! The `dvmd` command line: parse arguments, load configuration, start logging, run.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;

use dvmd::config::{self, Overrides};
use dvmd::daemon::{Daemon, Parts};
use dvmd::job::Book;
use dvmd::store::Store;
use dvmd::{bench, identity, wallet};

/// jemalloc rather than glibc malloc: the daemon allocates many small, short-lived buffers
/// (events, frames, JSON) on many threads, and glibc's malloc and free were about 15% of its CPU
/// under load; with jemalloc `dvmd bench load` serves about 45% more jobs per second.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main` (the C string `malloc_conf`; the environment's
/// `_RJEM_MALLOC_CONF` is read after it and wins, e.g. `_RJEM_MALLOC_CONF=narenas:8`).
///
/// One arena, not jemalloc's default of four per CPU: the daemon's allocations are small and
/// short-lived, on tokio workers, the store writer and sled's IO threads, and one thread often
/// frees what another allocated. Spread over eight arenas on a 2-core machine, the freed memory
/// stayed in pages of every arena. Under `dvmd bench load --customers 100 --jobs 20000` RSS at
/// job 20,000 fell from 67 to 63-64 MB (free jobs) and from 125 to 117 MB (paid), with the same
/// throughput (thread caches serve most allocations without touching the arena's lock).
///
/// Freed pages go back to the system after about a second (`dirty_decay_ms:1000`, and at once
/// from there: `muzzy_decay_ms:0`), not jemalloc's default of ten. The decay is timed, not
/// counted: at 1,000 jobs a second the daemon frees hundreds of MB of short-lived buffers a
/// second, and ten seconds of their dirty pages kept RSS growing for the first ten seconds of
/// any load (`dvmd bench load --customers 100`, from job 2,000 to 20,000: +8.8 to +11.2% in
/// four runs with the default, +6.1 to +10.2% in four with this; the CPU per job did not move
/// beyond the run-to-run noise). See "What grows with history" in ARCHITECTURE.md.
// SAFETY: the symbol is jemalloc's own `malloc_conf` (`const char *`, prefixed as
// tikv-jemalloc-sys builds it); nothing else in the process defines it, and the value is a
// NUL-terminated string that lives for the whole process.
#[allow(unsafe_code)]
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &[u8; 47] = b"narenas:1,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

mod args;
mod offline;

use args::{AccountCommand, BenchCommand, Cli, Command, DevCommand, LedgerCommand, WalletCommand};
use offline::{load, load_offline, open_store, trust, withdraw_as_operator};

/// Logs go to stderr, filtered by `DVMD_LOG` (tracing's env-filter syntax). Benchmarks default
/// to warnings only, so their figures are not buried.
fn init_tracing(default: &str) {
    let filter = EnvFilter::try_from_env("DVMD_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(match cli.command {
        Command::Bench { .. } => "warn,nostr_relay_pool=error,llama-cpp-2=warn,llama_cpp_2=error",
        _ => "info,nostr_relay_pool=warn,nostr_sdk=warn,llama-cpp-2=warn,llama_cpp_2=error",
    });
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dvmd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init { files } => {
            let config = load_offline(&files)?;
            let (keys, created) = identity::init(&config.data_dir)?;
            let verb = if created { "created" } else { "kept existing" };
            println!(
                "{verb} service key in {} (pubkey {})",
                config.data_dir.display(),
                keys.public_key().to_hex()
            );
        }
        Command::Run {
            files,
            dev,
            relay_listen,
            http_listen,
            model,
        } => {
            let config = load(
                &files,
                Overrides {
                    dev,
                    data_dir: None,
                    relay_listen,
                    http_listen,
                    model_path: model,
                },
            )?;
            dvmd::metrics::count_panics();
            let daemon = Daemon::start(config, Parts::default()).await?;
            // The one line scripts wait for; everything else goes to the log on stderr.
            println!("{}", daemon.ready());
            daemon.run_until_signal().await?;
        }
        Command::Dev {
            command: DevCommand::Pay { bolt11, http },
        } => {
            let url = format!("{}/dev/pay", http.trim_end_matches('/'));
            let response = reqwest::Client::new()
                .post(&url)
                .json(&serde_json::json!({ "bolt11": bolt11 }))
                .send()
                .await
                .with_context(|| format!("cannot reach {url}: is `dvmd run --dev` running?"))?;
            let status = response.status();
            let body: serde_json::Value = response.json().await.unwrap_or_default();
            if !status.is_success() {
                anyhow::bail!(
                    "{status}: {}",
                    body["error"].as_str().unwrap_or("no reason given")
                );
            }
            println!(
                "paid; preimage {}",
                body["preimage"].as_str().unwrap_or("?")
            );
        }
        Command::Wallet { command } => {
            let files = match &command {
                WalletCommand::Balance { files } | WalletCommand::Pay { files, .. } => {
                    files.clone()
                }
            };
            let config = load_offline(&files)?;
            // Only the dev wallet lives in the store (locked while the daemon runs); the others
            // are remote and can be used beside a running daemon.
            let store = match config.wallet {
                config::WalletChoice::Dev => Store::open(&config.data_dir.join("store"))?,
                _ => Store::temporary()?,
            };
            let (wallet, _) = wallet::open(&config.wallet, &store).await?;
            match command {
                WalletCommand::Balance { .. } => {
                    println!(
                        "{} msat ({} wallet)",
                        wallet.balance().await?,
                        wallet.name()
                    );
                }
                WalletCommand::Pay {
                    target,
                    amount_msat,
                    max_fee_msat,
                    ..
                } => {
                    let sent =
                        wallet::lnurl::pay(wallet.as_ref(), &target, amount_msat, max_fee_msat)
                            .await?;
                    println!(
                        "paid; preimage {} fee {} msat",
                        hex::encode(sent.preimage),
                        sent.fee_msat
                    );
                }
            }
        }
        Command::Account {
            command:
                AccountCommand::Withdraw {
                    files,
                    account,
                    bolt11,
                    address,
                    amount_msat,
                },
        } => {
            let asked = dvmd::http::withdraw::Withdraw {
                bolt11,
                lightning_address: address,
                amount_msat,
                account: Some(account),
            };
            let payout = withdraw_as_operator(&files, asked).await?;
            println!("{}", serde_json::to_string_pretty(&payout)?);
            if payout["state"] == "failed" {
                anyhow::bail!(
                    "the wallet says the payout failed; the amount is back on the balance"
                );
            }
        }
        Command::Account {
            command:
                AccountCommand::SettlePayout {
                    files,
                    payment_hash,
                    outcome,
                    fee_msat,
                },
        } => {
            use dvmd::job::payouts::PayoutState;
            let book = Book::new(open_store(&files)?);
            let hash = wallet::PaymentHash::from_hex(&payment_hash)
                .map_err(|e| anyhow::anyhow!("--payment-hash: {e}"))?;
            let Some(payout) = book.payout(&hash).await? else {
                anyhow::bail!("no payout has payment hash {payment_hash}");
            };
            if payout.state != PayoutState::Pending {
                anyhow::bail!(
                    "payout {payment_hash} is not pending: {}",
                    serde_json::to_string(&payout.state)?
                );
            }
            let state = match outcome {
                args::PayoutOutcome::Failed => PayoutState::Failed,
                args::PayoutOutcome::Paid => PayoutState::Paid { fee_msat },
            };
            let settled = book.finish_payout(&hash, state).await?;
            println!("{}", serde_json::to_string_pretty(&settled)?);
        }
        Command::Trust { command } => {
            println!("{}", serde_json::to_string_pretty(&trust(command).await?)?);
        }
        Command::Ledger {
            command: LedgerCommand::Check { files },
        } => {
            let store = open_store(&files)?;
            let totals = store.read_blocking(dvmd::job::audit)?;
            println!("ledger ok: {}", serde_json::to_string_pretty(&totals)?);
        }
        Command::Ledger {
            command:
                LedgerCommand::Show {
                    files,
                    account,
                    job,
                },
        } => {
            let account = account
                .map(|a| a.parse::<dvmd::ledger::Account>())
                .transpose()
                .map_err(|e| anyhow::anyhow!(e))?;
            let job = job
                .map(|j| {
                    dvmd::job::JobId::from_hex(&j)
                        .ok_or_else(|| anyhow::anyhow!("`{j}` is not a job id (64 hex digits)"))
                })
                .transpose()?;
            let store = open_store(&files)?;
            let entries = store.read_blocking(dvmd::ledger::entries)?;
            for (seq, entry) in entries {
                if account.is_some_and(|a| a != entry.account)
                    || job.is_some_and(|j| entry.job != Some(j))
                {
                    continue;
                }
                println!(
                    "{seq:>8} {} {:<20} {:>14} msat  {}{}{}",
                    entry.at,
                    serde_json::to_value(entry.kind)?.as_str().unwrap_or("?"),
                    entry.msat,
                    entry.account.to_human(),
                    entry.job.map(|j| format!(" job={j}")).unwrap_or_default(),
                    entry
                        .payment_hash
                        .map(|h| format!(" hash={h}"))
                        .unwrap_or_default(),
                );
            }
        }
        Command::Jobs { files } => {
            let store = open_store(&files)?;
            for job in Book::new(store).all_blocking()? {
                println!(
                    "{} {:<16} customer={} quote={} paid={} credit={} held={} charged={} {}",
                    job.id,
                    format!("{:?}", job.state),
                    job.customer,
                    job.quote_msat.unwrap_or(0),
                    job.paid_msat,
                    job.credit_msat,
                    job.held_msat,
                    job.charge_msat.unwrap_or(0),
                    job.reason.unwrap_or_default()
                );
            }
        }
        Command::Bench { command } => match command {
            BenchCommand::Intake { requests } => bench::intake(requests)
                .await
                .map_err(|e| anyhow::anyhow!(e))?,
            BenchCommand::Roundtrip { jobs } => bench::roundtrip(jobs)
                .await
                .map_err(|e| anyhow::anyhow!(e))?,
            BenchCommand::Http { calls } => bench::http::run(calls)
                .await
                .map_err(|e| anyhow::anyhow!(e))?,
            BenchCommand::Load(options) => bench::load::run(options)
                .await
                .map_err(|e| anyhow::anyhow!(e))?,
            BenchCommand::Pricing {
                model,
                max_tokens,
                limit,
            } => bench::pricing::run(
                model.unwrap_or_else(config::dev_model_path),
                max_tokens,
                limit,
            )
            .await
            .map_err(|e| anyhow::anyhow!(e))?,
            BenchCommand::Model {
                model,
                tokens,
                runs,
                llama_server,
            } => bench::model(
                model.unwrap_or_else(config::dev_model_path),
                tokens,
                runs,
                llama_server,
            )
            .await
            .map_err(|e| anyhow::anyhow!(e))?,
        },
    }
    Ok(())
}

#[cfg(test)]
mod allocator_tests {
    /// `MALLOC_CONF` reaches jemalloc (a misspelt symbol would be ignored without a word), and
    /// each of its options took.
    #[test]
    fn the_allocator_runs_one_arena_and_returns_pages_within_a_second() {
        if std::env::var_os("_RJEM_MALLOC_CONF").is_some() {
            return; // the operator's setting wins, as documented
        }
        let arenas = tikv_jemalloc_ctl::opt::narenas::read().expect("opt.narenas");
        assert_eq!(arenas, 1);
        let decay = |name: &[u8]| -> isize {
            // SAFETY: both are jemalloc `ssize_t` options, read into an `isize` of that size,
            // by NUL-terminated names.
            #[allow(unsafe_code)]
            unsafe {
                tikv_jemalloc_ctl::raw::read(name).expect("a jemalloc option")
            }
        };
        assert_eq!(decay(b"opt.dirty_decay_ms\0"), 1000);
        assert_eq!(decay(b"opt.muzzy_decay_ms\0"), 0);
    }
}
