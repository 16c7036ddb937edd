//! L402 (formerly LSAT): pay an invoice, present the macaroon and the preimage. Pure: no IO.
//!
//! A challenge is `WWW-Authenticate: L402 macaroon="<base64>", invoice="<bolt11>"` (and the
//! same with `LSAT`, which old clients read). The credential is
//! `Authorization: L402 <base64 macaroon>:<hex preimage>` (or `LSAT`, or `Bearer`, so an OpenAI
//! SDK can pass it as its API key).
//!
//! The macaroon's identifier is laid out as aperture's (`lsat.Identifier`): a big-endian
//! `u16` version (0), the 32-byte payment hash, a 32-byte random token id. Its caveats, all
//! first-party `name=value`, are the ones aperture writes for a service (`services=dvmd:0`)
//! and dvmd's own: `dvmd_valid_until` (unix seconds), `dvmd_model`, `dvmd_budget_msat` (the
//! most one call may cost: the call bids the lowest such caveat, so it is quoted, reserved and
//! charged within it). A holder may add caveats to narrow a token (a lower budget, an earlier
//! expiry); a credential is accepted only if every caveat is one of these and holds.

pub mod macaroon;

use base64::Engine;
use bitcoin::hashes::{sha256, Hash};

pub use macaroon::{Macaroon, MacaroonError};

use crate::wallet::PaymentHash;

/// The service name in the `services` caveat.
pub const SERVICE: &str = "dvmd";
/// The identifier version aperture writes.
const ID_VERSION: u16 = 0;
/// Identifier length: version, payment hash, token id.
pub const ID_LEN: usize = 2 + 32 + 32;

/// A macaroon identifier, as aperture lays it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identifier {
    /// The payment hash the token is paid by (and the account it spends from).
    pub payment_hash: PaymentHash,
    /// A random id for this token.
    pub token_id: [u8; 32],
}

impl Identifier {
    /// A fresh identifier for `payment_hash`.
    pub fn new(payment_hash: PaymentHash) -> Self {
        Self {
            payment_hash,
            token_id: rand::random(),
        }
    }

    /// The 66 bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ID_LEN);
        out.extend_from_slice(&ID_VERSION.to_be_bytes());
        out.extend_from_slice(&self.payment_hash.0);
        out.extend_from_slice(&self.token_id);
        out
    }

    /// Read 66 bytes of version 0.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != ID_LEN || bytes[..2] != ID_VERSION.to_be_bytes() {
            return None;
        }
        Some(Self {
            payment_hash: PaymentHash(bytes[2..34].try_into().ok()?),
            token_id: bytes[34..].try_into().ok()?,
        })
    }
}

/// What a new token allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Unix seconds after which it is refused.
    pub valid_until: u64,
    /// The model it may call.
    pub model: String,
    /// The most one call may cost, msat.
    pub budget_msat: u64,
}

/// Caveats [`mint`] writes; any after them were added by a holder (a macaroon's caveats can
/// only be appended to).
pub const MINTED_CAVEATS: usize = 4;

/// Mint the macaroon of a token paid by `id.payment_hash`.
pub fn mint(root_key: &[u8], id: &Identifier, grant: &Grant) -> Macaroon {
    let mut mac = Macaroon::mint(root_key, id.to_bytes(), Some(SERVICE.to_owned()));
    mac.add_caveat(format!("services={SERVICE}:0"));
    mac.add_caveat(format!("{SERVICE}_valid_until={}", grant.valid_until));
    mac.add_caveat(format!("{SERVICE}_model={}", grant.model));
    mac.add_caveat(format!("{SERVICE}_budget_msat={}", grant.budget_msat));
    mac
}

/// The `WWW-Authenticate` values of a challenge, `LSAT` first (old clients read only the
/// first) and `L402`, with the same macaroon and invoice.
pub fn challenges(mac: &Macaroon, bolt11: &str) -> [String; 2] {
    let mac = base64::engine::general_purpose::STANDARD.encode(mac.to_bytes());
    ["LSAT", "L402"].map(|scheme| format!("{scheme} macaroon=\"{mac}\", invoice=\"{bolt11}\""))
}

/// A credential as presented: the macaroon and the preimage it claims paid for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// The macaroon.
    pub macaroon: Macaroon,
    /// Its identifier, read.
    pub id: Identifier,
    /// The preimage presented.
    pub preimage: [u8; 32],
}

/// Why a credential is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// Not `<base64 macaroon>:<64 hex digits>`, or not a macaroon this reads.
    #[error("malformed L402 credential: {0}")]
    Malformed(String),
    /// The identifier is not aperture's version 0 layout.
    #[error("the macaroon's identifier is not an L402 token id")]
    Identifier,
    /// The signature is not ours.
    #[error("the macaroon was not minted here, or was altered")]
    Signature,
    /// sha256(preimage) is not the payment hash.
    #[error("the preimage does not pay this macaroon's invoice")]
    Preimage,
    /// A caveat this service does not know (refused: it might mean a restriction).
    #[error("caveat `{0}` is not understood here")]
    UnknownCaveat(String),
    /// A caveat that does not hold for this call.
    #[error("caveat `{caveat}` does not hold: {reason}")]
    Caveat {
        /// The caveat.
        caveat: String,
        /// Why not.
        reason: String,
    },
}

/// Read an `Authorization` value: `L402`, `LSAT` or `Bearer`, then `<macaroon>:<preimage>`.
/// `None` when the scheme is none of these (another kind of credential).
pub fn parse_authorization(value: &str) -> Option<Result<Credential, CredentialError>> {
    let (scheme, token) = value.trim().split_once(' ')?;
    if !["l402", "lsat", "bearer"].contains(&scheme.to_ascii_lowercase().as_str()) {
        return None;
    }
    Some(parse_token(token.trim()))
}

/// Read `<base64 macaroon>:<hex preimage>`.
pub fn parse_token(token: &str) -> Result<Credential, CredentialError> {
    let malformed = |why: &str| CredentialError::Malformed(why.to_owned());
    let (mac, preimage) = token
        .rsplit_once(':')
        .ok_or_else(|| malformed("expected <macaroon>:<preimage>"))?;
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(preimage, &mut bytes)
        .map_err(|_| malformed("the preimage is not 64 hex digits"))?;
    let raw = decode_base64(mac).ok_or_else(|| malformed("the macaroon is not base64"))?;
    let macaroon =
        Macaroon::from_bytes(&raw).map_err(|e| CredentialError::Malformed(e.to_string()))?;
    let id = Identifier::from_bytes(&macaroon.identifier).ok_or(CredentialError::Identifier)?;
    Ok(Credential {
        macaroon,
        id,
        preimage: bytes,
    })
}

/// Standard or URL-safe base64, padded or not (clients differ).
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(text).ok())
}

/// What a call asks of a token.
#[derive(Debug, Clone, Copy)]
pub struct Use<'a> {
    /// Unix seconds now.
    pub now: u64,
    /// The model called.
    pub model: &'a str,
    /// The call's quote, msat; `None` when the token pays for no call (its balance or jobs
    /// read, or what it holds withdrawn). Then the `valid_until` and `model` caveats do not
    /// apply: they bound what the token buys, and what it holds stays its payer's after it
    /// stops buying calls (an expired token, a model the operator changed).
    pub quote_msat: Option<u64>,
}

impl Credential {
    /// Whether a holder narrowed this token (added caveats to what was minted): it spends
    /// within them, but what it holds leaves only by the token as it was sold, so a holder who
    /// hands on a narrowed token (a budget a call, an earlier expiry) hands on no more than
    /// the calls it allows.
    pub fn narrowed(&self) -> bool {
        self.macaroon.caveats.len() > MINTED_CAVEATS
    }

    /// The lowest `dvmd_budget_msat` caveat's value: the most one call may cost, if any caveat
    /// says. (One that is not a number is refused by [`Credential::verify`].)
    pub fn budget_msat(&self) -> Option<u64> {
        let name = format!("{SERVICE}_budget_msat");
        self.macaroon
            .caveats
            .iter()
            .filter_map(|caveat| {
                let (n, value) = std::str::from_utf8(caveat).ok()?.split_once('=')?;
                (n.trim() == name).then(|| value.trim().parse::<u64>().ok())?
            })
            .min()
    }

    /// Check the signature against `root_key`, the preimage against the payment hash, and every
    /// caveat against `call`. Says nothing about whether the invoice was paid: the caller asks
    /// the book (and the wallet, once).
    pub fn verify(&self, root_key: &[u8], call: Use<'_>) -> Result<(), CredentialError> {
        if !self.macaroon.signed_by(root_key) {
            return Err(CredentialError::Signature);
        }
        if sha256::Hash::hash(&self.preimage).to_byte_array() != self.id.payment_hash.0 {
            return Err(CredentialError::Preimage);
        }
        for caveat in &self.macaroon.caveats {
            check_caveat(caveat, call)?;
        }
        Ok(())
    }
}

fn check_caveat(caveat: &[u8], call: Use<'_>) -> Result<(), CredentialError> {
    let text = String::from_utf8_lossy(caveat).into_owned();
    let (name, value) = text
        .split_once('=')
        .map(|(n, v)| (n.trim(), v.trim()))
        .ok_or_else(|| CredentialError::UnknownCaveat(text.clone()))?;
    let fail = |reason: String| CredentialError::Caveat {
        caveat: text.clone(),
        reason,
    };
    let number = |value: &str| {
        value
            .parse::<u64>()
            .map_err(|_| fail(format!("`{value}` is not a whole number")))
    };
    match name {
        "services" => {
            let served = value
                .split(',')
                .any(|service| service.trim().split(':').next() == Some(SERVICE));
            if !served {
                return Err(fail(format!("it does not name `{SERVICE}`")));
            }
        }
        n if n == format!("{SERVICE}_valid_until") => {
            if call.quote_msat.is_some() && call.now > number(value)? {
                return Err(fail("the token has expired".to_owned()));
            }
        }
        n if n == format!("{SERVICE}_model") => {
            if call.quote_msat.is_some() && value != call.model {
                return Err(fail(format!("this call is for model `{}`", call.model)));
            }
        }
        n if n == format!("{SERVICE}_budget_msat") => {
            let budget = number(value)?;
            if let Some(quote) = call.quote_msat.filter(|quote| *quote > budget) {
                return Err(fail(format!("this call is quoted {quote} msat")));
            }
        }
        _ => return Err(CredentialError::UnknownCaveat(text)),
    }
    Ok(())
}

/// The preimage's payment hash.
pub fn payment_hash_of(preimage: &[u8; 32]) -> PaymentHash {
    PaymentHash(sha256::Hash::hash(preimage).to_byte_array())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: &[u8] = b"a root key of thirty-two bytes..";

    fn token(grant: &Grant) -> (Macaroon, [u8; 32], Identifier) {
        let preimage: [u8; 32] = rand::random();
        let id = Identifier::new(payment_hash_of(&preimage));
        (mint(ROOT, &id, grant), preimage, id)
    }

    fn grant() -> Grant {
        Grant {
            valid_until: 2_000,
            model: "m".to_owned(),
            budget_msat: 5_000,
        }
    }

    fn call() -> Use<'static> {
        Use {
            now: 1_000,
            model: "m",
            quote_msat: Some(4_000),
        }
    }

    fn header(mac: &Macaroon, preimage: &[u8; 32], scheme: &str) -> String {
        let mac = base64::engine::general_purpose::STANDARD.encode(mac.to_bytes());
        format!("{scheme} {mac}:{}", hex::encode(preimage))
    }

    #[test]
    fn the_identifier_is_aperture_layout() {
        let id = Identifier {
            payment_hash: PaymentHash([0xaa; 32]),
            token_id: [0xbb; 32],
        };
        let bytes = id.to_bytes();
        assert_eq!(bytes.len(), 66);
        assert_eq!(&bytes[..2], &[0, 0]);
        assert_eq!(&bytes[2..34], &[0xaa; 32]);
        assert_eq!(&bytes[34..], &[0xbb; 32]);
        assert_eq!(Identifier::from_bytes(&bytes), Some(id));
        let mut v1 = bytes.clone();
        v1[1] = 1;
        assert_eq!(Identifier::from_bytes(&v1), None);
        assert_eq!(Identifier::from_bytes(&bytes[1..]), None);
    }

    #[test]
    fn a_paid_token_is_accepted_under_every_scheme() {
        let (mac, preimage, id) = token(&grant());
        for scheme in ["L402", "LSAT", "Bearer", "l402"] {
            let credential = parse_authorization(&header(&mac, &preimage, scheme))
                .expect("an L402 scheme")
                .expect("well formed");
            assert_eq!(credential.id, id);
            assert_eq!(credential.verify(ROOT, call()), Ok(()));
        }
        assert!(parse_authorization("Nostr abc").is_none());
        let [lsat, l402] = challenges(&mac, "lnbc1");
        assert!(lsat.starts_with("LSAT macaroon=\""), "{lsat}");
        assert!(l402.starts_with("L402 macaroon=\"") && l402.ends_with("invoice=\"lnbc1\""));
    }

    #[test]
    fn forged_wrong_expired_and_overspent_tokens_are_refused() {
        let (mac, preimage, _) = token(&grant());
        let verify = |mac: &Macaroon, preimage: &[u8; 32], call: Use<'_>| {
            parse_authorization(&header(mac, preimage, "L402"))
                .expect("scheme")
                .and_then(|c| c.verify(ROOT, call))
        };
        // Another root key.
        let (other, other_preimage, other_id) = token(&grant());
        let foreign = mint(b"someone else's root key", &other_id, &grant());
        assert_eq!(
            verify(&foreign, &other_preimage, call()),
            Err(CredentialError::Signature)
        );
        assert_eq!(verify(&other, &other_preimage, call()), Ok(()));
        // Tampered caveat, forged signature.
        let mut tampered = mac.clone();
        tampered.caveats[3] = b"dvmd_budget_msat=999999".to_vec();
        assert_eq!(
            verify(&tampered, &preimage, call()),
            Err(CredentialError::Signature)
        );
        let mut forged = mac.clone();
        forged.signature[0] ^= 1;
        assert_eq!(
            verify(&forged, &preimage, call()),
            Err(CredentialError::Signature)
        );
        // Wrong preimage.
        assert_eq!(
            verify(&mac, &[7; 32], call()),
            Err(CredentialError::Preimage)
        );
        // Expired, another model, over budget.
        let late = Use {
            now: 2_001,
            ..call()
        };
        assert!(matches!(
            verify(&mac, &preimage, late),
            Err(CredentialError::Caveat { .. })
        ));
        let model = Use {
            model: "other",
            ..call()
        };
        assert!(matches!(
            verify(&mac, &preimage, model),
            Err(CredentialError::Caveat { .. })
        ));
        let dear = Use {
            quote_msat: Some(5_001),
            ..call()
        };
        assert!(matches!(
            verify(&mac, &preimage, dear),
            Err(CredentialError::Caveat { .. })
        ));
        // Paying for no call (a balance read, a withdrawal), an expired token, or one for
        // another model, still proves what it holds.
        for reading in [late, model] {
            let reading = Use {
                quote_msat: None,
                ..reading
            };
            assert_eq!(verify(&mac, &preimage, reading), Ok(()));
        }
        // A holder may narrow it, never widen it; an unknown caveat is refused. Narrowed, it
        // is known as such (it may not withdraw), and its lowest budget is the one a call bids.
        let read = |mac: &Macaroon| {
            parse_authorization(&header(mac, &preimage, "L402"))
                .expect("scheme")
                .expect("well formed")
        };
        assert_eq!(mac.caveats.len(), MINTED_CAVEATS);
        assert!(!read(&mac).narrowed());
        assert_eq!(read(&mac).budget_msat(), Some(5_000));
        let mut narrowed = mac.clone();
        narrowed.add_caveat("dvmd_budget_msat=100");
        assert!(read(&narrowed).narrowed());
        assert_eq!(read(&narrowed).budget_msat(), Some(100));
        assert!(matches!(
            verify(&narrowed, &preimage, call()),
            Err(CredentialError::Caveat { .. })
        ));
        let mut unknown = mac;
        unknown.add_caveat("ip=1.2.3.4");
        assert!(matches!(
            verify(&unknown, &preimage, call()),
            Err(CredentialError::UnknownCaveat(_))
        ));
        // Garbage.
        for bad in ["L402 nonsense", "L402 abc:xyz", "Bearer :", "LSAT AgJ:00"] {
            assert!(parse_authorization(bad).expect("scheme").is_err(), "{bad}");
        }
    }
}
