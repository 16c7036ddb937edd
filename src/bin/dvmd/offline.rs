//! What the subcommands share: loading the configuration, the store of a stopped daemon, and
//! calls to the admin endpoints of a running one.

use dvmd::config::{self, Config, FileConfig, Overrides, RelaysFile};
use dvmd::job::Book;
use dvmd::store::Store;
use dvmd::wallet;

use crate::args::{Files, TrustCommand};

pub(crate) fn load(files: &Files, flags: Overrides) -> anyhow::Result<Config> {
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

/// The configuration for commands that do not talk to relays (no relays.toml needed).
pub(crate) fn load_offline(files: &Files) -> anyhow::Result<Config> {
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
pub(crate) async fn withdraw_as_operator(
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
pub(crate) async fn trust(command: TrustCommand) -> anyhow::Result<serde_json::Value> {
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
pub(crate) fn open_store(files: &Files) -> anyhow::Result<Store> {
    let config = load_offline(files)?;
    Ok(Store::open(&config.data_dir.join("store"))?)
}
