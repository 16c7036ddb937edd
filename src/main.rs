//! The `dvmd` command line: parse arguments, load configuration, start logging, run.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use dvmd::config::{self, Config, FileConfig, Overrides, RelaysFile};
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
// SAFETY: the symbol is jemalloc's own `malloc_conf` (`const char *`, prefixed as
// tikv-jemalloc-sys builds it); nothing else in the process defines it, and the value is a
// NUL-terminated string that lives for the whole process.
#[allow(unsafe_code)]
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &[u8; 10] = b"narenas:1\0";

#[derive(Parser)]
#[command(
    name = "dvmd",
    version,
    about = "Sell AI inference on Nostr (NIP-90) for Lightning payments"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct Files {
    /// dvmd.toml (optional: defaults apply when it does not exist).
    #[arg(long, default_value = "dvmd.toml")]
    config: PathBuf,
    /// relays.toml (required without --dev).
    #[arg(long, default_value = "relays.toml")]
    relays: PathBuf,
    /// Data directory (store and service key).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Create the data directory and the service key (mode 0600).
    Init {
        #[command(flatten)]
        files: Files,
    },
    /// Run the daemon.
    Run {
        #[command(flatten)]
        files: Files,
        /// Embedded relay, dev wallet and bundled model: no setup needed.
        #[arg(long)]
        dev: bool,
        /// Embedded relay listen address (dev mode); port 0 picks one.
        #[arg(long)]
        relay_listen: Option<String>,
        /// HTTP listen address; port 0 picks one.
        #[arg(long)]
        http_listen: Option<String>,
        /// GGUF model for the embedded backend.
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// Dev-mode helpers.
    Dev {
        #[command(subcommand)]
        command: DevCommand,
    },
    /// The operator's wallet: balance and payouts.
    Wallet {
        #[command(subcommand)]
        command: WalletCommand,
    },
    /// Customers' accounts, as the operator.
    Account {
        #[command(subcommand)]
        command: AccountCommand,
    },
    /// Customers' trust tiers (see nips/dvmd-trust.md).
    Trust {
        #[command(subcommand)]
        command: TrustCommand,
    },
    /// Ledger tools.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
    /// List jobs with their state and money (msat: quote, paid by invoice or zap, reserved from
    /// credit, held now, charged).
    Jobs {
        #[command(flatten)]
        files: Files,
    },
    /// Benchmarks that print figures.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Subcommand)]
enum DevCommand {
    /// Pay a dev-wallet invoice through a running `dvmd run --dev`.
    Pay {
        /// The BOLT11 invoice (lnbcrt...).
        bolt11: String,
        /// The daemon's HTTP URL.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        http: String,
    },
}

#[derive(Subcommand)]
enum WalletCommand {
    /// The wallet's spendable balance.
    Balance {
        #[command(flatten)]
        files: Files,
    },
    /// Pay a BOLT11 invoice or a Lightning address (name@host) from the wallet.
    Pay {
        #[command(flatten)]
        files: Files,
        /// A BOLT11 invoice, or a Lightning address.
        target: String,
        /// Amount in msat (required for an address; checked against an invoice).
        #[arg(long)]
        amount_msat: Option<u64>,
        /// Most to spend on routing fees, msat.
        #[arg(long, default_value_t = 10_000)]
        max_fee_msat: u64,
    },
}

#[derive(Subcommand)]
enum AccountCommand {
    /// Pay out from a customer's account on their behalf: through the running daemon's
    /// loopback admin endpoint, or, with the daemon stopped, on the store directly.
    Withdraw {
        #[command(flatten)]
        files: Files,
        /// Whose account: an npub (bech32 or hex) or `l402:<payment hash>`.
        #[arg(long)]
        account: String,
        /// A BOLT11 invoice with an amount...
        #[arg(long, conflicts_with = "address")]
        bolt11: Option<String>,
        /// ...or a Lightning address (name@host).
        #[arg(long, required_unless_present = "bolt11")]
        address: Option<String>,
        /// Whole sats, in msat, for an address (default: the whole balance less the most fee).
        #[arg(long, requires = "address")]
        amount_msat: Option<u64>,
    },
}

#[derive(Subcommand)]
enum TrustCommand {
    /// One npub's standing and tier, or every npub that has one: through the running daemon's
    /// loopback admin endpoint, or, with the daemon stopped, from the store.
    Show {
        #[command(flatten)]
        files: Files,
        /// An npub (bech32 or hex).
        npub: Option<String>,
    },
    /// Set an npub's tier (blocked, new, known, trusted, allowlisted), or `auto` to leave it
    /// to its payment history. The change is labelled (NIP-32) by the running daemon, or on
    /// its next start.
    Set {
        #[command(flatten)]
        files: Files,
        /// An npub (bech32 or hex).
        npub: String,
        /// The tier, or `auto`.
        tier: String,
    },
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Check the ledger invariant (stop the daemon first: the store is locked while it runs).
    Check {
        #[command(flatten)]
        files: Files,
    },
    /// List ledger entries, oldest first: all, one account's, or one job's.
    Show {
        #[command(flatten)]
        files: Files,
        /// Only this account: an npub (bech32 or hex) or `l402:<payment hash>`.
        #[arg(long, alias = "npub")]
        account: Option<String>,
        /// Only this job (hex id).
        #[arg(long)]
        job: Option<String>,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Verified + deduplicated requests per second next to raw signature verification.
    Intake {
        /// Number of requests.
        #[arg(long, default_value_t = 20_000)]
        requests: usize,
    },
    /// Request -> result over the loopback relay, instant backend: paid by invoice, paid from
    /// credit, and free, alternating.
    Roundtrip {
        /// Rounds (each one job of each kind, in sequence).
        #[arg(long, default_value_t = 2_000)]
        jobs: usize,
    },
    /// What auth and the ledger cost a /v1 call: GET /healthz beside a signed GET /v1/account
    /// and the verifier alone; chat completions paid by NIP-98, L402 and a Payment session
    /// beside the backend called directly.
    Http {
        /// Calls of each.
        #[arg(long, default_value_t = 2_000)]
        calls: usize,
    },
    /// Many customers at once: jobs/s, request -> result latency, lost jobs, and the daemon's
    /// CPU, RSS and /healthz latency (a daemon started as a child process, unless --relay).
    Load(bench::load::LoadOptions),
    /// The estimator on the shipped prompt set through the embedded model: p90 coverage on the
    /// held-out half, up-front payment against the worst case, refunds, truncation.
    Pricing {
        /// GGUF model (default: the bundled dev model).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Completion budget per job.
        #[arg(long, default_value_t = 128)]
        max_tokens: u32,
        /// Run only the first N prompts.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Embedded model throughput: prompt and generation tokens per second.
    Model {
        /// GGUF model (default: the bundled dev model).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Tokens to generate per run.
        #[arg(long, default_value_t = 128)]
        tokens: u32,
        /// Runs.
        #[arg(long, default_value_t = 3)]
        runs: u32,
        /// Also measure this upstream llama-server binary on the same model and threads.
        #[arg(long, env = "DVMD_LLAMA_SERVER")]
        llama_server: Option<PathBuf>,
    },
}

fn load(files: &Files, flags: Overrides) -> anyhow::Result<Config> {
    let file: FileConfig = config::read_toml(&files.config, false)?;
    let relays: RelaysFile = if flags.dev {
        RelaysFile::default()
    } else {
        config::read_toml(&files.relays, true)?
    };
    let flags = Overrides {
        data_dir: files.data_dir.clone().or(flags.data_dir),
        ..flags
    };
    Ok(Config::build(file, relays, flags)?)
}

/// Logs go to stderr, filtered by `DVMD_LOG` (tracing's env-filter syntax). Benchmarks default
/// to warnings only, so their figures are not buried.
/// The configuration for commands that do not talk to relays (no relays.toml needed).
fn load_offline(files: &Files) -> anyhow::Result<Config> {
    load(
        files,
        Overrides {
            dev: true,
            ..Overrides::default()
        },
    )
}

/// Call the running daemon's admin endpoint `path` (GET, or POST with `body`). `None` when no
/// daemon answers (it is stopped: the store is the caller's).
async fn admin_call(
    config: &Config,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<Option<serde_json::Value>> {
    let read = |name: &str| std::fs::read_to_string(config.data_dir.join(name));
    let (Ok(url), Ok(token)) = (
        read(dvmd::identity::ADMIN_URL_FILE),
        read(dvmd::identity::ADMIN_TOKEN_FILE),
    ) else {
        return Ok(None);
    };
    let client = reqwest::Client::new();
    let url = format!("{}{path}", url.trim());
    let request = match body {
        Some(body) => client.post(url).json(&body),
        None => client.get(url),
    };
    match request.bearer_auth(token.trim()).send().await {
        Ok(response) => {
            let status = response.status();
            let answer: serde_json::Value = response.json().await?;
            if !status.is_success() {
                anyhow::bail!(
                    "the daemon refused ({status}): {}",
                    answer["error"]["message"]
                );
            }
            Ok(Some(answer))
        }
        // Nobody listens: the daemon is stopped, so the store is ours.
        Err(e) if e.is_connect() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// `dvmd account withdraw`: through the running daemon's admin endpoint when it answers, else
/// (the daemon stopped) on the store and the configured wallet directly.
async fn withdraw_as_operator(
    files: &Files,
    asked: dvmd::http::withdraw::Withdraw,
) -> anyhow::Result<serde_json::Value> {
    let config = load_offline(files)?;
    let body = serde_json::json!({
        "account": asked.account,
        "bolt11": asked.bolt11,
        "lightning_address": asked.lightning_address,
        "amount_msat": asked.amount_msat,
    });
    if let Some(answer) = admin_call(&config, "/admin/withdraw", Some(body)).await? {
        return Ok(answer);
    }
    let account = asked
        .account
        .as_deref()
        .unwrap_or_default()
        .parse::<dvmd::ledger::Account>()
        .map_err(|e| anyhow::anyhow!(e))?;
    let target = asked.target().map_err(|e| anyhow::anyhow!(e))?;
    let store = Store::open(&config.data_dir.join("store"))?;
    let (wallet, _) = wallet::open(&config.wallet, &store).await?;
    let payer = dvmd::job::payouts::Payer {
        book: Book::new(store.clone()),
        wallet,
        fee: config.jobs.payout_fee,
        allow_loopback_http: config.jobs.payout_lnurl_allow_loopback_http,
    };
    let payout = payer.pay_out(account, target).await?;
    store.close().await?;
    Ok(dvmd::http::withdraw::view(&payout))
}

/// `dvmd trust show|set`: through the running daemon's admin endpoint when it answers, else on
/// the store (a change is labelled when the daemon next starts).
async fn trust(command: TrustCommand) -> anyhow::Result<serde_json::Value> {
    use dvmd::trust::{Tier, Trust};
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let parse = |text: &str| {
        nostr_sdk::PublicKey::parse(text.trim())
            .map_err(|e| anyhow::anyhow!("`{text}` is not an npub or hex pubkey: {e}"))
    };
    match command {
        TrustCommand::Show { files, npub } => {
            let config = load_offline(&files)?;
            let path = match &npub {
                Some(npub) => format!("/admin/trust?npub={}", parse(npub)?.to_hex()),
                None => "/admin/trust".to_owned(),
            };
            if let Some(answer) = admin_call(&config, &path, None).await? {
                return Ok(answer);
            }
            let store = Store::open(&config.data_dir.join("store"))?;
            let trust = Trust::load(store.clone(), config.jobs.trust, now).await?;
            let views: Vec<serde_json::Value> = match npub {
                Some(npub) => {
                    let npub = parse(&npub)?;
                    let standing = trust.standing(&npub).await?;
                    let tier = standing.tier(&config.jobs.trust.thresholds, now);
                    vec![dvmd::http::admin::standing_view(&npub, &standing, tier)]
                }
                None => trust
                    .all(now)
                    .await?
                    .iter()
                    .map(|(npub, standing, tier)| {
                        dvmd::http::admin::standing_view(npub, standing, *tier)
                    })
                    .collect(),
            };
            store.close().await?;
            Ok(serde_json::json!({ "object": "list", "data": views }))
        }
        TrustCommand::Set { files, npub, tier } => {
            let config = load_offline(&files)?;
            let npub = parse(&npub)?;
            let setting = match tier.as_str() {
                "auto" => None,
                tier => Some(tier.parse::<Tier>().map_err(|e| anyhow::anyhow!(e))?),
            };
            let body = serde_json::json!({ "npub": npub.to_hex(), "tier": tier });
            if let Some(answer) = admin_call(&config, "/admin/trust", Some(body)).await? {
                return Ok(answer);
            }
            let store = Store::open(&config.data_dir.join("store"))?;
            let trust = Trust::load(store.clone(), config.jobs.trust, now).await?;
            let (standing, _) = trust.set(&npub, setting, now).await?;
            let tier = standing.tier(&config.jobs.trust.thresholds, now);
            store.close().await?;
            Ok(dvmd::http::admin::standing_view(&npub, &standing, tier))
        }
    }
}

/// The store of a stopped daemon, for the offline tools.
fn open_store(files: &Files) -> anyhow::Result<Store> {
    let config = load_offline(files)?;
    Ok(Store::open(&config.data_dir.join("store"))?)
}

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
    /// `MALLOC_CONF` reaches jemalloc (a misspelt symbol would be ignored without a word).
    #[test]
    fn the_allocator_runs_one_arena() {
        if std::env::var_os("_RJEM_MALLOC_CONF").is_some() {
            return; // the operator's setting wins, as documented
        }
        let arenas = tikv_jemalloc_ctl::opt::narenas::read().expect("opt.narenas");
        assert_eq!(arenas, 1);
    }
}
