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

mod file;
mod http;
mod wallet;

pub use file::*;
pub use wallet::WalletChoice;

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

impl BackendChoice {
    /// The model served, as a request's `model` param must name it: the GGUF file name without
    /// `.gguf` for the embedded backend, the configured `model` for a server.
    pub fn model_name(&self) -> String {
        match self {
            Self::Llama { model_path, .. } => model_path
                .file_name()
                .map(|name| name.to_string_lossy())
                .map(|name| name.strip_suffix(".gguf").unwrap_or(&name).to_owned())
                .unwrap_or_default(),
            Self::OpenAi(config) => config.model.clone(),
        }
    }
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
    /// `[http]` (its `listen` is `http_listen`, after flags).
    pub http: HttpSection,
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
    /// Which relays named in requests are reached (`[reply_relays]`).
    pub reply_relays: crate::relay::ReplyRelayPolicy,
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
        if file.wallet.late_lookup_days.saturating_mul(24 * 60 * 60) < file.wallet.unpaid_grace_secs
        {
            return Err(invalid(
                "wallet.late_lookup_days must cover wallet.unpaid_grace_secs: an invoice is looked up at least until its job expires".into(),
            ));
        }
        let (context_key, context_tokens) = match file.infer.backend.as_str() {
            "openai" => (
                "infer.openai.context_tokens",
                file.infer.openai.context_tokens,
            ),
            _ => (
                "infer.llama.context_tokens",
                file.infer.llama.context_tokens,
            ),
        };
        if tg.max_tokens_limit >= context_tokens {
            return Err(invalid(format!(
                "text_generation.max_tokens_limit ({}) leaves no room for a prompt in the \
                 context window ({context_key} = {context_tokens}): lower the limit or raise the window",
                tg.max_tokens_limit
            )));
        }
        let smallest_result = tg.max_tokens_limit as usize * crate::nip90::RESULT_BYTES_PER_TOKEN;
        if smallest_result >= service.max_result_bytes {
            return Err(invalid(format!(
                "text_generation.max_tokens_limit ({}) allows results of {smallest_result} bytes \
                 and more, above service.max_result_bytes ({})",
                tg.max_tokens_limit, service.max_result_bytes
            )));
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
        http::check(&file.http)?;
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
        let wallet = wallet::choice(&file.wallet)?;

        let jobs = JobConfig {
            kinds: service.kinds.clone(),
            rate_card: RateCard {
                base_fee_msat: file.pricing.base_fee_msat,
                prompt_msat_per_1k_tokens: file.pricing.prompt_msat_per_1k_tokens,
                completion_msat_per_1k_tokens: file.pricing.completion_msat_per_1k_tokens,
            },
            hardware_cost_msat_per_hour: file.pricing.hardware_cost_msat_per_hour,
            limits: TextGenerationLimits {
                default_max_tokens: tg.default_max_tokens,
                max_tokens_limit: tg.max_tokens_limit,
                max_prompt_bytes: tg.max_prompt_bytes,
            },
            max_request_bytes: service.max_request_bytes,
            max_result_bytes: service.max_result_bytes,
            result_refusals: service.result_refusals.max(1),
            context_tokens: match &backend {
                BackendChoice::Llama { context_tokens, .. } => *context_tokens,
                BackendChoice::OpenAi(_) => file.infer.openai.context_tokens,
            },
            model: backend.model_name(),
            max_age_secs: service.max_request_age_secs,
            trust: crate::trust::TrustPolicy {
                thresholds: crate::trust::Thresholds {
                    known_paid_msat: file.trust.known_min_paid_msat,
                    known_jobs: file.trust.known_min_jobs,
                    trusted_paid_msat: file.trust.trusted_min_paid_msat,
                    trusted_jobs: file.trust.trusted_min_jobs,
                    trusted_age_secs: file.trust.trusted_min_age_days.saturating_mul(24 * 60 * 60),
                    debt_deadline_secs: file.trust.debt_deadline_secs,
                },
                new_min_pow: file.trust.new_min_pow,
                new_requests_per_minute: file.trust.new_requests_per_minute.max(1),
                trusted_credit_msat: file.trust.trusted_credit_msat,
                new_max_open_invoices: file
                    .trust
                    .new_max_open_invoices
                    .min(service.max_open_invoices),
                publish_labels: file.trust.publish_labels,
                publish_job_labels: file.trust.publish_job_labels,
                allowlisted_free: file.trust.allowlisted_free,
            },
            prune: (file.store.prune_unpaid_after_hours > 0).then(|| {
                crate::job::prune::PrunePolicy {
                    retention_secs: file.store.prune_unpaid_after_hours.saturating_mul(60 * 60),
                    max_request_age_secs: service.max_request_age_secs,
                }
            }),
            requests_per_npub_per_minute: service.requests_per_npub_per_minute,
            max_open_invoices_per_npub: service.max_open_invoices_per_npub.max(1),
            max_open_invoices: service.max_open_invoices.max(1),
            invoice_expiry_secs: file.pricing.invoice_expiry_secs,
            continuation_wait_secs: file.pricing.continuation_wait_secs,
            session_idle_secs: file.http.session_idle_secs,
            session_topup_wait_secs: file.http.session_topup_wait_secs,
            workers: service.workers,
            job_timeout_secs: service.job_timeout_secs,
            reconcile_interval_secs: file.wallet.reconcile_interval_secs,
            unpaid_grace_secs: file.wallet.unpaid_grace_secs,
            late_lookup_secs: file.wallet.late_lookup_days.saturating_mul(24 * 60 * 60),
            payout_fee: crate::job::payouts::PayoutFee {
                base_msat: file.wallet.payout_max_fee_base_msat,
                ppm: file.wallet.payout_max_fee_ppm,
            },
            payout_lnurl_allow_loopback_http: file.wallet.payout_lnurl_allow_loopback_http,
            credit_expiry_days: file.wallet.credit_expiry_days,
            auto_payout: crate::job::auto_payout::AutoPayoutPolicy {
                idle_days: file.wallet.auto_payout_idle_days,
                min_msat: file
                    .wallet
                    .auto_payout_min_msat
                    .unwrap_or(file.wallet.payout_max_fee_base_msat.saturating_mul(200)),
            },
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
                max_event_bytes: file.embedded_relay.max_event_bytes,
                ..crate::relay::EmbeddedRelayOptions::default()
            },
            http_listen,
            http: file.http.clone(),
            jobs,
            backend,
            wallet,
            profile: (service.name.clone(), service.about.clone()),
            lnurl: file.lnurl.enabled.then(|| file.lnurl.clone()),
            store: crate::store::StoreOptions {
                cache_capacity_bytes: file.store.cache_capacity_mib * 1024 * 1024,
            },
            reply_relays: crate::relay::ReplyRelayPolicy {
                allow_private: file.reply_relays.allow_private,
                allow: file.reply_relays.allow.clone(),
                deny: file.reply_relays.deny.clone(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_validates() {
        let text = include_str!("../../dvmd.example.toml");
        let file: FileConfig = toml::from_str(text).expect("dvmd.example.toml parses");
        let relays: RelaysFile =
            toml::from_str(include_str!("../../relays.toml")).expect("relays.toml parses");
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
    fn limits_that_cannot_fit_the_context_or_the_relays_are_refused() {
        let dev = Overrides {
            dev: true,
            ..Overrides::default()
        };
        let mut file = FileConfig::default();
        file.infer.llama.context_tokens = 1024;
        let err = Config::build(file, RelaysFile::default(), dev.clone())
            .expect_err("max_tokens_limit 1024 fills the window");
        assert!(
            err.to_string().contains("infer.llama.context_tokens"),
            "{err}"
        );
        let mut file = FileConfig::default();
        file.infer.backend = "openai".into();
        file.infer.openai.context_tokens = 512;
        let err = Config::build(file, RelaysFile::default(), dev.clone()).expect_err("openai");
        assert!(
            err.to_string().contains("infer.openai.context_tokens"),
            "{err}"
        );
        let mut file = FileConfig::default();
        file.service.max_result_bytes = 4096;
        assert!(Config::build(file, RelaysFile::default(), dev.clone()).is_err());
        // Invoices must be looked up at least until their job can expire.
        let mut file = FileConfig::default();
        file.wallet.late_lookup_days = 0;
        let err = Config::build(file, RelaysFile::default(), dev).expect_err("lookups too short");
        assert!(err.to_string().contains("late_lookup_days"), "{err}");
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
