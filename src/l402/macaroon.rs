//! Macaroons in libmacaroons' version 2 binary format, with first-party caveats only: what
//! aperture, lnd, go-macaroon and pymacaroons read and write.
//!
//! Layout: the version byte `2`; then fields, each a type byte, a uvarint length and the data:
//! an optional location (1), the identifier (2), end of section (0); per caveat an optional
//! location (1), its identifier (2), a verification id (4, third-party only, refused here) and
//! end of section (0); end of section (0) after the caveats; the signature (6, 32 bytes).
//!
//! The signature is an HMAC-SHA256 chain: the key derived from the root key
//! (`HMAC(key = "macaroons-key-generator", root key)`, as libmacaroons does) signs the
//! identifier, and each caveat is signed with the signature so far. Anyone holding a macaroon
//! can add caveats (attenuate it); nobody without the root key can remove one or change one.

use bitcoin::hashes::{sha256, Hash, HashEngine, Hmac, HmacEngine};

/// The only format version read and written.
const VERSION: u8 = 2;
const EOS: u8 = 0;
const LOCATION: u8 = 1;
const IDENTIFIER: u8 = 2;
const VID: u8 = 4;
const SIGNATURE: u8 = 6;
/// Longest field accepted, bytes (a header is read before anything else is checked).
const MAX_FIELD: u64 = 4096;
/// Most caveats accepted on one macaroon.
const MAX_CAVEATS: usize = 64;

/// A macaroon with first-party caveats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Macaroon {
    /// Where it is used (a hint; not signed).
    pub location: Option<String>,
    /// The identifier.
    pub identifier: Vec<u8>,
    /// First-party caveats in order, each a predicate such as `name=value`.
    pub caveats: Vec<Vec<u8>>,
    /// The HMAC chain over the identifier and caveats.
    pub signature: [u8; 32],
}

/// Why bytes are not a macaroon this module reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacaroonError {
    /// Not version 2 binary, truncated, or a field out of place.
    #[error("malformed macaroon: {0}")]
    Malformed(&'static str),
    /// A third-party caveat (a verification id): never issued here.
    #[error("third-party caveats are not accepted")]
    ThirdParty,
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut engine = HmacEngine::<sha256::Hash>::new(key);
    engine.input(data);
    Hmac::<sha256::Hash>::from_engine(engine).to_byte_array()
}

/// The key a root key signs with (libmacaroons' derivation).
fn derived_key(root_key: &[u8]) -> [u8; 32] {
    hmac(b"macaroons-key-generator", root_key)
}

impl Macaroon {
    /// A new macaroon for `identifier`, signed with `root_key`.
    pub fn mint(root_key: &[u8], identifier: Vec<u8>, location: Option<String>) -> Self {
        let signature = hmac(&derived_key(root_key), &identifier);
        Self {
            location,
            identifier,
            caveats: Vec::new(),
            signature,
        }
    }

    /// Add a first-party caveat (anyone holding the macaroon may).
    pub fn add_caveat(&mut self, predicate: impl Into<Vec<u8>>) {
        let predicate = predicate.into();
        self.signature = hmac(&self.signature, &predicate);
        self.caveats.push(predicate);
    }

    /// Whether the signature is the chain `root_key` makes over the identifier and caveats,
    /// compared in constant time.
    pub fn signed_by(&self, root_key: &[u8]) -> bool {
        let mut expected = hmac(&derived_key(root_key), &self.identifier);
        for caveat in &self.caveats {
            expected = hmac(&expected, caveat);
        }
        expected
            .iter()
            .zip(self.signature.iter())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
    }

    /// The version 2 binary encoding.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![VERSION];
        if let Some(location) = &self.location {
            field(&mut out, LOCATION, location.as_bytes());
        }
        field(&mut out, IDENTIFIER, &self.identifier);
        out.push(EOS);
        for caveat in &self.caveats {
            field(&mut out, IDENTIFIER, caveat);
            out.push(EOS);
        }
        out.push(EOS);
        field(&mut out, SIGNATURE, &self.signature);
        out
    }

    /// Read the version 2 binary encoding.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, MacaroonError> {
        let mut reader = Reader { bytes, at: 0 };
        if reader.byte()? != VERSION {
            return Err(MacaroonError::Malformed("not a version 2 macaroon"));
        }
        let mut location = None;
        let (mut kind, mut data) = reader.field()?;
        if kind == LOCATION {
            location = Some(
                String::from_utf8(data.to_vec())
                    .map_err(|_| MacaroonError::Malformed("location is not text"))?,
            );
            (kind, data) = reader.field()?;
        }
        if kind != IDENTIFIER {
            return Err(MacaroonError::Malformed("no identifier"));
        }
        let identifier = data.to_vec();
        if reader.byte()? != EOS {
            return Err(MacaroonError::Malformed(
                "unexpected field after the identifier",
            ));
        }
        let mut caveats = Vec::new();
        loop {
            let (kind, data) = match reader.peek()? {
                EOS => {
                    reader.at += 1;
                    break;
                }
                _ => reader.field()?,
            };
            let (kind, data) = if kind == LOCATION {
                reader.field()?
            } else {
                (kind, data)
            };
            if kind != IDENTIFIER {
                return Err(MacaroonError::Malformed("caveat without an identifier"));
            }
            match reader.peek()? {
                VID => return Err(MacaroonError::ThirdParty),
                EOS => reader.at += 1,
                _ => return Err(MacaroonError::Malformed("unexpected field in a caveat")),
            }
            if caveats.len() == MAX_CAVEATS {
                return Err(MacaroonError::Malformed("too many caveats"));
            }
            caveats.push(data.to_vec());
        }
        let (kind, data) = reader.field()?;
        if kind != SIGNATURE {
            return Err(MacaroonError::Malformed("no signature"));
        }
        let signature: [u8; 32] = data
            .try_into()
            .map_err(|_| MacaroonError::Malformed("the signature is not 32 bytes"))?;
        if reader.at != bytes.len() {
            return Err(MacaroonError::Malformed("bytes after the signature"));
        }
        Ok(Self {
            location,
            identifier,
            caveats,
            signature,
        })
    }
}

fn field(out: &mut Vec<u8>, kind: u8, data: &[u8]) {
    out.push(kind);
    let mut len = data.len() as u64;
    while len >= 0x80 {
        out.push((len as u8) | 0x80);
        len >>= 7;
    }
    out.push(len as u8);
    out.extend_from_slice(data);
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn peek(&self) -> Result<u8, MacaroonError> {
        self.bytes
            .get(self.at)
            .copied()
            .ok_or(MacaroonError::Malformed("truncated"))
    }

    fn byte(&mut self) -> Result<u8, MacaroonError> {
        let byte = self.peek()?;
        self.at += 1;
        Ok(byte)
    }

    fn field(&mut self) -> Result<(u8, &'a [u8]), MacaroonError> {
        let kind = self.byte()?;
        if kind == EOS {
            return Err(MacaroonError::Malformed("unexpected end of section"));
        }
        let mut len = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            len |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                break;
            }
        }
        if len > MAX_FIELD {
            return Err(MacaroonError::Malformed("field too long"));
        }
        let end = self.at + len as usize;
        let data = self
            .bytes
            .get(self.at..end)
            .ok_or(MacaroonError::Malformed("truncated"))?;
        self.at = end;
        Ok((kind, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_macaroon_round_trips_and_its_chain_is_checked() {
        let mut mac = Macaroon::mint(b"root", b"id".to_vec(), Some("dvmd".to_owned()));
        mac.add_caveat("services=dvmd:0");
        mac.add_caveat(vec![b'x'; 300]);
        let bytes = mac.to_bytes();
        let back = Macaroon::from_bytes(&bytes).expect("reads");
        assert_eq!(back, mac);
        assert!(back.signed_by(b"root"));
        assert!(!back.signed_by(b"another root"));

        let mut tampered = back.clone();
        tampered.caveats[0] = b"services=other:0".to_vec();
        assert!(!tampered.signed_by(b"root"));
        let mut stripped = back.clone();
        stripped.caveats.pop();
        assert!(!stripped.signed_by(b"root"), "a caveat cannot be removed");
        let mut attenuated = back;
        attenuated.add_caveat("dvmd_budget_msat=1");
        assert!(attenuated.signed_by(b"root"), "anyone may add one");
    }

    #[test]
    fn libmacaroons_reference_signature() {
        // libmacaroons' README example: location "http://mybank/", identifier "we used our
        // secret key", key "this is our super secret key; only we should know it".
        let mac = Macaroon::mint(
            b"this is our super secret key; only we should know it",
            b"we used our secret key".to_vec(),
            Some("http://mybank/".to_owned()),
        );
        assert_eq!(
            hex::encode(mac.signature),
            "e3d9e02908526c4c0039ae15114115d97fdd68bf2ba379b342aaf0f617d0552f"
        );
        let mut mac = mac;
        mac.add_caveat("account = 3735928559");
        assert_eq!(
            hex::encode(mac.signature),
            "1efe4763f290dbce0c1d08477367e11f4eee456a64933cf662d79772dbb82128"
        );
    }

    #[test]
    fn garbage_and_third_party_caveats_are_refused() {
        assert!(Macaroon::from_bytes(&[]).is_err());
        assert!(Macaroon::from_bytes(&[1, 2, 3]).is_err());
        let good = Macaroon::mint(b"k", b"id".to_vec(), None).to_bytes();
        for cut in 1..good.len() {
            assert!(Macaroon::from_bytes(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut extra = good.clone();
        extra.push(0);
        assert!(Macaroon::from_bytes(&extra).is_err());
        // version, identifier, EOS, caveat id + vid + EOS, EOS, signature
        let mut third = vec![2];
        field(&mut third, IDENTIFIER, b"id");
        third.push(EOS);
        field(&mut third, IDENTIFIER, b"cav");
        field(&mut third, VID, b"vid");
        third.push(EOS);
        third.push(EOS);
        field(&mut third, SIGNATURE, &[0; 32]);
        assert_eq!(Macaroon::from_bytes(&third), Err(MacaroonError::ThirdParty));
        let mut huge = vec![2, IDENTIFIER];
        huge.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(Macaroon::from_bytes(&huge).is_err());
    }
}
