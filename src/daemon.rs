//! Wiring and lifecycle: build every part from the [`Config`], start the tasks, stop them.
//!
//! The daemon owns one `CancellationToken`. Every long-running loop takes a child of it and
//! ends when it fires; [`Daemon::stop`] fires it, waits for the loops (bounded), then closes
//! the store (a last group commit). Jobs cut short stay in their persisted state and resume on
//! the next start. A store that fails stops the daemon with an error: nothing is accepted that
//! cannot be persisted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nostr_sdk::PublicKey;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{BackendChoice, Config};
use crate::http::lnurl::LnurlConfig;
use crate::http::{self, HttpState};
use crate::identity::{self, IdentityError};
use crate::infer::llama::{LlamaBackend, LlamaConfig};
use crate::infer::openai::OpenAiBackend;
use crate::infer::{Backend, InferError};
use crate::job::{Book, Pipeline};
use crate::metrics::Metrics;
use crate::relay::{intake, EmbeddedRelay, Outbox, RelayError, RelayRole, Relays};
use crate::store::{Store, StoreError};
use crate::wallet::dev::DevWallet;
use crate::wallet::WalletError;

/// How long `stop` waits for the tasks before giving up on them.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long start waits for the relays before going on (the pool keeps retrying).
const RELAY_CONNECT_WAIT: Duration = Duration::from_secs(5);

/// Errors that stop the daemon from starting.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The store cannot be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The service key is missing or unreadable.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The wallet cannot be opened.
    #[error(transparent)]
    Wallet(#[from] WalletError),
    /// The model or inference server cannot be set up.
    #[error(transparent)]
    Infer(#[from] InferError),
    /// The relays cannot be set up.
    #[error(transparent)]
    Relay(#[from] RelayError),
    /// The store writer failed while running.
    #[error("stopped: the store failed ({0})")]
    StoreFailed(String),
    /// A listener cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Where a started daemon can be reached.
#[derive(Debug, Clone)]
pub struct Ready {
    /// The embedded relay (dev mode) or the first read relay.
    pub relay_url: String,
    /// The HTTP listener.
    pub http_url: String,
    /// The service's public key.
    pub pubkey: PublicKey,
}

impl std::fmt::Display for Ready {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "dvmd ready relay={} http={} pubkey={}",
            self.relay_url,
            self.http_url,
            self.pubkey.to_hex()
        )
    }
}

/// Parts a caller may supply instead of building them from the configuration (benchmarks and
/// tests use an instant backend).
#[derive(Default, Clone)]
pub struct Parts {
    /// Use this backend instead of the configured one.
    pub backend: Option<Arc<dyn Backend>>,
    /// Wrap the configured wallet (tests inject faults next to the real wallet this way).
    pub wrap_wallet: Option<WalletWrap>,
}

/// Wraps the configured wallet: see [`Parts::wrap_wallet`].
pub type WalletWrap =
    Arc<dyn Fn(Arc<dyn crate::wallet::Wallet>) -> Arc<dyn crate::wallet::Wallet> + Send + Sync>;

/// A running daemon.
pub struct Daemon {
    ready: Ready,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
    pipeline: Pipeline,
    relays: Relays,
    store: Store,
    dev_wallet: Option<Arc<DevWallet>>,
    embedded: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
    /// Where this daemon told `dvmd account withdraw` to find it (removed when it stops, so
    /// the admin token never goes to whatever listens on that port later).
    admin_url: std::path::PathBuf,
}

impl Daemon {
    /// Build every part and start the tasks; returns once the daemon is ready.
    pub async fn start(config: Config, parts: Parts) -> Result<Self, DaemonError> {
        let cancel = CancellationToken::new();
        let (path, options) = (config.data_dir.join("store"), config.store);
        let store = tokio::task::spawn_blocking(move || Store::open_with(&path, options))
            .await
            .map_err(|e| StoreError::Read(format!("store open panicked: {e}")))??;
        let keys = if config.dev {
            identity::init(&config.data_dir)?.0
        } else {
            identity::load(&config.data_dir)?
        };
        tracing::info!(pubkey = %keys.public_key(), data_dir = %config.data_dir.display(), dev = config.dev, "starting");

        let webhook_key = identity::webhook_key(&keys);
        let choice = config.wallet.clone().with_webhook_key(&webhook_key);
        let (wallet, dev_wallet) = crate::wallet::open(&choice, &store).await?;
        let wallet = match parts.wrap_wallet {
            Some(wrap) => wrap(wallet),
            None => wallet,
        };
        let backend = match parts.backend {
            Some(backend) => backend,
            None => build_backend(&config.backend).await?,
        };
        let mut config = config;
        if let Some(cost) = config.jobs.hardware_cost_msat_per_hour {
            let (prompt_secs, completion_secs) = measure_token_seconds(backend.as_ref()).await?;
            let card = crate::pricing::RateCard::from_hardware(
                config.jobs.rate_card.base_fee_msat,
                cost,
                prompt_secs,
                completion_secs,
            );
            tracing::info!(
                cost_msat_per_hour = cost,
                prompt_ms_per_token = prompt_secs * 1e3,
                completion_ms_per_token = completion_secs * 1e3,
                ?card,
                "token rates derived from the hardware"
            );
            config.jobs.rate_card = card;
        }

        let mut tasks = JoinSet::new();
        let mut embedded = None;
        let mut relay_stats = None;
        let (roles, relay_url) = if config.dev {
            let relay = EmbeddedRelay::bind_with(config.relay_listen, config.embedded_relay)
                .await
                .map_err(|source| DaemonError::Listen {
                    addr: config.relay_listen,
                    source,
                })?;
            let url = relay.url();
            relay_stats = Some(relay.stats());
            // Stopped last, after our own client disconnected from it.
            let relay_cancel = CancellationToken::new();
            let handle = tokio::spawn(relay.run(relay_cancel.clone()));
            embedded = Some((relay_cancel, handle));
            let role = RelayRole {
                url: url.clone(),
                read: true,
                write: true,
            };
            (vec![role], url)
        } else {
            let first = config
                .relays
                .iter()
                .find(|r| r.read)
                .map(|r| r.url.clone())
                .unwrap_or_default();
            (config.relays.clone(), first)
        };
        let relays = Relays::connect(&keys, &roles, config.reply_relays.clone()).await?;
        relays.wait_connected(RELAY_CONNECT_WAIT).await;

        let metrics = Arc::new(Metrics::default());
        let outbox = Outbox::new(relays.clone(), cancel.child_token());
        let trust = crate::trust::Trust::load(
            store.clone(),
            config.jobs.trust,
            crate::job::pipeline::unix_now(),
        )
        .await
        .map_err(|crate::trust::TrustError::Store(e)| DaemonError::Store(e))?;
        let (pipeline, queue) = Pipeline::new(
            config.jobs.clone(),
            keys.clone(),
            Book::new(store.clone()),
            wallet.clone(),
            backend,
            outbox,
            metrics.clone(),
            Arc::new(trust),
        );

        if let Err(e) = pipeline.load_estimates().await {
            tracing::warn!(error = %e, "cannot read what the estimator learned; starting from the priors");
        }
        if let Some(provider) = pipeline.zap_provider() {
            // Trusted from now on, if not before: receipts of older zaps credit nobody. A
            // store that already follows receipts (kept before this was recorded) trusted its
            // provider before: from a day before its checkpoint, so a zap invoiced before an
            // upgrade and paid after it still counts.
            let now = crate::job::pipeline::unix_now();
            let book = pipeline.book();
            let first = match book
                .checkpoint(crate::job::checkpoint::Stream::Receipts)
                .await
            {
                Ok(Some(at)) => now.min(at.saturating_sub(24 * 60 * 60)),
                _ => now,
            };
            if let Err(e) = book.provider_trusted_since(&provider, first).await {
                tracing::error!(error = %e, "cannot record when the zap provider was first trusted");
            }
        }

        let listener = TcpListener::bind(config.http_listen)
            .await
            .map_err(|source| DaemonError::Listen {
                addr: config.http_listen,
                source,
            })?;
        let http_addr = listener
            .local_addr()
            .map_err(|source| DaemonError::Listen {
                addr: config.http_listen,
                source,
            })?;
        let listen_url = format!("http://{http_addr}");
        let root_key = identity::l402_root_key(&config.data_dir)?;
        let mut api = http::api::ApiConfig::new(&config.http, &listen_url, root_key);
        api.admin_token = Some(identity::admin_token(&config.data_dir)?);
        let api = Arc::new(api);
        // Where `dvmd account withdraw` finds this daemon (its listener, on loopback).
        let loopback =
            std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), http_addr.port());
        let admin_url = config.data_dir.join(identity::ADMIN_URL_FILE);
        if let Err(e) = std::fs::write(&admin_url, format!("http://{loopback}\n")) {
            tracing::warn!(error = %e, path = %admin_url.display(), "cannot write the admin URL");
        }
        let lnurl = config.lnurl.as_ref().map(|section| LnurlConfig {
            username: section.username.clone(),
            public_url: section
                .public_url
                .clone()
                .unwrap_or_else(|| api.public_url.clone()),
            min_sendable_msat: section.min_sendable_msat,
            max_sendable_msat: section.max_sendable_msat,
            limiter: Arc::new(http::lnurl::InvoiceLimiter::per_minute(
                section.max_invoices_per_minute,
            )),
        });
        let router = http::router(HttpState {
            metrics,
            store: store.clone(),
            relay: relay_stats,
            wallet: wallet.clone(),
            webhook_key,
            dev_wallet: if config.dev { dev_wallet.clone() } else { None },
            pubkey: keys.public_key().to_hex(),
            pipeline: Some(pipeline.clone()),
            lnurl: lnurl.clone(),
            api: Some(api),
        });
        let follower = wallet.clone();
        let follow_cancel = cancel.child_token();
        tasks.spawn(async move { follower.follow(follow_cancel).await });
        let limits = http::listener::ConnectionLimits {
            max_connections: config.http.max_connections,
            max_per_ip: config.http.max_connections_per_ip,
            header_timeout: std::time::Duration::from_secs(config.http.header_timeout_secs),
            exempt: config
                .http
                .trusted_proxies
                .iter()
                .filter_map(|proxy| proxy.parse().ok())
                .collect(),
        };
        tasks.spawn(http::serve(listener, limits, router, cancel.child_token()));

        announce(&relays, &keys, &config, lnurl.as_ref(), &mut tasks);
        // Workers first: recovery fills the (bounded) run queue.
        tasks.spawn(pipeline.clone().run_workers(queue, cancel.child_token()));
        pipeline.recover().await;
        let labeller = pipeline.clone();
        tasks.spawn(async move { labeller.publish_unlabelled().await });
        let zaps = pipeline.clone();
        tasks.spawn(async move { zaps.publish_due_zap_receipts().await });
        tasks.spawn(pipeline.clone().watch_settlements(cancel.child_token()));
        tasks.spawn(pipeline.clone().reconcile(cancel.child_token()));
        tasks.spawn(relays.clone().release_reply_relays(cancel.child_token()));
        tasks.spawn(pipeline.clone().run_auto_payouts(cancel.child_token()));
        tasks.spawn(intake::run(
            relays.clone(),
            pipeline.clone(),
            config.jobs.kinds.clone(),
            config.jobs.max_age_secs,
            cancel.child_token(),
        ));

        let ready = Ready {
            relay_url,
            http_url: format!("http://{http_addr}"),
            pubkey: keys.public_key(),
        };
        Ok(Self {
            ready,
            cancel,
            tasks,
            pipeline,
            relays,
            store,
            dev_wallet,
            embedded,
            admin_url,
        })
    }

    /// Where the daemon can be reached.
    pub fn ready(&self) -> &Ready {
        &self.ready
    }

    /// The job pipeline (tests inspect the book and metrics through it).
    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    /// The dev wallet, in dev mode.
    pub fn dev_wallet(&self) -> Option<&Arc<DevWallet>> {
        self.dev_wallet.as_ref()
    }

    /// Run until Ctrl-C or SIGTERM, then stop gracefully. A failed store stops the daemon too,
    /// and is returned as the error (the process exits non-zero).
    pub async fn run_until_signal(self) -> Result<(), DaemonError> {
        self.run_until(shutdown_signal()).await
    }

    /// Run until `stop` resolves or the store fails, then stop gracefully.
    pub async fn run_until(
        self,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<(), DaemonError> {
        let failed = tokio::select! {
            _ = stop => None,
            reason = self.store.failed() => Some(reason),
        };
        match &failed {
            None => tracing::info!("stopping"),
            Some(reason) => tracing::error!(%reason, "the store failed; stopping"),
        }
        self.stop().await;
        failed.map_or(Ok(()), |reason| Err(DaemonError::StoreFailed(reason)))
    }

    /// Stop every task (bounded by a timeout), disconnect, close the store.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        let drain = async {
            while self.tasks.join_next().await.is_some() {}
            self.pipeline.wait().await;
        };
        if tokio::time::timeout(STOP_TIMEOUT, drain).await.is_err() {
            tracing::warn!("tasks did not stop in time; their jobs resume on the next start");
            self.tasks.abort_all();
        }
        let _ = std::fs::remove_file(&self.admin_url);
        if let Err(e) = self.pipeline.save_estimates(true).await {
            tracing::warn!(error = %e, "cannot save what the estimator learned");
        }
        self.relays.shutdown().await;
        if let Some((cancel, handle)) = self.embedded.take() {
            cancel.cancel();
            let _ = tokio::time::timeout(STOP_TIMEOUT, handle).await;
        }
        if let Err(e) = self.store.close().await {
            tracing::error!(error = %e, "closing the store failed");
        }
        tracing::info!("stopped");
    }
}

/// Seconds per prompt token and per completion token on `backend`: a one-token generation is
/// almost all prompt processing; a longer one gives the completion rate.
async fn measure_token_seconds(backend: &dyn Backend) -> Result<(f64, f64), DaemonError> {
    use crate::infer::{ChatMessage, GenerateRequest, Sampling};
    const PROMPT: &str = "Explain, in a few friendly sentences, how a Lightning invoice is paid \
        and why the preimage proves the payment. Mention relays and signatures once.";
    const TOKENS: u32 = 48;
    let request = GenerateRequest {
        continue_from: None,
        model: None,
        messages: vec![ChatMessage::user(PROMPT)],
        sampling: Sampling {
            temperature: Some(0.0),
            seed: Some(1),
            ..Sampling::default()
        },
    };
    let run = |max_tokens: u32| {
        let request = request.clone();
        async move {
            let started = std::time::Instant::now();
            let stream = backend.generate(request, max_tokens).await?;
            let (_, usage, _) = crate::infer::collect(stream).await?;
            Ok::<_, crate::infer::InferError>((started.elapsed().as_secs_f64(), usage))
        }
    };
    let measured = async {
        // Warm once (caches, first allocation), then measure.
        run(1).await?;
        let (prompt_time, short) = run(1).await?;
        let (total, long) = run(TOKENS).await?;
        let prompt_secs = prompt_time / f64::from(short.prompt_tokens.max(1));
        let completion_secs = (total - prompt_time).max(0.0)
            / f64::from(long.completion_tokens.saturating_sub(1).max(1));
        Ok::<_, crate::infer::InferError>((prompt_secs, completion_secs))
    };
    Ok(measured.await?)
}

/// Publish the kind 0 profile and the NIP-89 announcement in the background (re-sent on every
/// start; both are replaceable, clients need one copy).
fn announce(
    relays: &Relays,
    keys: &nostr_sdk::Keys,
    config: &Config,
    lnurl: Option<&LnurlConfig>,
    tasks: &mut JoinSet<()>,
) {
    let (name, about) = &config.profile;
    let lud16 = lnurl.map(LnurlConfig::lud16);
    let profile = crate::nip89::profile(name, about, lud16.as_deref());
    let offer = crate::nip89::Offer {
        kinds: &config.jobs.kinds,
        model: &config.jobs.model,
        rates: &config.jobs.rate_card,
        new_min_pow: config.jobs.trust.new_min_pow,
    };
    let handler = crate::nip89::announcement(offer, name, about, lud16.as_deref());
    for (what, builder) in [("profile", profile), ("NIP-89 announcement", handler)] {
        let event = match builder.sign_with_keys(keys) {
            Ok(event) => event,
            Err(e) => {
                tracing::warn!(error = %e, what, "cannot sign");
                continue;
            }
        };
        let relays = relays.clone();
        tasks.spawn(async move {
            match relays.send(&event, &[], &Default::default()).await {
                Ok(relay) => tracing::info!(%relay, what, "published"),
                Err(e) => tracing::warn!(error = %e, what, "not published"),
            }
        });
    }
}

async fn build_backend(choice: &BackendChoice) -> Result<Arc<dyn Backend>, DaemonError> {
    Ok(match choice {
        BackendChoice::Llama {
            model_path,
            threads,
            context_tokens,
        } => {
            let config = LlamaConfig {
                model_path: model_path.clone(),
                threads: *threads,
                context_tokens: *context_tokens,
            };
            let backend = tokio::task::spawn_blocking(move || LlamaBackend::load(&config))
                .await
                .map_err(|e| InferError::Backend(format!("model loader panicked: {e}")))??;
            Arc::new(backend)
        }
        BackendChoice::OpenAi(config) => Arc::new(OpenAiBackend::new(config.clone())?),
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
