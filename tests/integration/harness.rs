//! Shared test harness: real parts on loopback (embedded relay, dev wallet, the real model,
//! llama-server, the daemon binary), plus the checks every scenario ends with.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use dvmd::config::{Config, FileConfig, Overrides, RelaysFile};
use dvmd::customer::{Customer, Reply};
use dvmd::daemon::{Daemon, Parts};
use dvmd::infer::Backend;
use dvmd::job::{Book, Job, JobState};
use dvmd::ledger::{self, Totals};
use dvmd::nip90::JobStatus;
use dvmd::store::Store;
use nostr_sdk::{Event, EventBuilder, EventId, JsonUtil, Keys, Kind, PublicKey, Tag, TagKind};

/// How long a test waits for any single reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// The bundled model; `make test` downloads it. Missing is a failure, not a skip.
pub fn model_path() -> PathBuf {
    let path = dvmd::config::dev_model_path();
    assert!(
        path.exists(),
        "model {} missing: run `make model` (or `make test`, which does)",
        path.display()
    );
    path
}

/// A fresh data directory, removed on drop.
pub fn data_dir() -> tempfile::TempDir {
    fail_on_daemon_panics();
    tempfile::tempdir().expect("tempdir")
}

/// Abort the test run when a thread other than a test's own panics. A daemon started in this
/// process runs its tasks on the runtime's worker threads, where a panic ends only that task:
/// tokio prints it and the daemon serves on with that task's work left undone, so a test that
/// looks only at what it expects could pass over it. Test threads are named after their test
/// (`module::name`); every other thread is the daemon's, the runtime's or a helper's. The
/// panic is printed first, as always. Installed by the harness's entry points; the daemon
/// binary has its own hook (`dvmd_panics_total`), checked by `DaemonProcess`. A test whose
/// own task may fail on purpose (a call to a daemon it kills) aborts that task first.
pub fn fail_on_daemon_panics() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default(info);
            let thread = std::thread::current();
            if !thread.name().is_some_and(|name| name.contains("::")) {
                // Straight to stderr: threads a test starts share its captured output, which
                // the abort would lose with the message.
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "thread {:?} panicked outside any test's own thread ({info}): a daemon \
                     task died; aborting the test run",
                    thread.name().unwrap_or("unnamed")
                );
                std::process::abort();
            }
        }));
    });
}

/// Log what in-process daemons do into the output of the test that started them, at
/// `DVMD_TEST_LOG` (an `EnvFilter`; `info` if unset): libtest prints it only for a test that
/// fails, so a flaky failure in CI comes with the daemon's side of the story. Threads a test
/// starts (its runtime's workers, the store writer) inherit its captured output.
pub fn capture_daemon_logs() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let filter = std::env::var("DVMD_TEST_LOG").unwrap_or_else(|_| "info".into());
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .try_init();
    });
}

/// A dev-mode configuration on free ports in `data`.
pub fn dev_config(data: &Path, edit: impl FnOnce(&mut FileConfig)) -> Config {
    dev_config_at(data, "127.0.0.1:0", edit)
}

/// The same with the HTTP door on `http_listen` (a restart that must keep its URLs: NIP-98
/// signs them).
pub fn dev_config_at(data: &Path, http_listen: &str, edit: impl FnOnce(&mut FileConfig)) -> Config {
    fail_on_daemon_panics();
    let mut file = FileConfig::default();
    file.wallet.reconcile_interval_secs = 1;
    edit(&mut file);
    Config::build(
        file,
        RelaysFile::default(),
        Overrides {
            dev: true,
            data_dir: Some(data.to_owned()),
            relay_listen: Some("127.0.0.1:0".into()),
            http_listen: Some(http_listen.into()),
            model_path: Some(model_path()),
        },
    )
    .expect("valid config")
}

/// Start a daemon in this process, optionally with a backend of the test's choosing.
pub async fn start(config: Config, backend: Option<Arc<dyn Backend>>) -> Daemon {
    fail_on_daemon_panics();
    capture_daemon_logs();
    Daemon::start(
        config,
        Parts {
            backend,
            ..Parts::default()
        },
    )
    .await
    .expect("daemon starts")
}

/// Open the store of a stopped daemon. sled releases its file lock when the last handle goes,
/// and a background flush of the stopped daemon may still hold one for a moment: retry a
/// locked store for up to 2 s.
pub fn open_store(data: &Path) -> Store {
    let path = data.join("store");
    for _ in 0..40 {
        match Store::open(&path) {
            Err(dvmd::store::StoreError::Locked(_)) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            opened => return opened.expect("store opens"),
        }
    }
    Store::open(&path).expect("store opens")
}

/// Every job in the store.
pub fn jobs(store: &Store) -> Vec<Job> {
    Book::new(store.clone()).all_blocking().expect("jobs")
}

/// The ledger invariant, and every job's hold matching its record, must hold after every
/// scenario.
pub fn ledger_ok(store: &Store) -> Totals {
    store
        .read_blocking(dvmd::job::audit)
        .expect("ledger invariant holds")
}

/// The balance of `account`.
pub fn balance(store: &Store, account: &PublicKey) -> u64 {
    store
        .read_blocking(|r| ledger::balance(r, &(*account).into()))
        .expect("balance")
}

/// Every job, once none is left unfinished (an HTTP answer goes out just before its job
/// settles, as a relay result is published before its job settles). Waits up to 10 s.
pub async fn settled_jobs(store: &Store) -> Vec<Job> {
    for _ in 0..500 {
        let all = jobs(store);
        if all.iter().all(|job| job.state.is_terminal()) {
            return all;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("jobs left unfinished: {:?}", jobs(store));
}

/// The spendable balance of any ledger account (an npub, or an L402 token's payment hash).
pub fn account_balance(store: &Store, account: &dvmd::ledger::Account) -> u64 {
    store
        .read_blocking(|r| ledger::balance(r, account))
        .expect("balance")
}

/// A loopback port that was free a moment ago (for daemons restarted on the same address).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The daemon binary running as a child process (for kill -9 tests and peer clients). Its
/// stderr is passed through, and a panic in it (a task that died: tokio logs it and serves on)
/// fails the test when the daemon is stopped or killed.
pub struct DaemonProcess {
    child: Child,
    /// The first `panicked at` line the daemon wrote, with the line after it.
    panicked: Arc<std::sync::Mutex<Option<String>>>,
    /// The `dvmd ready` line's fields.
    pub relay_url: String,
    /// HTTP base URL.
    pub http_url: String,
    /// Service pubkey, hex.
    pub pubkey: String,
}

impl DaemonProcess {
    /// `dvmd run --dev` on the given ports in `data`; waits for the ready line.
    pub fn spawn(data: &Path, relay_port: u16, http_port: u16, extra_config: &str) -> Self {
        let config = data.join("dvmd.toml");
        std::fs::write(
            &config,
            format!("[wallet]\nreconcile_interval_secs = 1\n{extra_config}"),
        )
        .expect("write config");
        let mut child = Command::new(env!("CARGO_BIN_EXE_dvmd"))
            .args(["run", "--dev", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(data)
            .args(["--relay-listen", &format!("127.0.0.1:{relay_port}")])
            .args(["--http-listen", &format!("127.0.0.1:{http_port}")])
            .arg("--model")
            .arg(model_path())
            .env("DVMD_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn dvmd");
        let panicked: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
        let stderr = child.stderr.take().expect("stderr");
        let seen = panicked.clone();
        std::thread::spawn(move || {
            let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
            while let Some(Ok(line)) = lines.next() {
                eprintln!("{line}");
                if line.contains(" panicked at ") {
                    let next = lines.next().and_then(Result::ok).unwrap_or_default();
                    eprintln!("{next}");
                    let mut first = seen.lock().unwrap_or_else(|e| e.into_inner());
                    first.get_or_insert(format!("{line} {next}"));
                }
            }
        });
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
            .expect("ready line");
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("no {name}= in ready line {line:?}"))
                .to_owned()
        };
        assert!(
            line.starts_with("dvmd ready "),
            "unexpected first line {line:?}"
        );
        Self {
            relay_url: field("relay"),
            http_url: field("http"),
            pubkey: field("pubkey"),
            child,
            panicked,
        }
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill(mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
        self.assert_no_panic();
    }

    /// Fail if the daemon panicked so far.
    pub fn assert_no_panic(&self) {
        // The reader thread may still be writing the last lines out.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let panicked = self.panicked.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(line) = panicked.as_ref() {
            panic!("the daemon panicked: {line}");
        }
    }

    /// SIGTERM and wait for a graceful exit.
    pub fn terminate(mut self) {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        let status = self.child.wait().expect("wait");
        self.assert_no_panic();
        assert!(status.success(), "dvmd exited with {status}");
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pay a dev invoice through the daemon's HTTP endpoint, as `dvmd dev pay` does.
pub async fn dev_pay(http_url: &str, bolt11: &str) -> String {
    let response = reqwest::Client::new()
        .post(format!("{http_url}/dev/pay"))
        .json(&serde_json::json!({ "bolt11": bolt11 }))
        .send()
        .await
        .expect("POST /dev/pay");
    assert!(
        response.status().is_success(),
        "dev pay: {}",
        response.status()
    );
    let body: serde_json::Value = response.json().await.expect("json");
    body["preimage"].as_str().expect("preimage").to_owned()
}

/// Wait for `payment-required` about `job`; returns (msat, bolt11). Panics on anything else.
/// A new customer on `relay_url` posts "Hello" (8 tokens) and gets its `payment-required`
/// feedback: the customer, the request, the quote (msat) and the invoice.
pub async fn hello_job(relay_url: &str) -> (Customer, Event, u64, String) {
    let mut customer = Customer::connect(relay_url).await.expect("connect");
    let request = customer
        .post(dvmd::customer::text_request(
            "Hello",
            &[("max_tokens", "8")],
            None,
            None,
        ))
        .await
        .expect("post");
    let (quote, bolt11) = invoice(&mut customer, &request.id).await;
    (customer, request, quote, bolt11)
}

pub async fn invoice(customer: &mut Customer, job: &EventId) -> (u64, String) {
    match customer
        .wait_for(job, REPLY_TIMEOUT, |r| {
            matches!(
                r,
                Reply::Feedback {
                    status: Some(JobStatus::PaymentRequired | JobStatus::Error),
                    ..
                }
            )
        })
        .await
        .expect("payment-required")
    {
        Reply::Feedback {
            status: Some(JobStatus::PaymentRequired),
            amount: Some(a),
            ..
        } => (a.msat, a.bolt11.expect("bolt11 in the amount tag")),
        other => panic!("expected payment-required, got {other:?}"),
    }
}

/// Wait for the result of `job`. Panics on an `error` feedback.
pub async fn result(customer: &mut Customer, job: &EventId) -> Event {
    match customer
        .wait_for(job, REPLY_TIMEOUT, |r| {
            matches!(
                r,
                Reply::Result(_)
                    | Reply::Feedback {
                        status: Some(JobStatus::Error),
                        ..
                    }
            )
        })
        .await
        .expect("result")
    {
        Reply::Result(event) => *event,
        other => panic!("expected a result, got {other:?}"),
    }
}

/// Wait for the first feedback about `job` and require an `error` without an invoice; returns
/// its info text.
pub async fn error_info(customer: &mut Customer, job: &EventId) -> String {
    match customer
        .wait_for(job, REPLY_TIMEOUT, |r| matches!(r, Reply::Feedback { .. }))
        .await
        .expect("feedback")
    {
        Reply::Feedback {
            status: Some(JobStatus::Error),
            info,
            amount: None,
            ..
        } => info,
        other => panic!("expected an error feedback without an invoice, got {other:?}"),
    }
}

/// Wait (briefly) until the payment of `hash` is booked (its record consumed).
pub async fn wait_for_booking(book: &Book, hash: &dvmd::wallet::PaymentHash) {
    for _ in 0..250 {
        let record = book.payment(hash).await.expect("read").expect("record");
        if record.consumed {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the payment {hash} was never booked");
}

/// Wait (briefly) until job `id` reaches `state`; settling is the last step after `success`.
/// A job not recorded yet (intake admits it in a task) is waited for too.
pub async fn wait_for_state(book: &Book, id: &EventId, state: JobState) -> Job {
    for _ in 0..250 {
        if let Some(job) = book.get(&(*id).into()).await.expect("read") {
            if job.state == state {
                return job;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("job {id} never reached {state:?}");
}

/// Query `relay_url` with npm nostr-tools (`tests/peers/query.mjs`): the relay's answer to
/// `filter` as an independent client sees it, one JSON object per event that nostr-tools'
/// `verifyEvent` accepted (`{"event": .., "zap": ..}`).
pub fn nostr_tools_query(relay_url: &str, filter: &serde_json::Value) -> Vec<serde_json::Value> {
    node_peer(
        "query.mjs",
        &["--relay", relay_url, "--filter", &filter.to_string()],
    )
}

/// An `Authorization` value as npm nostr-tools `nip98.getToken` makes it (with its own payload
/// hashing), signed by `keys` (`tests/peers/nip98_token.mjs`).
pub fn nostr_tools_nip98(keys: &Keys, url: &str, method: &str, payload: Option<&str>) -> String {
    let secret = keys.secret_key().to_secret_hex();
    let mut args = vec!["--url", url, "--method", method, "--secret", &secret];
    if let Some(payload) = payload {
        args.extend(["--payload", payload]);
    }
    let line = node_peer("nip98_token.mjs", &args);
    line[0]["header"].as_str().expect("header").to_owned()
}

/// An `Authorization` value signed here with a random `nonce` tag, so that the same call made
/// many times in one second is many events (nostr-tools would sign them all alike, and NIP-98
/// refuses the copies as replays).
pub fn nip98_with_nonce(keys: &Keys, url: &str, method: &str, body: Option<&str>) -> String {
    use base64::Engine;
    use bitcoin::hashes::{sha256, Hash};
    let mut tags = vec![
        Tag::custom(TagKind::custom("u"), [url]),
        Tag::custom(TagKind::custom("method"), [method.to_uppercase()]),
        Tag::custom(
            TagKind::custom("nonce"),
            [Keys::generate().public_key().to_hex()],
        ),
    ];
    if let Some(body) = body {
        let hash = sha256::Hash::hash(body.as_bytes()).to_string();
        tags.push(Tag::custom(TagKind::custom("payload"), [hash]));
    }
    let event = EventBuilder::new(Kind::from(27235u16), "")
        .tags(tags)
        .sign_with_keys(keys)
        .expect("sign");
    let token = base64::engine::general_purpose::STANDARD.encode(event.as_json());
    format!("Nostr {token}")
}

/// Run `tests/peers/<script>` with the peers' Python venv (PyPI nostr-sdk, openai); its
/// stdout, one JSON value a line.
pub fn python_peer(script: &str, args: &[&str]) -> Vec<serde_json::Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/peers")
        .join(script);
    let python = std::env::var("DVMD_PEERS_PYTHON")
        .expect("DVMD_PEERS_PYTHON not set: run `make test` (it installs the peer venv)");
    let output = Command::new(python)
        .arg(path)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    let stdout = String::from_utf8(output.stdout).expect("utf-8");
    assert!(
        output.status.success(),
        "{script}: {}\n{stdout}",
        output.status
    );
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect()
}

/// The model a daemon serves, as `GET /v1/models` names it (what an OpenAI SDK must ask for).
pub async fn served_model(http_url: &str) -> String {
    let models: serde_json::Value = reqwest::get(format!("{http_url}/v1/models"))
        .await
        .expect("models")
        .json()
        .await
        .expect("json");
    models["data"][0]["id"].as_str().expect("model").to_owned()
}

/// Credit `keys`' npub with `msat` over the `/v1` door: a top-up invoice asked for with a
/// nostr-tools NIP-98 header, paid through `/dev/pay`, booked.
pub async fn http_top_up(daemon: &dvmd::daemon::Daemon, keys: &Keys, msat: u64) {
    let http = &daemon.ready().http_url;
    let url = format!("{http}/v1/account/topup");
    let body = format!(r#"{{"amount_msat":{msat}}}"#);
    let header = nostr_tools_nip98(keys, &url, "post", Some(&body));
    let response = reqwest::Client::new()
        .post(&url)
        .header("Authorization", header)
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await
        .expect("POST /v1/account/topup");
    assert_eq!(response.status(), 200, "top-up refused");
    let topup: serde_json::Value = response.json().await.expect("json");
    let hash = dvmd::wallet::PaymentHash::try_from(
        topup["payment_hash"].as_str().expect("hash").to_owned(),
    )
    .expect("payment hash");
    dev_pay(http, topup["bolt11"].as_str().expect("bolt11")).await;
    wait_for_booking(daemon.pipeline().book(), &hash).await;
}

/// Run `tests/peers/<script>` with node and the npm peers; its stdout, one JSON value a line.
pub fn node_peer(script: &str, args: &[&str]) -> Vec<serde_json::Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/peers")
        .join(script);
    let peers = std::env::var("DVMD_NODE_PEERS")
        .expect("DVMD_NODE_PEERS not set: run `make test` (it installs the npm peers)");
    let output = Command::new("node")
        .arg(path)
        .args(args)
        .env("DVMD_NODE_PEERS", peers)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("run node {script}: {e}"));
    assert!(output.status.success(), "{script}: {}", output.status);
    String::from_utf8(output.stdout)
        .expect("utf-8")
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect()
}

/// A signed NIP-57 zap request (kind 9734) from `sender` to `to`, for `target` if any, as JSON.
pub fn zap_request(
    sender: &Keys,
    to: PublicKey,
    target: Option<EventId>,
    msat: u64,
    relay: &str,
) -> String {
    let mut tags = vec![
        Tag::public_key(to),
        Tag::custom(TagKind::custom("relays"), [relay]),
        Tag::custom(TagKind::custom("amount"), [msat.to_string()]),
    ];
    tags.extend(target.map(Tag::event));
    EventBuilder::new(Kind::from(9734), "zap for the job")
        .tags(tags)
        .sign_with_keys(sender)
        .expect("sign")
        .as_json()
}

/// Call our LNURL-pay callback for `msat` with zap request `zap`: (status, JSON body).
pub async fn callback(
    http: &str,
    msat: u64,
    zap: &str,
) -> (reqwest::StatusCode, serde_json::Value) {
    let response = reqwest::Client::new()
        .get(format!("{http}/lnurlp/dvmd/callback"))
        .query(&[("amount", msat.to_string()), ("nostr", zap.to_owned())])
        .send()
        .await
        .expect("callback");
    let status = response.status();
    (status, response.json().await.expect("json"))
}

/// Top up `sender`'s credit with `msat` through a zap of no particular event (LNURL callback,
/// then the dev wallet pays it), and wait until the daemon booked it.
pub async fn zap_top_up(
    http_url: &str,
    relay_url: &str,
    sender: &Keys,
    service: PublicKey,
    msat: u64,
) {
    let zap = zap_request(sender, service, None, msat, relay_url);
    let (status, body) = callback(http_url, msat, &zap).await;
    assert_eq!(status, 200, "{body}");
    dev_pay(http_url, body["pr"].as_str().expect("pr")).await;
}

/// The instant backend behind a gate: nothing generates until the test lets it, so jobs stay
/// `Running` (holding their credit) as long as the test needs.
pub struct GatedBackend {
    pub inner: dvmd::infer::instant::InstantBackend,
    pub gate: Arc<tokio::sync::Semaphore>,
}

#[async_trait::async_trait]
impl Backend for GatedBackend {
    fn name(&self) -> &str {
        "gated"
    }

    async fn count_prompt_tokens(
        &self,
        request: &dvmd::infer::GenerateRequest,
    ) -> Result<Option<u32>, dvmd::infer::InferError> {
        self.inner.count_prompt_tokens(request).await
    }

    async fn generate(
        &self,
        request: dvmd::infer::GenerateRequest,
        max_tokens: u32,
    ) -> Result<dvmd::infer::GenerateStream, dvmd::infer::InferError> {
        self.gate
            .acquire()
            .await
            .map_err(|_| dvmd::infer::InferError::Backend("gate closed".into()))?
            .forget();
        self.inner.generate(request, max_tokens).await
    }
}

/// A kind 5 deletion naming `request`, as NIP-90 clients cancel a job.
pub fn cancellation(request: &nostr_sdk::Event, by: &nostr_sdk::Keys) -> nostr_sdk::Event {
    use nostr_sdk::{EventBuilder, Kind, Tag, TagKind};
    EventBuilder::new(Kind::EventDeletion, "cancel")
        .tags([
            Tag::event(request.id),
            Tag::custom(TagKind::custom("k"), [request.kind.as_u16().to_string()]),
        ])
        .sign_with_keys(by)
        .expect("sign")
}

/// The Prometheus text of the daemon at `http_url`.
pub async fn metrics(http_url: &str) -> String {
    reqwest::get(format!("{http_url}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

/// Split `Payment a="b", c="d"` into its auth-params (quoted-strings unescaped).
pub fn payment_auth_params(value: &str) -> std::collections::HashMap<String, String> {
    let mut rest = value.strip_prefix("Payment ").expect("Payment scheme");
    let mut params = std::collections::HashMap::new();
    while let Some((name, after)) = rest.split_once('=') {
        let after = after.strip_prefix('"').expect("quoted");
        let mut text = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next().expect("closing quote") {
                (_, '\\') => text.push(chars.next().expect("escaped").1),
                (i, '"') => break i,
                (_, c) => text.push(c),
            }
        };
        params.insert(name.trim().to_owned(), text);
        rest = after[end + 1..].trim_start_matches([',', ' ']);
    }
    params
}

/// Point `file` at a Nostr Wallet Connect service: its URI goes to `data/nwc.uri`.
pub fn use_nwc(file: &mut FileConfig, data: &Path, uri: &str) {
    let uri_file = data.join("nwc.uri");
    std::fs::write(&uri_file, uri).expect("write uri");
    file.wallet.backend = "nwc".into();
    file.wallet.nwc.uri_env = None;
    file.wallet.nwc.uri_file = Some(uri_file);
}

/// Point `file` at LNbits at `url` with the invoice key `inkey` (written to `data/lnbits.inkey`).
pub fn use_lnbits(file: &mut FileConfig, data: &Path, url: &str, inkey: &str) {
    let key = data.join("lnbits.inkey");
    std::fs::write(&key, inkey).expect("write key");
    file.wallet.backend = "lnbits".into();
    file.wallet.lnbits.url = url.to_owned();
    file.wallet.lnbits.invoice_key_env = None;
    file.wallet.lnbits.invoice_key_file = Some(key);
}

/// While the daemon on `data` is down: our dev wallet settles `bolt11` (a zap's invoice), and
/// the reconcile passes are told not to look it up for an hour, so only a check that looks for
/// zaps on purpose finds it paid.
pub async fn settle_unheard(data: &Path, bolt11: &str) {
    let store = open_store(data);
    let wallet = dvmd::wallet::dev::DevWallet::open(store.clone())
        .await
        .expect("wallet");
    wallet.settle(bolt11).await.expect("settle");
    let hash = dvmd::wallet::bolt11::decode(bolt11)
        .expect("bolt11")
        .payment_hash;
    let later = nostr_sdk::Timestamp::now().as_secs() + 3600;
    dvmd::job::Book::new(store.clone())
        .defer_lookup(&hash, later)
        .await
        .expect("defer");
    store.close().await.expect("close");
}
