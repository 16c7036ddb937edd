//! The service's secrets in the data directory, each a file of mode 0600: its Nostr key
//! (created by `dvmd init`, loaded by `dvmd run`) and the L402 root key that signs macaroons
//! (created on first start). A secret never reaches a log or an error message.

use std::io::Write;
use std::path::{Path, PathBuf};

use nostr_sdk::{Keys, SecretKey};

/// File name of the key inside the data directory.
pub const KEY_FILE: &str = "service.key";
/// File name of the L402 root key inside the data directory.
pub const L402_ROOT_KEY_FILE: &str = "l402-root.key";
/// The operator's token for the running daemon's `/admin/*` endpoints, in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// The loopback URL of the running daemon's HTTP listener, in the data directory.
pub const ADMIN_URL_FILE: &str = "admin.url";

/// Errors of key handling (never carrying the key).
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// No key file.
    #[error("no service key at {0}; run `dvmd init` first")]
    Missing(PathBuf),
    /// The file could not be read or written.
    #[error("secret file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file does not hold a key.
    #[error("secret file {0} does not hold a key (hex, or nsec for the service key)")]
    Invalid(PathBuf),
    /// The admin token file holds too short a token.
    #[error(
        "admin token file {0} holds fewer than 32 characters; delete it and dvmd makes a new one"
    )]
    ShortToken(PathBuf),
    /// The file is readable by others.
    #[error("secret file {0} is readable by group or others; chmod 600 it")]
    Permissions(PathBuf),
}

/// The key file path in `data_dir`.
pub fn key_path(data_dir: &Path) -> PathBuf {
    data_dir.join(KEY_FILE)
}

/// Create `data_dir` and a new key file in it, unless one exists. Returns the keys and whether
/// they were created.
pub fn init(data_dir: &Path) -> Result<(Keys, bool), IdentityError> {
    let path = key_path(data_dir);
    if path.exists() {
        return Ok((load(data_dir)?, false));
    }
    let io = |source| IdentityError::Io {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(data_dir).map_err(io)?;
    let keys = Keys::generate();
    write_private(&path, &keys.secret_key().to_secret_hex())?;
    Ok((keys, true))
}

/// Write `secret` and a newline to a new file of mode 0600 at `path`, synced.
fn write_private(path: &Path, secret: &str) -> Result<(), IdentityError> {
    let io = |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(io)?;
    writeln!(file, "{secret}").map_err(io)?;
    file.sync_all().map_err(io)
}

/// Load the key from `data_dir`.
pub fn load(data_dir: &Path) -> Result<Keys, IdentityError> {
    let path = key_path(data_dir);
    let text = read_private(&path)?;
    let secret = SecretKey::parse(text.trim()).map_err(|_| IdentityError::Invalid(path))?;
    Ok(Keys::new(secret))
}

/// The key the wallet's webhooks must carry (`/hooks/wallet?key=...`): 32 hex digits derived
/// from the service's secret key, so it is the same across restarts (invoices issued before one
/// still carry it) and needs no file of its own. dvmd adds it to the webhook URL it gives the
/// wallet with each invoice; a post without it is refused before it can become a hint.
pub fn webhook_key(keys: &Keys) -> String {
    use bitcoin::hashes::{sha256, Hash, HashEngine, Hmac, HmacEngine};
    let mut engine = HmacEngine::<sha256::Hash>::new(keys.secret_key().as_secret_bytes());
    engine.input(b"dvmd wallet webhook");
    let mac = Hmac::<sha256::Hash>::from_engine(engine).to_byte_array();
    hex::encode(&mac[..16])
}

/// The L402 root key in `data_dir` (32 bytes), created on first use. Losing it invalidates
/// every token issued (their value stays on the ledger, unspendable without a credential).
pub fn l402_root_key(data_dir: &Path) -> Result<[u8; 32], IdentityError> {
    let path = data_dir.join(L402_ROOT_KEY_FILE);
    if !path.exists() {
        let key: [u8; 32] = rand::random();
        write_private(&path, &hex::encode(key))?;
        return Ok(key);
    }
    let text = read_private(&path)?;
    let mut key = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut key).map_err(|_| IdentityError::Invalid(path))?;
    Ok(key)
}

/// The shortest admin token accepted: an operator's own must be as hard to guess as the one
/// dvmd makes (64 hex digits) is, near enough. An empty file let in any request that sent no
/// token at all.
const MIN_ADMIN_TOKEN_CHARS: usize = 32;

/// The operator's token for the running daemon's `/admin/*` endpoints, created on first use
/// (mode 0600): whoever can read the data directory is the operator. A token file with fewer
/// than 32 characters is refused.
pub fn admin_token(data_dir: &Path) -> Result<String, IdentityError> {
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    if !path.exists() {
        let token = hex::encode(rand::random::<[u8; 32]>());
        write_private(&path, &token)?;
        return Ok(token);
    }
    let token = read_private(&path)?.trim().to_owned();
    if token.chars().count() < MIN_ADMIN_TOKEN_CHARS {
        return Err(IdentityError::ShortToken(path));
    }
    Ok(token)
}

/// Read a secret file that only its owner may read.
fn read_private(path: &Path) -> Result<String, IdentityError> {
    let path = path.to_owned();
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(IdentityError::Missing(path))
        }
        Err(source) => return Err(IdentityError::Io { path, source }),
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path)
            .map_err(|source| IdentityError::Io {
                path: path.clone(),
                source,
            })?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(IdentityError::Permissions(path));
        }
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_creates_a_private_key_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let (keys, created) = init(&data).expect("init");
        assert!(created);
        let (again, created) = init(&data).expect("init again");
        assert!(!created);
        assert_eq!(keys.public_key(), again.public_key());
        assert_eq!(load(&data).expect("load").public_key(), keys.public_key());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(key_path(&data))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
            std::fs::set_permissions(key_path(&data), std::fs::Permissions::from_mode(0o644))
                .expect("chmod");
            assert!(matches!(load(&data), Err(IdentityError::Permissions(_))));
        }
    }

    #[test]
    fn an_admin_token_is_made_once_and_a_short_one_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = admin_token(dir.path()).expect("created");
        assert_eq!(first.len(), 64);
        assert_eq!(admin_token(dir.path()).expect("loaded"), first);
        for short in ["", "\n", "password"] {
            let path = dir.path().join(ADMIN_TOKEN_FILE);
            std::fs::remove_file(&path).expect("remove");
            write_private(&path, short).expect("write");
            assert!(
                matches!(admin_token(dir.path()), Err(IdentityError::ShortToken(_))),
                "{short:?}"
            );
        }
    }

    #[test]
    fn the_l402_root_key_is_made_once_and_kept_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = l402_root_key(dir.path()).expect("created");
        assert_eq!(l402_root_key(dir.path()).expect("loaded"), first);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let path = dir.path().join(L402_ROOT_KEY_FILE);
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
            assert!(matches!(
                l402_root_key(dir.path()),
                Err(IdentityError::Permissions(_))
            ));
        }
    }

    #[test]
    fn errors_never_show_the_secret() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (keys, _) = init(dir.path()).expect("init");
        let secret = keys.secret_key().to_secret_hex();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(key_path(dir.path()), std::fs::Permissions::from_mode(0o644))
                .expect("chmod");
        }
        if let Err(e) = load(dir.path()) {
            assert!(!e.to_string().contains(&secret));
            assert!(!format!("{e:?}").contains(&secret));
        }
        assert!(matches!(
            load(&dir.path().join("none")),
            Err(IdentityError::Missing(_))
        ));
    }

    #[test]
    fn the_webhook_key_is_the_identitys_own_and_the_same_every_time() {
        let keys = nostr_sdk::Keys::generate();
        let key = super::webhook_key(&keys);
        assert_eq!(key.len(), 32);
        assert!(key.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(key, super::webhook_key(&keys));
        assert_ne!(key, super::webhook_key(&nostr_sdk::Keys::generate()));
    }
}
