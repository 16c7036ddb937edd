//! The daemon under load: started as a child process beside the stub, or one already running;
//! and what the bench reads of its process (RSS, CPU time).

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nostr_sdk::{Keys, PublicKey};

use super::LoadOptions;
use crate::bench::stub::StubServer;
use crate::bench::BenchError;

/// The daemon under test.
pub(super) struct Target {
    pub(super) relay: String,
    pub(super) http: String,
    pub(super) service: PublicKey,
    pub(super) child: Option<Child>,
    _stub: Option<StubServer>,
    data: Option<PathBuf>,
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
        if let Some(data) = &self.data {
            let _ = std::fs::remove_dir_all(data);
        }
    }
}

impl Target {
    /// What the started daemon's data directory holds on disk (its sled store), bytes.
    pub(super) fn store_bytes(&self) -> Option<u64> {
        fn size(path: &std::path::Path) -> u64 {
            let Ok(meta) = std::fs::symlink_metadata(path) else {
                return 0;
            };
            if !meta.is_dir() {
                return meta.len();
            }
            std::fs::read_dir(path)
                .map(|entries| entries.flatten().map(|e| size(&e.path())).sum())
                .unwrap_or(0)
        }
        self.data.as_deref().map(size)
    }

    /// Make `npub` a `known` customer through the daemon's admin door.
    pub(super) async fn make_known(
        &self,
        http: &reqwest::Client,
        npub: &PublicKey,
    ) -> Result<(), BenchError> {
        let data = self
            .data
            .as_ref()
            .ok_or("a flood needs the bench's own daemon")?;
        let token =
            std::fs::read_to_string(data.join("data").join(crate::identity::ADMIN_TOKEN_FILE))?;
        let response = http
            .post(format!("{}/admin/trust", self.http))
            .bearer_auth(token.trim())
            .json(&serde_json::json!({ "npub": npub.to_hex(), "tier": "known" }))
            .send()
            .await?;
        if !response.status().is_success() {
            return Err(format!(
                "the daemon refused to make {npub} known: {}",
                response.status()
            )
            .into());
        }
        Ok(())
    }
}

/// Start the stub and `dvmd run --dev` as a child process on free ports.
pub(super) async fn start_daemon(options: &LoadOptions) -> Result<Target, BenchError> {
    let stub = StubServer::start().await?;
    let data = std::env::temp_dir().join(format!("dvmd-bench-load-{}", std::process::id()));
    std::fs::create_dir_all(&data)?;
    let pricing = if options.paid {
        ""
    } else {
        "[pricing]\nbase_fee_msat = 0\nprompt_msat_per_1k_tokens = 0\ncompletion_msat_per_1k_tokens = 0\n"
    };
    // A flood meets the default limits for new keys; otherwise the bench's own (new) customers
    // would be held to them.
    let trust = if options.flood > 0 {
        ""
    } else {
        "[trust]\nnew_requests_per_minute = 4000000000\n"
    };
    let config = format!(
        // Each bench customer posts back to back, far over a real customer's rate.
        "[service]\nworkers = {}\nrequests_per_npub_per_minute = 4000000000\n{trust}{pricing}[infer]\nbackend = \"openai\"\n[infer.openai]\nbase_url = \"{}\"\nmodel = \"stub\"\n[lnurl]\nenabled = false\n",
        options.workers,
        stub.base_url(),
    );
    let config = with_extra(
        &config,
        &std::env::var("DVMD_BENCH_EXTRA_CONFIG").unwrap_or_default(),
    )?;
    let config_path = data.join("dvmd.toml");
    std::fs::write(&config_path, config)?;
    let child = spawn_daemon(&config_path, &data.join("data"))?;
    let mut target = Target {
        relay: String::new(),
        http: String::new(),
        service: Keys::generate().public_key(),
        child: Some(child),
        _stub: Some(stub),
        data: Some(data),
    };
    let stdout = target
        .child
        .as_mut()
        .and_then(|c| c.stdout.take())
        .ok_or("no stdout from the daemon")?;
    // The daemon's first line names its listeners; a wrapper may print lines before it.
    let line = tokio::task::spawn_blocking(move || {
        let mut reader = std::io::BufReader::new(stdout);
        let mut line = String::new();
        for _ in 0..100 {
            line.clear();
            if reader.read_line(&mut line)? == 0 || line.contains("relay=") {
                break;
            }
        }
        Ok::<_, std::io::Error>(line)
    })
    .await??;
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(&format!("{name}=")))
            .map(str::to_owned)
            .ok_or_else(|| format!("the daemon did not start (first line {line:?})"))
    };
    target.relay = field("relay")?;
    target.http = field("http")?;
    target.service = PublicKey::from_hex(&field("pubkey")?)?;
    Ok(target)
}

/// `config` with the TOML `extra` laid over it, key by key (so `extra` may name a table the
/// bench's own config has, such as `[trust]`).
fn with_extra(config: &str, extra: &str) -> Result<String, BenchError> {
    fn lay(base: &mut toml::Table, over: toml::Table) {
        for (key, value) in over {
            match (base.get_mut(&key), value) {
                (Some(toml::Value::Table(inner)), toml::Value::Table(over)) => lay(inner, over),
                (_, value) => {
                    base.insert(key, value);
                }
            }
        }
    }
    let mut base: toml::Table = config.parse()?;
    let extra: toml::Table = extra
        .parse()
        .map_err(|e| format!("DVMD_BENCH_EXTRA_CONFIG: {e}"))?;
    lay(&mut base, extra);
    Ok(toml::to_string(&base)?)
}

/// `DVMD_BENCH_WRAPPER` (say `heaptrack` or `perf record -g --`) is put in front of the
/// daemon's command line, to profile it from its first allocation.
fn spawn_daemon(config: &Path, data: &Path) -> Result<Child, BenchError> {
    let wrapper = std::env::var("DVMD_BENCH_WRAPPER").unwrap_or_default();
    let mut words = wrapper.split_whitespace();
    let exe = std::env::current_exe()?;
    let mut command = match words.next() {
        Some(program) => {
            let mut command = Command::new(program);
            command.args(words).arg(exe);
            command
        }
        None => Command::new(exe),
    };
    Ok(command
        .args(["run", "--dev", "--config"])
        .arg(config)
        .arg("--data-dir")
        .arg(data)
        .args([
            "--relay-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .env("DVMD_LOG", "warn,nostr_relay_pool=error")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?)
}

/// A daemon already running: its pubkey comes from `/healthz`.
pub(super) async fn attach(relay: &str, http: &str) -> Result<Target, BenchError> {
    let health: serde_json::Value = reqwest::get(format!("{http}/healthz"))
        .await?
        .json()
        .await?;
    let pubkey = health["pubkey"].as_str().ok_or("no pubkey in /healthz")?;
    Ok(Target {
        relay: relay.to_owned(),
        http: http.trim_end_matches('/').to_owned(),
        service: PublicKey::from_hex(pubkey)?,
        child: None,
        _stub: None,
        data: None,
    })
}

/// Resident memory of a process, bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Rss {
    /// All of it (`VmRSS`).
    pub(super) total: u64,
    /// Anonymous pages: the heap (the allocator's resident pages), stacks.
    pub(super) anon: u64,
    /// Pages of mapped files: mostly the binary's code, faulted in as paths first run.
    pub(super) file: u64,
}

/// Resident memory of `pid` (Linux).
pub(super) fn rss_bytes(pid: u32) -> Option<Rss> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(kb * 1024)
    };
    Some(Rss {
        total: field("VmRSS:")?,
        anon: field("RssAnon:").unwrap_or(0),
        file: field("RssFile:").unwrap_or(0),
    })
}

/// User + system CPU seconds of `pid` so far (Linux).
pub(super) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every Linux dvmd runs on.
    Some((utime + stime) / 100.0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn extra_config_is_laid_over_the_benchs_own_table_by_table() {
        let merged = super::with_extra(
            "[trust]\nnew_requests_per_minute = 5\n[service]\nworkers = 8\n",
            "[trust]\npublish_job_labels = false\n",
        )
        .expect("merge");
        let merged: toml::Table = merged.parse().expect("toml");
        assert_eq!(
            merged["trust"]["new_requests_per_minute"].as_integer(),
            Some(5)
        );
        assert_eq!(merged["trust"]["publish_job_labels"].as_bool(), Some(false));
        assert_eq!(merged["service"]["workers"].as_integer(), Some(8));
    }
}
