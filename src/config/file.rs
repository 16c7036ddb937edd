//! The schema of `dvmd.toml` and `relays.toml` as written: every key optional, with its
//! default. [`super::Config::build`] validates it into a `Config`.

use std::path::PathBuf;

use serde::Deserialize;

use super::{DEFAULT_HTTP_LISTEN, DEFAULT_RELAY_LISTEN};
use crate::nip90::KIND_TEXT_GENERATION;
use crate::pricing::RateCard;

/// `dvmd.toml` as written (every key optional).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// `[service]`
    pub service: ServiceSection,
    /// `[pricing]`
    pub pricing: PricingSection,
    /// `[text_generation]`
    pub text_generation: TextGenerationSection,
    /// `[infer]`
    pub infer: InferSection,
    /// `[wallet]`
    pub wallet: WalletSection,
    /// `[http]`
    pub http: HttpSection,
    /// `[embedded_relay]`
    pub embedded_relay: EmbeddedRelaySection,
    /// `[lnurl]`
    pub lnurl: LnurlSection,
    /// `[zaps]`
    pub zaps: ZapsSection,
    /// `[store]`
    pub store: StoreSection,
    /// `[trust]`
    pub trust: TrustSection,
    /// `[reply_relays]`
    pub reply_relays: ReplyRelaysSection,
}

/// `[reply_relays]`: which relays named in requests (their `relays` tag) dvmd connects to.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplyRelaysSection {
    /// Also reach private, loopback and link-local addresses (default false: only public
    /// addresses, checked on the address dialed).
    pub allow_private: bool,
    /// Hosts reached whatever their addresses (a domain covers its subdomains).
    pub allow: Vec<String>,
    /// Hosts never reached.
    pub deny: Vec<String>,
}

/// `[trust]`: tiers per npub (see `nips/dvmd-trust.md`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrustSection {
    /// `known`: msat paid (charged for settled jobs), at least.
    pub known_min_paid_msat: u64,
    /// `known`: paid jobs settled, at least.
    pub known_min_jobs: u64,
    /// `trusted`: msat paid, at least.
    pub trusted_min_paid_msat: u64,
    /// `trusted`: paid jobs settled, at least.
    pub trusted_min_jobs: u64,
    /// `trusted`: days since the first payment, at least.
    pub trusted_min_age_days: u64,
    /// What a `trusted` npub may owe at once for jobs run before they are paid (pay-after, for
    /// requests that name this service); 0 turns pay-after off.
    pub trusted_credit_msat: u64,
    /// Seconds a pay-after debt may stay unpaid; past it the npub is `new` until it pays.
    pub debt_deadline_secs: u64,
    /// NIP-13 proof of work (leading zero bits of the request id) a `new` npub's job request
    /// must carry; 0 asks none.
    pub new_min_pow: u8,
    /// Job requests all `new` npubs together may post a minute (burst and refill).
    pub new_requests_per_minute: u32,
    /// Unpaid invoices the whole service may hold when a `new` npub asks for one (at most
    /// `[service] max_open_invoices`; the rest is kept for npubs that have paid).
    pub new_max_open_invoices: u32,
    /// Publish a NIP-32 label (kind 1985) when an npub's tier changes.
    pub publish_labels: bool,
    /// Publish a NIP-32 label of each relay job's outcome (paid, unpaid, delivered, refunded,
    /// failed).
    pub publish_job_labels: bool,
    /// Allowlisted npubs' jobs run free (on both doors).
    pub allowlisted_free: bool,
}

impl Default for TrustSection {
    fn default() -> Self {
        let thresholds = crate::trust::Thresholds::default();
        let policy = crate::trust::TrustPolicy::default();
        Self {
            known_min_paid_msat: thresholds.known_paid_msat,
            known_min_jobs: thresholds.known_jobs,
            trusted_min_paid_msat: thresholds.trusted_paid_msat,
            trusted_min_jobs: thresholds.trusted_jobs,
            trusted_min_age_days: thresholds.trusted_age_secs / (24 * 60 * 60),
            trusted_credit_msat: policy.trusted_credit_msat,
            debt_deadline_secs: thresholds.debt_deadline_secs,
            new_min_pow: policy.new_min_pow,
            new_requests_per_minute: policy.new_requests_per_minute,
            new_max_open_invoices: policy.new_max_open_invoices,
            publish_labels: policy.publish_labels,
            publish_job_labels: policy.publish_job_labels,
            allowlisted_free: policy.allowlisted_free,
        }
    }
}

/// `[store]`: the sled database in the data directory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// sled's page cache, MiB (sled's own default is 1 GiB).
    pub cache_capacity_mib: u64,
    /// Hours after they ended that jobs which ended without money are removed (0: never).
    pub prune_unpaid_after_hours: u64,
}

impl Default for StoreSection {
    fn default() -> Self {
        Self {
            cache_capacity_mib: crate::store::DEFAULT_CACHE_CAPACITY_BYTES / (1024 * 1024),
            prune_unpaid_after_hours: 24,
        }
    }
}

/// `[zaps]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ZapsSection {
    /// Hex `nostrPubkey` of an external Lightning address provider whose receipts pay jobs.
    pub provider_pubkey: Option<String>,
}

/// `[lnurl]`: the Lightning address (LNURL-pay with NIP-57 zaps) served on the HTTP listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LnurlSection {
    /// Serve `/.well-known/lnurlp/<username>`.
    pub enabled: bool,
    /// The name before `@`.
    pub username: String,
    /// The base URL payers reach the HTTP listener at; default `http://<http listen address>`.
    pub public_url: Option<String>,
    /// Smallest payment, msat.
    pub min_sendable_msat: u64,
    /// Largest payment, msat.
    pub max_sendable_msat: u64,
    /// Invoices the callback issues per minute at most (a token bucket that also allows a
    /// burst of this many). The callback is public, and each call costs a wallet invoice.
    pub max_invoices_per_minute: u32,
}

impl Default for LnurlSection {
    fn default() -> Self {
        Self {
            enabled: true,
            username: "dvmd".to_owned(),
            public_url: None,
            min_sendable_msat: 1_000,
            max_sendable_msat: 1_000_000_000,
            max_invoices_per_minute: 600,
        }
    }
}

/// `[service]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceSection {
    /// Name shown in the NIP-89 announcement.
    pub name: String,
    /// Description shown in the NIP-89 announcement.
    pub about: String,
    /// Where the store and key live.
    pub data_dir: Option<PathBuf>,
    /// Request kinds served.
    pub kinds: Vec<u16>,
    /// Requests dated further than this from now, before or after, are ignored.
    pub max_request_age_secs: u64,
    /// Job requests one npub may post a minute (in a burst, refilled at this rate); more are
    /// dropped before anything is stored, quoted or invoiced.
    pub requests_per_npub_per_minute: u32,
    /// Invoices one npub may leave unpaid at once; a job request beyond that gets an `error`
    /// feedback, and no invoice (no wallet call).
    pub max_open_invoices_per_npub: u32,
    /// Invoices all customers together may leave unpaid at once (each costs reconciler
    /// lookups); a job request beyond gets an `error` and no wallet call.
    pub max_open_invoices: u32,
    /// Largest request event, bytes of JSON.
    pub max_request_bytes: usize,
    /// Largest result event dvmd will have to publish, bytes of JSON (relays refuse larger
    /// events; strfry's default is 64 KiB). A request whose result could exceed it (the
    /// request it embeds, plus `max_tokens` x 4 bytes, plus tags) is refused before payment.
    pub max_result_bytes: usize,
    /// A relay that answers `OK false` to a result this many times is given up for it; when
    /// every write relay is given up, the job fails and the payment is credited. Unreachable
    /// relays are retried with backoff instead.
    pub result_refusals: u32,
    /// Concurrent jobs on the model.
    pub workers: usize,
    /// Longest a job may run.
    pub job_timeout_secs: u64,
}

impl Default for ServiceSection {
    fn default() -> Self {
        Self {
            name: "dvmd".to_owned(),
            about: "Text generation (NIP-90 kind 5050), paid over Lightning.".to_owned(),
            data_dir: None,
            kinds: vec![KIND_TEXT_GENERATION],
            max_request_age_secs: 600,
            requests_per_npub_per_minute: 120,
            max_open_invoices_per_npub: 20,
            max_open_invoices: 2_000,
            max_request_bytes: 64 * 1024,
            max_result_bytes: 64 * 1024,
            result_refusals: 3,
            workers: 1,
            job_timeout_secs: 300,
        }
    }
}

/// `[pricing]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PricingSection {
    /// Flat fee per job, msat.
    pub base_fee_msat: u64,
    /// Per 1000 prompt tokens, msat.
    pub prompt_msat_per_1k_tokens: u64,
    /// Per 1000 completion tokens, msat.
    pub completion_msat_per_1k_tokens: u64,
    /// Invoice lifetime.
    pub invoice_expiry_secs: u64,
    /// How long a relay job that reached what it was paid for before it was done waits for the
    /// customer to pay for the rest (its `partial` feedback carries the text so far, its
    /// `payment-required` the invoice, which expires then). Unpaid by then (the next reconcile
    /// pass finds it so), the text so far is the result, charged as generated. 0: never ask; such a job ends at its budget at once (`finish` `budget`).
    pub continuation_wait_secs: u64,
    /// Derive the token rates from the hardware instead: what the machine costs per hour,
    /// msat (margin included). Set, the daemon measures seconds per prompt and completion token
    /// on its backend at start and prices each token at its share of the hour; the two
    /// `*_per_1k_tokens` keys are then ignored.
    pub hardware_cost_msat_per_hour: Option<u64>,
}

impl Default for PricingSection {
    fn default() -> Self {
        let card = RateCard::default();
        Self {
            base_fee_msat: card.base_fee_msat,
            prompt_msat_per_1k_tokens: card.prompt_msat_per_1k_tokens,
            completion_msat_per_1k_tokens: card.completion_msat_per_1k_tokens,
            invoice_expiry_secs: 600,
            continuation_wait_secs: 300,
            hardware_cost_msat_per_hour: None,
        }
    }
}

/// `[text_generation]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TextGenerationSection {
    /// `max_tokens` when a request does not say.
    pub default_max_tokens: u32,
    /// Largest `max_tokens` accepted.
    pub max_tokens_limit: u32,
    /// Largest prompt, bytes.
    pub max_prompt_bytes: usize,
}

impl Default for TextGenerationSection {
    fn default() -> Self {
        Self {
            default_max_tokens: 256,
            max_tokens_limit: 1024,
            max_prompt_bytes: 16 * 1024,
        }
    }
}

/// `[infer]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferSection {
    /// `llama` (embedded) or `openai`.
    pub backend: String,
    /// `[infer.llama]`
    pub llama: LlamaSection,
    /// `[infer.openai]`
    pub openai: OpenAiSection,
}

impl Default for InferSection {
    fn default() -> Self {
        Self {
            backend: "llama".to_owned(),
            llama: LlamaSection::default(),
            openai: OpenAiSection::default(),
        }
    }
}

/// `[infer.llama]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LlamaSection {
    /// GGUF file; default: the bundled dev model in the cache.
    pub model_path: Option<PathBuf>,
    /// CPU threads; default: cores - 1.
    pub threads: Option<u32>,
    /// Context window in tokens.
    pub context_tokens: u32,
}

impl Default for LlamaSection {
    fn default() -> Self {
        Self {
            model_path: None,
            threads: None,
            context_tokens: 2048,
        }
    }
}

/// `[infer.openai]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenAiSection {
    /// Base URL including `/v1`.
    pub base_url: String,
    /// Model name.
    pub model: String,
    /// Environment variable holding the API key.
    pub api_key_env: Option<String>,
    /// File holding the API key.
    pub api_key_file: Option<PathBuf>,
    /// Longest one request may take.
    pub timeout_secs: u64,
    /// The server's context window in tokens (prompt plus completion), as it was started
    /// (`llama-server -c`, Ollama `num_ctx`, vLLM `--max-model-len`). A prompt plus
    /// `max_tokens` that cannot fit is refused before payment.
    pub context_tokens: u32,
}

impl Default for OpenAiSection {
    fn default() -> Self {
        Self {
            base_url: "http://127.0.0.1:11434/v1".to_owned(),
            model: "default".to_owned(),
            api_key_env: None,
            api_key_file: None,
            timeout_secs: 300,
            context_tokens: 4096,
        }
    }
}

/// `[wallet]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WalletSection {
    /// `dev` (embedded, simulated settlement) or `lnbits`.
    pub backend: String,
    /// How often open invoices are looked up.
    pub reconcile_interval_secs: u64,
    /// How long after its expiry an invoice the wallet still calls pending or unknown keeps
    /// its job waiting; then the job expires (the payment hash is still looked up).
    pub unpaid_grace_secs: u64,
    /// For how many days after expiry an unpaid invoice is still looked up (at most once a day
    /// once its job expired), so a late payment is credited; then a "not paid" answer closes it.
    pub late_lookup_days: u64,
    /// The most routing fee a payout may cost: this much...
    pub payout_max_fee_base_msat: u64,
    /// ...plus this many parts per million of the amount. Held from the balance with the
    /// amount while the payout is in flight; what is not used goes back.
    pub payout_max_fee_ppm: u64,
    /// Let a withdrawal to a Lightning address fetch from a loopback host over plain HTTP.
    /// For tests only: customer-named hosts are otherwise HTTPS on public addresses only.
    pub payout_lnurl_allow_loopback_http: bool,
    /// Automatic payouts (opted in per npub): days without a ledger entry before change and
    /// refunds go home to the profile's `lud16`.
    pub auto_payout_idle_days: u64,
    /// The least an automatic payout sends, msat (default: 200 times
    /// `payout_max_fee_base_msat`, so the flat fee is at most 0.5% of it).
    pub auto_payout_min_msat: Option<u64>,
    /// Credit on an account with no ledger entry for this many days lapses to the operator,
    /// recorded as an `expiry` entry. Unset (the default): credit never expires.
    pub credit_expiry_days: Option<u64>,
    /// `[wallet.lnbits]`
    pub lnbits: LnbitsSection,
    /// `[wallet.nwc]`
    pub nwc: NwcSection,
}

/// `[wallet.nwc]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NwcSection {
    /// Environment variable holding the `nostr+walletconnect://` URI.
    pub uri_env: Option<String>,
    /// File holding the URI.
    pub uri_file: Option<PathBuf>,
    /// How long one request may wait for the wallet service.
    pub timeout_secs: u64,
}

impl Default for NwcSection {
    fn default() -> Self {
        Self {
            uri_env: Some("NWC_URI".to_owned()),
            uri_file: None,
            timeout_secs: 30,
        }
    }
}

impl Default for WalletSection {
    fn default() -> Self {
        Self {
            backend: "dev".to_owned(),
            reconcile_interval_secs: 30,
            unpaid_grace_secs: 24 * 60 * 60,
            late_lookup_days: 30,
            payout_max_fee_base_msat: 10_000,
            payout_max_fee_ppm: 5_000,
            payout_lnurl_allow_loopback_http: false,
            auto_payout_idle_days: 7,
            auto_payout_min_msat: None,
            credit_expiry_days: None,
            lnbits: LnbitsSection::default(),
            nwc: NwcSection::default(),
        }
    }
}

/// `[wallet.lnbits]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LnbitsSection {
    /// Base URL of the LNbits instance.
    pub url: String,
    /// Environment variable holding the invoice (read) key.
    pub invoice_key_env: Option<String>,
    /// File holding the invoice key.
    pub invoice_key_file: Option<PathBuf>,
    /// Environment variable holding the admin key (payouts only).
    pub admin_key_env: Option<String>,
    /// File holding the admin key.
    pub admin_key_file: Option<PathBuf>,
    /// URL LNbits posts invoice webhooks to (dvmd's `/hooks/wallet`), if LNbits can reach it.
    /// dvmd adds the webhook key (`?key=...`, [`crate::identity::webhook_key`]) to it.
    pub webhook_url: Option<String>,
    /// Follow the LNbits websocket for settlement hints.
    pub websocket: bool,
}

impl Default for LnbitsSection {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:5000".to_owned(),
            invoice_key_env: Some("LNBITS_INVOICE_KEY".to_owned()),
            invoice_key_file: None,
            admin_key_env: None,
            admin_key_file: None,
            webhook_url: None,
            websocket: true,
        }
    }
}

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    /// Listen address.
    pub listen: String,
    /// The URL the public reaches this listener at (behind a reverse proxy, its address):
    /// NIP-98 events must name it in their `u` tag. Default: `http://<listen address>`.
    pub public_url: Option<String>,
    /// NIP-98: how far an auth event's `created_at` may be from now, seconds.
    pub auth_window_secs: u64,
    /// NIP-98: auth event ids remembered against replay. When this many are live, signed
    /// requests are refused (429) rather than forget one that could still be replayed; one
    /// client address may hold an eighth of them.
    pub auth_replay_capacity: usize,
    /// The largest request body read on `/v1/*`, bytes; larger ones get 413.
    pub max_body_bytes: usize,
    /// Longest a `/v1` request body may take to arrive, seconds; a slower one gets 408.
    pub body_timeout_secs: u64,
    /// The largest top-up one invoice may ask for, msat.
    pub max_topup_msat: u64,
    /// Top-up invoices issued per minute at most, for everyone together (each costs a wallet
    /// invoice and a stored record); over it, 429 with `Retry-After`.
    pub max_topups_per_minute: u32,
    /// Top-up invoices per minute for one client address (read through `trusted_proxies`),
    /// within `max_topups_per_minute`; over it, 429.
    pub max_topups_per_ip_per_minute: u32,
    /// L402 challenges (402 with an invoice and a macaroon) issued per minute at most, for
    /// everyone together; over it, 429 with `Retry-After`.
    pub max_challenges_per_minute: u32,
    /// L402 challenges per minute for one client address; over it, 429 with `Retry-After`.
    pub max_challenges_per_ip_per_minute: u32,
    /// How long an L402 token may be used after it is issued, seconds (its `dvmd_valid_until`
    /// caveat).
    pub l402_token_lifetime_secs: u64,
    /// HTTP `Payment` sessions: an open session with no call, top-up or close for this long is
    /// closed by the service and its rest refunded, seconds (the challenge's `idleTimeout`).
    pub session_idle_secs: u64,
    /// HTTP `Payment` sessions: how long a stream that ran dry waits for a top-up before it
    /// ends (`session-timeout`) with what it said, seconds; the stream holds its worker.
    pub session_topup_wait_secs: u64,
    /// Reverse proxies (IP addresses) whose `X-Forwarded-For` names the client, and whose
    /// `X-Forwarded-Proto` and `X-Forwarded-Host` name the public URL NIP-98 events must sign
    /// when `public_url` is not set. From anyone else these headers are ignored.
    pub trusted_proxies: Vec<String>,
    /// Origins whose pages may call `/v1` from a browser (CORS): `https://app.example`, or
    /// `*` for any. Empty: no CORS headers (browsers then refuse cross-origin calls).
    pub cors_origins: Vec<String>,
    /// Connections the listener serves at once; more wait in the kernel's backlog. Keep it
    /// well under the process's open-file limit (`ulimit -n`), which relay, wallet and store
    /// sockets and files share.
    pub max_connections: usize,
    /// Connections at once from one client address (`trusted_proxies`, `127.0.0.1` and `::1`
    /// excepted); more are closed as they arrive.
    pub max_connections_per_ip: usize,
    /// How long a request's headers may take to arrive (a new connection's from its start, a
    /// kept-alive one's from the answer before), seconds.
    pub header_timeout_secs: u64,
}

impl Default for HttpSection {
    fn default() -> Self {
        Self {
            listen: DEFAULT_HTTP_LISTEN.to_owned(),
            public_url: None,
            auth_window_secs: 60,
            auth_replay_capacity: 100_000,
            max_body_bytes: 1024 * 1024,
            body_timeout_secs: 30,
            max_topup_msat: 100_000_000,
            max_topups_per_minute: 60,
            max_topups_per_ip_per_minute: 10,
            max_challenges_per_minute: 600,
            max_challenges_per_ip_per_minute: 30,
            l402_token_lifetime_secs: 30 * 24 * 3600,
            session_idle_secs: 300,
            session_topup_wait_secs: 60,
            trusted_proxies: Vec::new(),
            cors_origins: Vec::new(),
            max_connections: 512,
            max_connections_per_ip: 32,
            header_timeout_secs: 30,
        }
    }
}

/// `[embedded_relay]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedRelaySection {
    /// Listen address of the in-process relay (dev mode).
    pub listen: String,
    /// Events it keeps in memory (the oldest go first).
    pub max_events: usize,
    /// Largest event it accepts, bytes of JSON; larger ones get `OK false`.
    pub max_event_bytes: usize,
}

impl Default for EmbeddedRelaySection {
    fn default() -> Self {
        let relay = crate::relay::EmbeddedRelayOptions::default();
        Self {
            listen: DEFAULT_RELAY_LISTEN.to_owned(),
            max_events: relay.max_events,
            max_event_bytes: relay.max_event_bytes,
        }
    }
}

/// `relays.toml`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelaysFile {
    /// `[[relay]]` entries.
    #[serde(default)]
    pub relay: Vec<RelayEntry>,
}

/// One `[[relay]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayEntry {
    /// ws:// or wss:// URL.
    pub url: String,
    /// Read requests from it (default true).
    #[serde(default = "yes")]
    pub read: bool,
    /// Publish to it (default true).
    #[serde(default = "yes")]
    pub write: bool,
}

fn yes() -> bool {
    true
}
