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
