//! Whose money it is: an npub, or the payment hash of a paid L402 challenge.
//!
//! A customer who signs (a relay request, a NIP-98 header) has an account keyed by their npub. A
//! customer who only pays (an HTTP 402) has an account keyed by the payment hash they paid: the
//! payment is booked to it once, and every credential naming that hash spends from it.
//!
//! In the store an npub's key is its 32 bytes (as before token accounts existed) and a token's is
//! [`TOKEN_TAG`] followed by its 32 bytes, so the two never collide: keys differ in length.
//! In JSON an npub is its 64 hex digits (as before) and a token is `l402:` and its 64 hex digits.

use std::fmt;

use nostr_sdk::PublicKey;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::wallet::PaymentHash;

/// The first byte of a token account's store key.
pub const TOKEN_TAG: u8 = b'T';
/// The JSON prefix of a token account.
const TOKEN_PREFIX: &str = "l402:";

/// An account of the ledger (see the module docs).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub enum Account {
    /// A customer known by their key.
    Npub(PublicKey),
    /// The value paid for an L402 challenge, known by its payment hash.
    Token(PaymentHash),
}

impl Account {
    /// The store key (32 bytes for an npub, 33 for a token).
    pub fn key(&self) -> Vec<u8> {
        match self {
            Self::Npub(npub) => npub.to_bytes().to_vec(),
            Self::Token(hash) => {
                let mut key = Vec::with_capacity(33);
                key.push(TOKEN_TAG);
                key.extend_from_slice(&hash.0);
                key
            }
        }
    }

    /// The account whose store key is `key`.
    pub fn from_key(key: &[u8]) -> Option<Self> {
        // By length first: an npub's 32 bytes may well begin with the tag.
        match key.len() {
            32 => PublicKey::from_slice(key).ok().map(Self::Npub),
            33 if key[0] == TOKEN_TAG => <[u8; 32]>::try_from(&key[1..])
                .ok()
                .map(|hash| Self::Token(PaymentHash(hash))),
            _ => None,
        }
    }

    /// The npub, for an npub's account.
    pub fn npub(&self) -> Option<PublicKey> {
        match self {
            Self::Npub(npub) => Some(*npub),
            Self::Token(_) => None,
        }
    }

    /// `npub1…` or `l402:<hash>`, for people.
    pub fn to_human(&self) -> String {
        match self {
            Self::Npub(npub) => {
                use nostr_sdk::ToBech32;
                npub.to_bech32().unwrap_or_else(|_| npub.to_hex())
            }
            Self::Token(_) => self.to_string(),
        }
    }
}

impl From<PublicKey> for Account {
    fn from(npub: PublicKey) -> Self {
        Self::Npub(npub)
    }
}

impl PartialEq<PublicKey> for Account {
    fn eq(&self, other: &PublicKey) -> bool {
        *self == Self::Npub(*other)
    }
}

impl fmt::Display for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Npub(npub) => f.write_str(&npub.to_hex()),
            Self::Token(hash) => write!(f, "{TOKEN_PREFIX}{hash}"),
        }
    }
}

impl fmt::Debug for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Account({self})")
    }
}

impl std::str::FromStr for Account {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.strip_prefix(TOKEN_PREFIX) {
            Some(hash) => PaymentHash::from_hex(hash)
                .map(Self::Token)
                .map_err(|e| e.to_string()),
            None => PublicKey::parse(s)
                .map(Self::Npub)
                .map_err(|e| format!("`{s}` is not an account: {e}")),
        }
    }
}

impl Serialize for Account {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Account {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_npub_account_is_stored_exactly_as_its_key_was() {
        let npub = nostr_sdk::Keys::generate().public_key();
        let account = Account::from(npub);
        assert_eq!(
            serde_json::to_string(&account).ok(),
            serde_json::to_string(&npub).ok()
        );
        assert_eq!(account.key(), npub.to_bytes().to_vec());
        let back: Account =
            serde_json::from_str(&format!("\"{}\"", npub.to_hex())).expect("an npub's hex reads");
        assert_eq!(back, account);
        assert_eq!(back, npub);
    }

    #[test]
    fn a_token_account_never_shares_a_key_with_an_npub() {
        let hash = PaymentHash([7; 32]);
        let token = Account::Token(hash);
        let json = serde_json::to_string(&token).expect("serializes");
        assert_eq!(json, format!("\"l402:{}\"", hash.to_hex()));
        assert_eq!(serde_json::from_str::<Account>(&json).ok(), Some(token));
        assert_eq!(token.key().len(), 33);
        assert_eq!(token.key()[0], TOKEN_TAG);
        assert_eq!(Account::from_key(&token.key()), Some(token));
        let npub = Account::Npub(nostr_sdk::Keys::generate().public_key());
        assert_eq!(Account::from_key(&npub.key()), Some(npub));
        assert_eq!(Account::from_key(&[1; 20]), None);
        assert_eq!(token.npub(), None);
        assert!("l402:zz".parse::<Account>().is_err());
        assert!("nonsense".parse::<Account>().is_err());
    }
}
