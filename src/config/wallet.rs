//! `[wallet]`: which wallet the daemon builds, with its secrets read from files or the
//! environment (never from the TOML itself).

use std::path::PathBuf;

use super::{ConfigError, WalletSection};
use crate::wallet::lnbits::LnbitsConfig;
use crate::wallet::nwc::NwcConfig;
use crate::wallet::secret::Secret;

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

impl WalletChoice {
    /// The same wallet, its webhook URL (if any) carrying `key` as the query parameter `key`,
    /// which `/hooks/wallet` requires.
    pub fn with_webhook_key(mut self, key: &str) -> Self {
        if let Self::Lnbits(lnbits) = &mut self {
            if let Some(url) = &lnbits.webhook_url {
                lnbits.webhook_url = Some(keyed_url(url, key));
            }
        }
        self
    }
}

/// `url` with the query parameter `key` appended (any `key` it had dropped).
fn keyed_url(url: &str, key: &str) -> String {
    let Ok(mut parsed) = reqwest::Url::parse(url) else {
        // `choice` refuses such a URL when the config is read.
        return url.to_owned();
    };
    let kept: Vec<(String, String)> = parsed
        .query_pairs()
        .filter(|(name, _)| name != "key")
        .map(|(name, value)| (name.into_owned(), value.into_owned()))
        .collect();
    parsed
        .query_pairs_mut()
        .clear()
        .extend_pairs(kept)
        .append_pair("key", key);
    parsed.into()
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

/// The wallet `[wallet]` chooses, its secrets read.
pub(super) fn choice(section: &WalletSection) -> Result<WalletChoice, ConfigError> {
    let invalid = ConfigError::Invalid;
    let wallet = match section.backend.as_str() {
        "dev" => WalletChoice::Dev,
        "lnbits" => {
            let lnbits = &section.lnbits;
            let invoice_key = secret(
                "wallet.lnbits invoice key",
                &lnbits.invoice_key_env,
                &lnbits.invoice_key_file,
            )?
            .ok_or_else(|| {
                invalid("wallet.lnbits needs invoice_key_env or invoice_key_file".into())
            })?;
            let admin_key = secret(
                "wallet.lnbits admin key",
                &lnbits.admin_key_env,
                &lnbits.admin_key_file,
            )?;
            if let Some(url) = &lnbits.webhook_url {
                match reqwest::Url::parse(url) {
                    Ok(parsed) if matches!(parsed.scheme(), "http" | "https") => {}
                    _ => {
                        return Err(invalid(format!(
                            "wallet.lnbits.webhook_url: `{url}` is not an http(s) URL"
                        )))
                    }
                }
            }
            WalletChoice::Lnbits(LnbitsConfig {
                url: lnbits.url.clone(),
                invoice_key,
                admin_key,
                webhook_url: lnbits.webhook_url.clone(),
                websocket: lnbits.websocket,
            })
        }
        "nwc" => {
            let nwc = &section.nwc;
            let uri = secret("wallet.nwc uri", &nwc.uri_env, &nwc.uri_file)?
                .ok_or_else(|| invalid("wallet.nwc needs uri_env or uri_file".into()))?;
            WalletChoice::Nwc(NwcConfig {
                uri,
                timeout: std::time::Duration::from_secs(nwc.timeout_secs.max(1)),
            })
        }
        other => {
            return Err(invalid(format!(
                "wallet.backend: `{other}` is not one of dev, lnbits, nwc"
            )))
        }
    };
    Ok(wallet)
}

#[cfg(test)]
mod tests {
    use super::{choice, keyed_url, WalletChoice};
    use crate::config::WalletSection;

    #[test]
    fn a_webhook_url_that_is_no_url_is_refused_when_the_config_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("inkey");
        std::fs::write(&key, "inkey").expect("key");
        let section = |url: &str| {
            let mut section = WalletSection {
                backend: "lnbits".to_owned(),
                ..WalletSection::default()
            };
            section.lnbits.invoice_key_env = None;
            section.lnbits.invoice_key_file = Some(key.clone());
            section.lnbits.webhook_url = Some(url.to_owned());
            section
        };
        for bad in ["127.0.0.1:8080/hooks/wallet", "ftp://host/hooks/wallet"] {
            let refused = choice(&section(bad));
            assert!(
                refused.as_ref().is_err_and(|e| e.to_string().contains(bad)),
                "{bad}: {:?}",
                refused.map(|_| ())
            );
        }
        let Ok(WalletChoice::Lnbits(lnbits)) =
            choice(&section("http://127.0.0.1:8080/hooks/wallet")).map(|c| c.with_webhook_key("k"))
        else {
            panic!("an LNbits wallet");
        };
        assert_eq!(
            lnbits.webhook_url.as_deref(),
            Some("http://127.0.0.1:8080/hooks/wallet?key=k")
        );
    }

    #[test]
    fn the_webhook_url_carries_the_key_once() {
        assert_eq!(
            keyed_url("http://127.0.0.1:8080/hooks/wallet", "k1"),
            "http://127.0.0.1:8080/hooks/wallet?key=k1"
        );
        assert_eq!(
            keyed_url(
                "https://dvm.example.com/hooks/wallet?via=lnbits&key=old",
                "k2"
            ),
            "https://dvm.example.com/hooks/wallet?via=lnbits&key=k2"
        );
    }
}
