//! A real LNbits 1.6.2 on loopback, with the FakeWallet funding source: no Lightning node, no
//! network. Every wallet lives in this one LNbits, so every payment between them is an
//! "internal" payment, which is the path LNbits takes for a shop and its customers on the same
//! instance.
//!
//! `make test` installs LNbits with `.ci/lnbits.sh` and passes the executable's path in
//! `DVMD_LNBITS`. [`Lnbits::start`] runs it in a fresh temporary directory (its data folder and
//! log live there and go away on drop), creates the admin account, and hands out a client for
//! the handful of API calls the tests need. [`Lnbits::restart`] stops and starts the same
//! instance (same port, same data) to test what survives.
//!
//! Behaviour of LNbits 1.6.2 + FakeWallet that tests must expect (checked against this harness):
//! - Amounts in requests are sats, and fractions are truncated (`1.9` makes a 1 sat invoice,
//!   `0.5` a 0 msat one); amounts in answers are msat (`details.amount`, `balance`), except the
//!   websocket's `wallet_balance`, which is sats.
//! - `GET /api/v1/payments/{hash}` answers `{"paid":false,"status":"pending","preimage":null,
//!   "details":{..}}` while unpaid, `{"paid":true,"preimage":"..","details":{..}}` once paid (no
//!   top-level `status`; `details.status` is `"success"`), `{"paid":false,"status":"failed",
//!   "details":{..}}` once expired, and 404 `{"detail":"Payment does not exist."}` for a hash it
//!   does not know. `details` is only there for a key of the wallet that owns the payment; with
//!   no key (or another wallet's key) the answer has only `paid`, `status` and `preimage`.
//! - An expired invoice is only marked failed when someone looks it up (with or without a key)
//!   or at the next start; until then another wallet here can still pay it.
//! - FakeWallet keeps unpaid invoices in memory: after a restart they are `failed`, and paying
//!   one answers 520 `Payment is failed node, retrying is not possible.`
//! - Failed payments answer 520 with `{"detail":..,"status":"failed"}` (e.g. `Insufficient
//!   balance.`, `Amountless invoices not supported.`, `Internal invoice already paid.`), but
//!   paying an expired invoice that was already marked failed answers **201** with the payee's
//!   failed invoice, and nothing moves: check `status`, as [`Lnbits::pay`] does.
//! - Webhooks for internal payments are posted twice, and their body is a JSON string holding
//!   the payment's JSON.
//! - The websockets `/api/v1/ws/{inkey|adminkey}` (`{"wallet_balance":sats,"payment":{..}}`)
//!   and `/api/v1/ws/{payment_hash}` (`{"pending":false,"status":"success"}`) need no other
//!   authentication; the payee's sockets get each message twice.

// A harness: not every test uses every helper.
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long LNbits may take to answer HTTP after it is started (a first start takes 3.5-5 s on
/// 2 cores, a restart 2.5-3 s).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a graceful stop may take before the process group is killed (0.3 s is usual).
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one API call may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The admin account made by `first_install`.
const ADMIN_USERNAME: &str = "dvmd-admin";
/// Its password (LNbits wants 8-50 characters).
const ADMIN_PASSWORD: &str = "dvmd-test-password";
/// How many fresh ports a first start tries when the one it picked was taken meanwhile.
const PORT_ATTEMPTS: usize = 3;

/// The shell that runs LNbits (`sh -c WATCHDOG lnbits-watchdog LNBITS ARGS...`). It is spawned
/// as the leader of a new process group (`CommandExt::process_group(0)`: safe std, and unlike
/// `setsid(1)` it never forks, so the child's pid is the group id), and LNbits and the worker
/// process it forks inherit the group, so one signal to the group reaches them all. It kills
/// the whole group as soon as either LNbits exits or the pipe on its standard input reaches end
/// of file: the harness holds the write end, so a test process that dies without running `Drop`
/// (a timeout, a signal) does not leave LNbits behind. LNbits' parent process does not exit
/// when its worker fails to start, so start failures are also read from the log.
const WATCHDOG: &str = r#"exec 3<&0 0</dev/null
"$@" 3<&- &
app=$!
{ cat <&3 >/dev/null; kill -9 0; } &
exec 3<&-
wait "$app"
echo "lnbits-watchdog: lnbits exited with status $?" >&2
kill -9 0
"#;

/// One LNbits wallet and its keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LnbitsAccount {
    /// The wallet id (what the admin funding call takes).
    pub id: String,
    /// The admin key: pays (and can do all the invoice key can).
    pub adminkey: String,
    /// The invoice/read key: creates and looks up invoices, reads the balance.
    pub inkey: String,
}

/// A running LNbits 1.6.2 with the FakeWallet funding source, on `127.0.0.1`.
pub struct Lnbits {
    /// Base URL without a trailing slash, e.g. `http://127.0.0.1:23456`.
    pub url: String,
    /// The loopback port, kept across restarts.
    port: u16,
    /// The `lnbits` executable (from `DVMD_LNBITS`).
    exe: PathBuf,
    /// Holds `lnbits/{static,templates}` (symlinks; LNbits looks them up relative to its working
    /// directory), `data/` and `lnbits.log`.
    work: tempfile::TempDir,
    /// The bearer token of the admin account.
    token: String,
    /// The watchdog shell: its pid is the process group's id.
    child: Option<Child>,
    /// The write end of the watchdog's standard input; closing it kills the group.
    lifeline: Option<ChildStdin>,
    /// The API client: no proxy, no redirects followed (LNbits redirects until installed).
    http: reqwest::Client,
}

/// Who an API call authenticates as.
enum Auth<'a> {
    /// Nobody.
    None,
    /// A wallet, by its invoice or admin key (`X-Api-Key`).
    Key(&'a str),
    /// The admin account, by its bearer token.
    Bearer,
}

impl Lnbits {
    /// Start a fresh LNbits on a free loopback port, wait until it answers, and create its
    /// admin account. Panics (with the tail of LNbits' log) if it does not come up in 60 s.
    pub async fn start() -> Lnbits {
        let exe = PathBuf::from(std::env::var_os("DVMD_LNBITS").expect(
            "DVMD_LNBITS is not set: run `make test`, which installs LNbits with \
             .ci/lnbits.sh and exports its path (or DVMD_LNBITS=$(bash .ci/lnbits.sh) cargo test)",
        ));
        assert!(
            exe.is_file(),
            "DVMD_LNBITS={} does not exist: run `bash .ci/lnbits.sh` (or `make test`)",
            exe.display()
        );
        let package = lnbits_package_dir(&exe);
        let work = tempfile::Builder::new()
            .prefix("dvmd-lnbits-")
            .tempdir()
            .expect("create a temporary directory for LNbits");
        let shim = work.path().join("lnbits");
        std::fs::create_dir_all(&shim).expect("create the LNbits working directory");
        for dir in ["static", "templates"] {
            std::os::unix::fs::symlink(package.join(dir), shim.join(dir))
                .expect("symlink LNbits' static/templates into its working directory");
        }
        std::fs::create_dir_all(work.path().join("data")).expect("create the LNbits data folder");
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("build an HTTP client");
        let mut lnbits = Lnbits {
            url: String::new(),
            port: 0,
            exe,
            work,
            token: String::new(),
            child: None,
            lifeline: None,
            http,
        };
        // The port is free when picked but could be taken before LNbits binds it: try again.
        let mut attempt = 0;
        loop {
            attempt += 1;
            lnbits.port = pick_port();
            lnbits.url = format!("http://127.0.0.1:{}", lnbits.port);
            match lnbits.launch().await {
                Ok(()) => break,
                Err(why) if why.contains("address already in use") && attempt < PORT_ATTEMPTS => {
                    lnbits.kill_group();
                }
                Err(why) => lnbits.fail(&why),
            }
        }
        lnbits.first_install().await;
        lnbits
    }

    /// A new account with one wallet, named `name`.
    pub async fn create_wallet(&self, name: &str) -> LnbitsAccount {
        let (status, body) = self
            .request(
                reqwest::Method::POST,
                "/api/v1/account",
                Auth::Bearer,
                Some(json!({ "name": name })),
            )
            .await;
        assert_eq!(status, 200, "LNbits: create wallet {name}: {body}");
        let field = |key: &str| {
            body[key]
                .as_str()
                .unwrap_or_else(|| panic!("LNbits: new wallet without {key}: {body}"))
                .to_owned()
        };
        LnbitsAccount {
            id: field("id"),
            adminkey: field("adminkey"),
            inkey: field("inkey"),
        }
    }

    /// Credit `wallet` with `sats` out of thin air (the admin's balance adjustment).
    pub async fn fund(&self, wallet: &LnbitsAccount, sats: u64) {
        let (status, body) = self
            .request(
                reqwest::Method::PUT,
                "/users/api/v1/balance",
                Auth::Bearer,
                Some(json!({ "id": wallet.id, "amount": sats })),
            )
            .await;
        assert!(
            status == 200 && body["success"] == json!(true),
            "LNbits: fund wallet {} with {sats} sat: {status} {body}",
            wallet.id
        );
    }

    /// An invoice for `sats` with `memo` (the `d` field) on `wallet`: `(bolt11, payment_hash)`.
    pub async fn create_invoice(
        &self,
        wallet: &LnbitsAccount,
        sats: u64,
        memo: &str,
    ) -> (String, String) {
        let payment = self
            .create_invoice_json(wallet, json!({ "amount": sats, "memo": memo }))
            .await;
        let field = |key: &str| {
            payment[key]
                .as_str()
                .unwrap_or_else(|| panic!("LNbits: invoice without {key}: {payment}"))
                .to_owned()
        };
        (field("bolt11"), field("payment_hash"))
    }

    /// An invoice on `wallet` from any `POST /api/v1/payments` fields (`amount` in sats, and
    /// `memo`, `unhashed_description` (hex), `expiry` (seconds), `webhook`, ...); `out` is set
    /// to `false`. Returns the new payment's JSON (`bolt11`, `payment_hash`, `amount` in msat,
    /// ...). Panics unless LNbits answers 201.
    pub async fn create_invoice_json(&self, wallet: &LnbitsAccount, mut fields: Value) -> Value {
        fields["out"] = json!(false);
        let (status, body) = self
            .request(
                reqwest::Method::POST,
                "/api/v1/payments",
                Auth::Key(&wallet.inkey),
                Some(fields.clone()),
            )
            .await;
        assert_eq!(status, 201, "LNbits: create invoice {fields}: {body}");
        body
    }

    /// Pay `bolt11` from `wallet` and return the outgoing payment's JSON. Panics unless the
    /// payment succeeded (`status` is `"success"`).
    pub async fn pay(&self, wallet: &LnbitsAccount, bolt11: &str) -> Value {
        let (status, body) = self.try_pay(wallet, bolt11).await;
        assert!(
            (200..300).contains(&status)
                && body["status"] == json!("success")
                && body["wallet_id"] == json!(wallet.id),
            "LNbits: pay {bolt11} from wallet {}: {status} {body}",
            wallet.id
        );
        body
    }

    /// Try to pay `bolt11` from `wallet`: the HTTP status and body, whatever they are. A
    /// refusal is 520 `{"detail":..,"status":"failed"}`; a 201 is not always a success.
    pub async fn try_pay(&self, wallet: &LnbitsAccount, bolt11: &str) -> (u16, Value) {
        self.request(
            reqwest::Method::POST,
            "/api/v1/payments",
            Auth::Key(&wallet.adminkey),
            Some(json!({ "out": true, "bolt11": bolt11 })),
        )
        .await
    }

    /// `GET /api/v1/payments/{payment_hash}` with `key` (an invoice or admin key, or none):
    /// the HTTP status and body.
    pub async fn payment(&self, key: Option<&str>, payment_hash: &str) -> (u16, Value) {
        let auth = key.map_or(Auth::None, Auth::Key);
        self.request(
            reqwest::Method::GET,
            &format!("/api/v1/payments/{payment_hash}"),
            auth,
            None,
        )
        .await
    }

    /// Whether LNbits reports `payment_hash` paid (`paid: true`), as `wallet` sees it.
    pub async fn is_paid(&self, wallet: &LnbitsAccount, payment_hash: &str) -> bool {
        let (status, body) = self.payment(Some(&wallet.inkey), payment_hash).await;
        assert_eq!(status, 200, "LNbits: payment {payment_hash}: {body}");
        body["paid"]
            .as_bool()
            .unwrap_or_else(|| panic!("LNbits: payment {payment_hash} without `paid`: {body}"))
    }

    /// The balance of `wallet`, msat (`GET /api/v1/wallet`).
    pub async fn balance_msat(&self, wallet: &LnbitsAccount) -> u64 {
        let (status, body) = self
            .request(
                reqwest::Method::GET,
                "/api/v1/wallet",
                Auth::Key(&wallet.inkey),
                None,
            )
            .await;
        assert_eq!(
            status, 200,
            "LNbits: balance of wallet {}: {body}",
            wallet.id
        );
        body["balance"]
            .as_u64()
            .unwrap_or_else(|| panic!("LNbits: wallet without a balance: {body}"))
    }

    /// The websocket URL that streams events for `key_or_hash` (an invoice or admin key, or a
    /// payment hash).
    pub fn ws_url(&self, key_or_hash: &str) -> String {
        format!("ws://127.0.0.1:{}/api/v1/ws/{key_or_hash}", self.port)
    }

    /// The admin account's bearer token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// LNbits' data folder (its SQLite database).
    pub fn data_dir(&self) -> PathBuf {
        self.work.path().join("data")
    }

    /// Where LNbits' standard output and error go (appended across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.work.path().join("lnbits.log")
    }

    /// The last `lines` lines of LNbits' log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Whether LNbits' process group is running (started and not stopped).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Stop LNbits gracefully (SIGTERM to its process group, SIGKILL after 20 s) and wait until
    /// every process of the group is gone and the port is free. No-op when stopped.
    pub async fn stop(&mut self) {
        let Some(pgid) = self.child.as_ref().map(Child::id) else {
            return;
        };
        signal_group(pgid, "TERM");
        let deadline = Instant::now() + STOP_TIMEOUT;
        while group_alive(pgid, self.child.as_mut()) {
            if Instant::now() >= deadline {
                signal_group(pgid, "KILL");
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.reap();
    }

    /// Stop LNbits and start it again on the same port with the same data, wait until it
    /// answers, and log in again. Panics (with the log tail) if it does not come back.
    pub async fn restart(&mut self) {
        self.stop().await;
        if let Err(why) = self.launch().await {
            self.fail(&why);
        }
        self.login().await;
    }

    /// Spawn LNbits (through the watchdog) and wait until it answers HTTP. `Err` carries why
    /// it did not; the group may still be running then.
    async fn launch(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "LNbits is already running");
        let log_path = self.log_path();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("open the LNbits log");
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(WATCHDOG)
            .arg("lnbits-watchdog")
            .arg(&self.exe)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .current_dir(self.work.path())
            .env_clear()
            .envs(std::env::vars_os().filter(|(name, _)| {
                ["PATH", "HOME", "TMPDIR", "LANG", "LC_ALL"]
                    .iter()
                    .any(|keep| name == keep)
            }))
            .envs(self.env())
            .stdin(Stdio::piped())
            .stdout(log.try_clone().expect("clone the LNbits log handle"))
            .stderr(log)
            .process_group(0);
        let mut child = command.spawn().expect("spawn sh to run LNbits");
        self.lifeline = child.stdin.take();
        self.child = Some(child);

        let started = Instant::now();
        let probe = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("build an HTTP client");
        loop {
            // LNbits' parent process outlives a worker that failed to start: read the log.
            // Ready is an HTTP answer (307 to /first_install before the admin account exists)
            // once this LNbits says it listens: not some other server that took the port.
            let new_log = read_from(&log_path, log_start);
            if new_log.contains("Uvicorn running on")
                && probe
                    .get(format!("{}/api/v1/health", self.url))
                    .send()
                    .await
                    .is_ok()
            {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("LNbits exited ({status}) before answering"));
                }
            }
            if new_log.contains("address already in use") {
                return Err(format!(
                    "port {} is in use: address already in use",
                    self.port
                ));
            }
            if new_log.contains("Traceback (most recent call last)")
                || new_log.contains("Application startup failed")
            {
                return Err("LNbits failed to start".to_owned());
            }
            if started.elapsed() > READY_TIMEOUT {
                return Err(format!(
                    "LNbits did not answer on {} within {READY_TIMEOUT:?}",
                    self.url
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The environment LNbits runs with: FakeWallet, SQLite in our data folder, nothing that
    /// reaches outside the machine, and callbacks to loopback allowed (dvmd's webhook listens
    /// there). With the admin UI on (the default), LNbits copies these into its database on
    /// first start and reads them from there afterwards.
    fn env(&self) -> Vec<(String, String)> {
        [
            ("LNBITS_BACKEND_WALLET_CLASS", "FakeWallet".to_owned()),
            ("LNBITS_DATA_FOLDER", self.data_dir().display().to_string()),
            ("LNBITS_BASEURL", format!("{}/", self.url)),
            ("LNBITS_PRICE_AGGREGATOR_ENABLED", "false".to_owned()),
            ("LNBITS_EXCHANGE_RATE_PROVIDERS", "[]".to_owned()),
            ("LNBITS_EXTENSIONS_MANIFESTS", "[]".to_owned()),
            ("LNBITS_WASM_EXTENSIONS_MANIFESTS", "[]".to_owned()),
            ("LNBITS_CALLBACK_URL_RULES", "[]".to_owned()),
            ("LNBITS_CALLBACK_ALLOW_PRIVATE_IPS", "true".to_owned()),
            ("LNBITS_LNURL_ALLOW_PRIVATE_IPS", "true".to_owned()),
            ("LNBITS_RATE_LIMIT_NO", "100000".to_owned()),
            ("AUTH_HTTPS_ONLY", "false".to_owned()),
            ("PYTHONUNBUFFERED", "1".to_owned()),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect()
    }

    /// Create the admin account; every path redirects to the install page until then.
    async fn first_install(&mut self) {
        let (status, body) = self
            .request(
                reqwest::Method::PUT,
                "/api/v1/auth/first_install",
                Auth::None,
                Some(json!({
                    "username": ADMIN_USERNAME,
                    "password": ADMIN_PASSWORD,
                    "password_repeat": ADMIN_PASSWORD,
                })),
            )
            .await;
        self.token = bearer_token(status, &body, "first install");
    }

    /// Log in as the admin account again (the old token would also still be valid: the
    /// signing key is kept in the database).
    async fn login(&mut self) {
        let (status, body) = self
            .request(
                reqwest::Method::POST,
                "/api/v1/auth",
                Auth::None,
                Some(json!({ "username": ADMIN_USERNAME, "password": ADMIN_PASSWORD })),
            )
            .await;
        self.token = bearer_token(status, &body, "login");
    }

    /// One API call: the HTTP status and the body as JSON (a JSON string if it is not JSON).
    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        auth: Auth<'_>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.url));
        request = match auth {
            Auth::None => request,
            Auth::Key(key) => request.header("X-Api-Key", key),
            Auth::Bearer => request.bearer_auth(&self.token),
        };
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("LNbits: {method} {path}: {e}\n{}", self.log_tail(40)));
        let status = response.status().as_u16();
        let text = response
            .text()
            .await
            .unwrap_or_else(|e| panic!("LNbits: {method} {path}: reading the answer: {e}"));
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    /// Panic with `why` and the tail of the log, after killing the process group.
    fn fail(&mut self, why: &str) -> ! {
        self.kill_group();
        panic!(
            "{why}\n--- last lines of {} ---\n{}",
            self.log_path().display(),
            self.log_tail(60)
        );
    }

    /// SIGKILL the process group and reap the watchdog.
    fn kill_group(&mut self) {
        if let Some(pgid) = self.child.as_ref().map(Child::id) {
            signal_group(pgid, "KILL");
            let deadline = Instant::now() + Duration::from_secs(5);
            while group_alive(pgid, self.child.as_mut()) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.reap();
    }

    /// Wait for the watchdog (already dead or dying) and close its lifeline.
    fn reap(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
        self.lifeline = None;
    }
}

impl Drop for Lnbits {
    /// Kill the whole process group at once; the temporary directory goes after.
    fn drop(&mut self) {
        self.kill_group();
    }
}

/// `bin/lnbits` sits in a venv: find `lib/python3.X/site-packages/lnbits` next to it.
fn lnbits_package_dir(exe: &Path) -> PathBuf {
    let venv = exe
        .parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("{} is not in a venv's bin/", exe.display()));
    let lib = venv.join("lib");
    let found = std::fs::read_dir(&lib)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("python"))
        .map(|entry| entry.path().join("site-packages").join("lnbits"))
        .find(|package| package.join("static").is_dir() && package.join("templates").is_dir());
    found.unwrap_or_else(|| {
        panic!(
            "no lnbits package with static/ and templates/ under {}: rerun `bash .ci/lnbits.sh`",
            lib.display()
        )
    })
}

/// A free loopback port below the kernel's ephemeral range, so that no outgoing connection
/// takes it between a stop and a restart.
fn pick_port() -> u16 {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768)
        .max(12000);
    let span = u64::from(ephemeral_low - 10000);
    for _ in 0..200 {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        let offset = u16::try_from(hasher.finish() % span).expect("span fits in u16");
        let port = 10000 + offset;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between 10000 and {ephemeral_low}");
}

/// Send SIGsig to every process in group `pgid`.
fn signal_group(pgid: u32, sig: &str) {
    // The shell's builtin `kill` (no procps needed). The group may already be gone: fine.
    let _ = Command::new("sh")
        .args(["-c", r#"kill -s "$0" -- "-$1""#, sig, &pgid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Whether any process of group `pgid` is still running (zombies do not count). Reaps the
/// watchdog (`leader`) when it has exited.
fn group_alive(pgid: u32, leader: Option<&mut Child>) -> bool {
    if let Some(leader) = leader {
        let _ = leader.try_wait();
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|entry| {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            return false;
        };
        // pid (comm) state ppid pgrp ...; comm may contain spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return false;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        fields.len() > 2 && fields[0] != "Z" && fields[2] == pgid.to_string()
    })
}

/// What `path` holds from byte `offset` on (lossy UTF-8).
fn read_from(path: &Path, offset: u64) -> String {
    let mut bytes = Vec::new();
    if let Ok(mut file) = File::open(path) {
        if file.seek(SeekFrom::Start(offset)).is_ok() {
            let _ = file.read_to_end(&mut bytes);
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The `access_token` of a successful auth answer.
fn bearer_token(status: u16, body: &Value, what: &str) -> String {
    assert_eq!(status, 200, "LNbits: {what}: {body}");
    body["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("LNbits: {what}: no access_token in {body}"))
        .to_owned()
}
