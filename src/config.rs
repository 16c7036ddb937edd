//! Configuration: defaults, then `dvmd.toml`, then environment, then flags, validated once
//! into [`Config`]. `relays.toml` lists the relays and their roles. Every key is documented in
//! `dvmd.example.toml`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::job::JobConfig;
use crate::nip90::{TextGenerationLimits, KIND_TEXT_GENERATION};
use crate::pricing::RateCard;
use crate::relay::RelayRole;
use crate::wallet::lnbits::LnbitsConfig;
use crate::wallet::nwc::NwcConfig;
use crate::wallet::secret::Secret;

/// Default HTTP listener.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:8080";
/// Default embedded relay listener (dev mode).
pub const DEFAULT_RELAY_LISTEN: &str = "127.0.0.1:7777";
/// The bundled dev model's file name, under the cache's `models/`.
pub const DEV_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Errors of configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file is not valid TOML for its schema.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (line and key included).
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

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
}

/// `[store]`: the sled database in the data directory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// sled's page cache, MiB (sled's own default is 1 GiB).
    pub cache_capacity_mib: u64,
}

impl Default for StoreSection {
    fn default() -> Self {
        Self {
            cache_capacity_mib: crate::store::DEFAULT_CACHE_CAPACITY_BYTES / (1024 * 1024),
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
    /// Requests older than this are ignored.
    pub max_request_age_secs: u64,
    /// Largest request event, bytes of JSON.
    pub max_request_bytes: usize,
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
            max_request_bytes: 64 * 1024,
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
}

impl Default for PricingSection {
    fn default() -> Self {
        let card = RateCard::default();
        Self {
            base_fee_msat: card.base_fee_msat,
            prompt_msat_per_1k_tokens: card.prompt_msat_per_1k_tokens,
            completion_msat_per_1k_tokens: card.completion_msat_per_1k_tokens,
            invoice_expiry_secs: 600,
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
}

impl Default for OpenAiSection {
    fn default() -> Self {
        Self {
            base_url: "http://127.0.0.1:11434/v1".to_owned(),
            model: "default".to_owned(),
            api_key_env: None,
            api_key_file: None,
            timeout_secs: 300,
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

/// A secret from a file (preferred when both are set) or an environment variable.
fn secret(
    what: &str,
    env: &Option<String>,
    file: &Option<PathBuf>,
) -> Result<Option<Secret>, ConfigError> {
    let invalid = |why: String| ConfigError::Invalid(format!("{what}: {why}"));
    match (file, env) {
        (Some(path), _) => Secret::from_file(path).map(Some).map_err(invalid),
        (None, Some(var)) => Secret::from_env(var).map(Some).map_err(invalid),
        (None, None) => Ok(None),
    }
}

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    /// Listen address.
    pub listen: String,
}

impl Default for HttpSection {
    fn default() -> Self {
        Self {
            listen: DEFAULT_HTTP_LISTEN.to_owned(),
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
}

impl Default for EmbeddedRelaySection {
    fn default() -> Self {
        Self {
            listen: DEFAULT_RELAY_LISTEN.to_owned(),
            max_events: crate::relay::EmbeddedRelayOptions::default().max_events,
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

/// Which inference backend to build.
#[derive(Debug, Clone)]
pub enum BackendChoice {
    /// Embedded llama.cpp.
    Llama {
        /// GGUF path.
        model_path: PathBuf,
        /// Threads.
        threads: Option<u32>,
        /// Context tokens.
        context_tokens: u32,
    },
    /// An OpenAI-compatible server.
    OpenAi(crate::infer::openai::OpenAiConfig),
}

/// Which wallet to build.
#[derive(Debug, Clone)]
pub enum WalletChoice {
    /// The embedded dev wallet.
    Dev,
    /// An LNbits wallet.
    Lnbits(LnbitsConfig),
    /// A Nostr Wallet Connect service.
    Nwc(NwcConfig),
}

/// The validated configuration the daemon runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Data directory (store, key).
    pub data_dir: PathBuf,
    /// Dev mode: embedded relay, dev wallet, `/dev/pay`.
    pub dev: bool,
    /// Relays to use (ignored in dev mode, which uses the embedded relay).
    pub relays: Vec<RelayRole>,
    /// Embedded relay listener (dev mode).
    pub relay_listen: SocketAddr,
    /// Embedded relay limits (dev mode).
    pub embedded_relay: crate::relay::EmbeddedRelayOptions,
    /// HTTP listener.
    pub http_listen: SocketAddr,
    /// Pipeline settings.
    pub jobs: JobConfig,
    /// Inference backend.
    pub backend: BackendChoice,
    /// Wallet backend.
    pub wallet: WalletChoice,
    /// Name and description for the NIP-89 announcement.
    pub profile: (String, String),
    /// The Lightning address, if served.
    pub lnurl: Option<LnurlSection>,
    /// How the store is opened.
    pub store: crate::store::StoreOptions,
}

/// Overrides from the command line (flags win over everything).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--dev`
    pub dev: bool,
    /// `--data-dir`
    pub data_dir: Option<PathBuf>,
    /// `--relay-listen`
    pub relay_listen: Option<String>,
    /// `--http-listen`
    pub http_listen: Option<String>,
    /// `--model`
    pub model_path: Option<PathBuf>,
}

/// The cache directory for models and test tools: `$DVMD_CACHE`, else `$XDG_CACHE_HOME/dvmd`,
/// else `~/.cache/dvmd`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("DVMD_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("dvmd");
    }
    home().join(".cache").join("dvmd")
}

/// The default data directory: `$XDG_DATA_HOME/dvmd`, else `~/.local/share/dvmd`.
pub fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(dir).join("dvmd");
    }
    home().join(".local").join("share").join("dvmd")
}

/// The bundled dev model: `$DVMD_MODEL`, else `<cache>/models/SmolLM2-135M-Instruct.Q4_1.gguf`.
pub fn dev_model_path() -> PathBuf {
    std::env::var_os("DVMD_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("models").join(DEV_MODEL_FILE))
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Read a TOML file into `T`; a missing optional file gives the defaults.
pub fn read_toml<T: for<'de> Deserialize<'de> + Default>(
    path: &Path,
    required: bool,
) -> Result<T, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok(T::default()),
        Err(source) => Err(ConfigError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

impl Config {
    /// Validate `file` + `relays` + environment + `flags` into a [`Config`].
    pub fn build(
        file: FileConfig,
        relays: RelaysFile,
        flags: Overrides,
    ) -> Result<Self, ConfigError> {
        let invalid = |msg: String| ConfigError::Invalid(msg);
        let service = &file.service;
        if service.kinds.is_empty() {
            return Err(invalid("service.kinds is empty".into()));
        }
        if let Some(kind) = service.kinds.iter().find(|k| **k != KIND_TEXT_GENERATION) {
            return Err(invalid(format!(
                "service.kinds: kind {kind} is not supported yet (only 5050, text generation)"
            )));
        }
        if service.workers == 0 || service.workers > 64 {
            return Err(invalid("service.workers must be 1..=64".into()));
        }
        if file.embedded_relay.max_events == 0 {
            return Err(invalid(
                "embedded_relay.max_events must be at least 1".into(),
            ));
        }
        if !(8..=1024 * 1024).contains(&file.store.cache_capacity_mib) {
            return Err(invalid(
                "store.cache_capacity_mib must be between 8 and 1048576".into(),
            ));
        }
        let tg = &file.text_generation;
        if tg.default_max_tokens == 0 || tg.default_max_tokens > tg.max_tokens_limit {
            return Err(invalid(
                "text_generation.default_max_tokens must be 1..=max_tokens_limit".into(),
            ));
        }
        if file.lnurl.min_sendable_msat == 0
            || file.lnurl.min_sendable_msat > file.lnurl.max_sendable_msat
        {
            return Err(invalid(
                "lnurl: need 0 < min_sendable_msat <= max_sendable_msat".into(),
            ));
        }
        if file.lnurl.max_invoices_per_minute == 0 {
            return Err(invalid(
                "lnurl.max_invoices_per_minute must be at least 1".into(),
            ));
        }
        if file.pricing.invoice_expiry_secs < 60 {
            return Err(invalid(
                "pricing.invoice_expiry_secs must be at least 60".into(),
            ));
        }

        let data_dir = flags
            .data_dir
            .or_else(|| std::env::var_os("DVMD_DATA_DIR").map(PathBuf::from))
            .or(service.data_dir.clone())
            .unwrap_or_else(default_data_dir);
        let parse_addr = |what: &str, raw: &str| -> Result<SocketAddr, ConfigError> {
            raw.parse().map_err(|_| {
                invalid(format!(
                    "{what}: `{raw}` is not an address like 127.0.0.1:8080"
                ))
            })
        };
        let http_listen = parse_addr(
            "http listen",
            flags.http_listen.as_deref().unwrap_or(&file.http.listen),
        )?;
        let relay_listen = parse_addr(
            "relay listen",
            flags
                .relay_listen
                .as_deref()
                .unwrap_or(&file.embedded_relay.listen),
        )?;

        let mut roles = Vec::new();
        for entry in relays.relay {
            if !(entry.url.starts_with("ws://") || entry.url.starts_with("wss://")) {
                return Err(invalid(format!(
                    "relays.toml: `{}` is not a ws(s) URL",
                    entry.url
                )));
            }
            if !entry.read && !entry.write {
                return Err(invalid(format!(
                    "relays.toml: `{}` is neither read nor write",
                    entry.url
                )));
            }
            roles.push(RelayRole {
                url: entry.url,
                read: entry.read,
                write: entry.write,
            });
        }
        if !flags.dev && (!roles.iter().any(|r| r.read) || !roles.iter().any(|r| r.write)) {
            return Err(invalid(
                "relays.toml needs at least one read and one write relay (or run with --dev)"
                    .into(),
            ));
        }

        let backend = match file.infer.backend.as_str() {
            "llama" => BackendChoice::Llama {
                model_path: flags
                    .model_path
                    .or(file.infer.llama.model_path.clone())
                    .unwrap_or_else(dev_model_path),
                threads: file.infer.llama.threads,
                context_tokens: file.infer.llama.context_tokens,
            },
            "openai" => {
                let section = &file.infer.openai;
                let api_key = match (&section.api_key_env, &section.api_key_file) {
                    (Some(var), _) => Some(std::env::var(var).map_err(|_| {
                        invalid(format!("infer.openai.api_key_env: ${var} is not set"))
                    })?),
                    (None, Some(path)) => Some(
                        std::fs::read_to_string(path)
                            .map_err(|source| ConfigError::Read {
                                path: path.clone(),
                                source,
                            })?
                            .trim()
                            .to_owned(),
                    ),
                    (None, None) => None,
                };
                BackendChoice::OpenAi(crate::infer::openai::OpenAiConfig {
                    base_url: section.base_url.clone(),
                    model: section.model.clone(),
                    api_key,
                    timeout: std::time::Duration::from_secs(section.timeout_secs.max(1)),
                })
            }
            other => {
                return Err(invalid(format!(
                    "infer.backend: `{other}` is not one of llama, openai"
                )))
            }
        };
        let wallet = match file.wallet.backend.as_str() {
            "dev" => WalletChoice::Dev,
            "lnbits" => {
                let section = &file.wallet.lnbits;
                let invoice_key = secret(
                    "wallet.lnbits invoice key",
                    &section.invoice_key_env,
                    &section.invoice_key_file,
                )?
                .ok_or_else(|| {
                    invalid("wallet.lnbits needs invoice_key_env or invoice_key_file".into())
                })?;
                let admin_key = secret(
                    "wallet.lnbits admin key",
                    &section.admin_key_env,
                    &section.admin_key_file,
                )?;
                WalletChoice::Lnbits(LnbitsConfig {
                    url: section.url.clone(),
                    invoice_key,
                    admin_key,
                    webhook_url: section.webhook_url.clone(),
                    websocket: section.websocket,
                })
            }
            "nwc" => {
                let section = &file.wallet.nwc;
                let uri = secret("wallet.nwc uri", &section.uri_env, &section.uri_file)?
                    .ok_or_else(|| invalid("wallet.nwc needs uri_env or uri_file".into()))?;
                WalletChoice::Nwc(NwcConfig {
                    uri,
                    timeout: std::time::Duration::from_secs(section.timeout_secs.max(1)),
                })
            }
            other => {
                return Err(invalid(format!(
                    "wallet.backend: `{other}` is not one of dev, lnbits, nwc"
                )))
            }
        };

        let jobs = JobConfig {
            kinds: service.kinds.clone(),
            rate_card: RateCard {
                base_fee_msat: file.pricing.base_fee_msat,
                prompt_msat_per_1k_tokens: file.pricing.prompt_msat_per_1k_tokens,
                completion_msat_per_1k_tokens: file.pricing.completion_msat_per_1k_tokens,
            },
            limits: TextGenerationLimits {
                default_max_tokens: tg.default_max_tokens,
                max_tokens_limit: tg.max_tokens_limit,
                max_prompt_bytes: tg.max_prompt_bytes,
            },
            max_request_bytes: service.max_request_bytes,
            max_age_secs: service.max_request_age_secs,
            invoice_expiry_secs: file.pricing.invoice_expiry_secs,
            workers: service.workers,
            job_timeout_secs: service.job_timeout_secs,
            reconcile_interval_secs: file.wallet.reconcile_interval_secs,
            zap_provider: match &file.zaps.provider_pubkey {
                Some(hex) => Some(nostr_sdk::PublicKey::parse(hex).map_err(|e| {
                    invalid(format!(
                        "zaps.provider_pubkey: `{hex}` is not a pubkey: {e}"
                    ))
                })?),
                None => None,
            },
        };
        Ok(Self {
            data_dir,
            dev: flags.dev,
            relays: roles,
            relay_listen,
            embedded_relay: crate::relay::EmbeddedRelayOptions {
                max_events: file.embedded_relay.max_events,
                ..crate::relay::EmbeddedRelayOptions::default()
            },
            http_listen,
            jobs,
            backend,
            wallet,
            profile: (service.name.clone(), service.about.clone()),
            lnurl: file.lnurl.enabled.then(|| file.lnurl.clone()),
            store: crate::store::StoreOptions {
                cache_capacity_bytes: file.store.cache_capacity_mib * 1024 * 1024,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_validates() {
        let text = include_str!("../dvmd.example.toml");
        let file: FileConfig = toml::from_str(text).expect("dvmd.example.toml parses");
        let relays: RelaysFile =
            toml::from_str(include_str!("../relays.toml")).expect("relays.toml parses");
        Config::build(file, relays, Overrides::default()).expect("valid");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = toml::from_str::<FileConfig>("[pricing]\nbase_fee_sats = 1\n")
            .expect_err("unknown key");
        assert!(err.to_string().contains("base_fee_sats"), "{err}");
    }

    #[test]
    fn non_dev_needs_relays() {
        let err = Config::build(
            FileConfig::default(),
            RelaysFile::default(),
            Overrides::default(),
        )
        .expect_err("no relays");
        assert!(err.to_string().contains("relays.toml"), "{err}");
        let dev = Overrides {
            dev: true,
            ..Overrides::default()
        };
        Config::build(FileConfig::default(), RelaysFile::default(), dev).expect("dev needs none");
    }

    #[test]
    fn rejects_unsupported_kinds_and_bad_addresses() {
        let mut file = FileConfig::default();
        file.service.kinds = vec![5100];
        let dev = Overrides {
            dev: true,
            ..Overrides::default()
        };
        assert!(Config::build(file, RelaysFile::default(), dev.clone()).is_err());
        let flags = Overrides {
            http_listen: Some("localhost".into()),
            ..dev
        };
        assert!(Config::build(FileConfig::default(), RelaysFile::default(), flags).is_err());
    }
}
