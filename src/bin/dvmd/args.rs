//! The command line's arguments and subcommands (clap).

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use dvmd::bench;

#[derive(Parser)]
#[command(
    name = "dvmd",
    version,
    about = "Sell AI inference on Nostr (NIP-90) for Lightning payments"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(clap::Args, Clone)]
pub(crate) struct Files {
    /// dvmd.toml (optional: defaults apply when it does not exist).
    #[arg(long, default_value = "dvmd.toml")]
    pub(crate) config: PathBuf,
    /// relays.toml (required without --dev).
    #[arg(long, default_value = "relays.toml")]
    pub(crate) relays: PathBuf,
    /// Data directory (store and service key).
    #[arg(long)]
    pub(crate) data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
pub(crate) enum DevCommand {
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
pub(crate) enum WalletCommand {
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
pub(crate) enum AccountCommand {
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
    /// Settle a payout that stays pending by hand, once the wallet's own operator said what
    /// became of it: for a wallet that cannot (an NWC service that finds no payment to the
    /// hash), a pending payout is counted stuck (`dvmd_payouts_stuck`) and never settled by
    /// dvmd. `failed` gives the amount and its most fee back to the customer; `paid` books it
    /// sent. Stop the daemon first: the store is locked while it runs.
    SettlePayout {
        #[command(flatten)]
        files: Files,
        /// The payout's payment hash (hex), as the log and `dvmd ledger show` name it.
        #[arg(long)]
        payment_hash: String,
        /// What became of it.
        #[arg(value_enum)]
        outcome: PayoutOutcome,
        /// For `paid`: the routing fee the wallet spent, msat (the customer pays at most the
        /// payout's most fee).
        #[arg(long, default_value_t = 0)]
        fee_msat: u64,
    },
}

/// What became of a payout, as the wallet's operator says.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub(crate) enum PayoutOutcome {
    /// Nothing was sent, and nothing can be any more.
    Failed,
    /// It arrived.
    Paid,
}

#[derive(Subcommand)]
pub(crate) enum TrustCommand {
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
pub(crate) enum LedgerCommand {
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
pub(crate) enum BenchCommand {
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
