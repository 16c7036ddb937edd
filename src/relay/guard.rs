//! Which relays a customer may make us connect to.
//!
//! A request's `relays` tag (and a zap request's) names relays we publish the answer to. Any
//! key can write one, so without a rule it would make dvmd open connections to the operator's
//! own network: a loopback admin port, a cloud metadata address, a LAN host. The rule
//! (`[reply_relays]` in dvmd.toml), applied in our transport at connect time, to the address
//! actually dialed (so a name that resolves to a public address when checked and a private one
//! when connected, DNS rebinding, cannot slip through):
//! - the relays of `relays.toml` (and the embedded relay) are ours: always reached;
//! - a host on the `deny` list is never reached; one on the `allow` list is reached whatever
//!   its addresses;
//! - any other host is reached only at public unicast addresses (IPv4-mapped IPv6 read as the
//!   IPv4 it maps), unless `allow_private = true`.

use std::collections::HashSet;
use std::net::SocketAddr;

use crate::wallet::lnurl::is_public;

/// `[reply_relays]`: the rule for relays that requests name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplyRelayPolicy {
    /// Reach private, loopback and link-local addresses too (a relay on the operator's LAN).
    pub allow_private: bool,
    /// Hosts always reached (a name, or a name's parent domain: `example.com` covers
    /// `relay.example.com`).
    pub allow: Vec<String>,
    /// Hosts never reached (matched the same way).
    pub deny: Vec<String>,
}

/// Why a relay named by a customer is not reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// On the operator's deny list.
    #[error("reply relay {0} is on the deny list")]
    Denied(String),
    /// Resolves only to addresses that are not public.
    #[error("reply relay {host} resolves only to non-public addresses ({addresses})")]
    Private {
        /// The host.
        host: String,
        /// What it resolved to.
        addresses: String,
    },
    /// Resolves to nothing.
    #[error("reply relay {0} does not resolve")]
    Unresolved(String),
}

/// The rule with the relays that are ours.
#[derive(Debug, Clone, Default)]
pub struct RelayGuard {
    /// `host:port` of our own relays (lowercase).
    ours: HashSet<String>,
    policy: ReplyRelayPolicy,
}

impl RelayGuard {
    /// `ours`: the URLs of the configured relays.
    pub fn new<'a>(ours: impl IntoIterator<Item = &'a str>, policy: ReplyRelayPolicy) -> Self {
        let ours = ours
            .into_iter()
            .filter_map(|url| nostr_sdk::Url::parse(url).ok())
            .filter_map(|url| Some(endpoint(url.host_str()?, url.port_or_known_default()?)))
            .collect();
        Self { ours, policy }
    }

    /// Whether `host:port` is one of our own relays (no check applies).
    pub fn is_ours(&self, host: &str, port: u16) -> bool {
        self.ours.contains(&endpoint(host, port))
    }

    /// Refuse a host before resolving it: denied, or an address literal that is not public.
    pub fn precheck(&self, host: &str) -> Result<(), Refused> {
        let host = bare(host);
        if listed(&self.policy.deny, &host) {
            return Err(Refused::Denied(host));
        }
        if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            if !self.policy.allow_private && !listed(&self.policy.allow, &host) && !is_public(ip) {
                return Err(Refused::Private {
                    addresses: ip.to_string(),
                    host,
                });
            }
        }
        Ok(())
    }

    /// Of `resolved` (the addresses of `host`), the ones we may dial, in order.
    pub fn admit(&self, host: &str, resolved: &[SocketAddr]) -> Result<Vec<SocketAddr>, Refused> {
        self.precheck(host)?;
        let host = bare(host);
        if resolved.is_empty() {
            return Err(Refused::Unresolved(host));
        }
        if self.policy.allow_private || listed(&self.policy.allow, &host) {
            return Ok(resolved.to_vec());
        }
        let public: Vec<SocketAddr> = resolved
            .iter()
            .copied()
            .filter(|addr| is_public(addr.ip()))
            .collect();
        if public.is_empty() {
            let addresses = resolved
                .iter()
                .map(|a| a.ip().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(Refused::Private { host, addresses });
        }
        Ok(public)
    }
}

/// A host as compared: lowercase, without IPv6 brackets or a trailing dot.
fn bare(host: &str) -> String {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

fn endpoint(host: &str, port: u16) -> String {
    format!("{}:{port}", bare(host))
}

/// Whether `host` is `entry` or under it.
fn listed(list: &[String], host: &str) -> bool {
    list.iter().any(|entry| {
        let entry = bare(entry);
        host == entry || host.ends_with(&format!(".{entry}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("socket address")
    }

    #[test]
    fn only_public_addresses_of_a_customers_relay_are_dialed() {
        let guard = RelayGuard::new(["ws://127.0.0.1:7000"], ReplyRelayPolicy::default());
        assert!(guard.is_ours("127.0.0.1", 7000), "our own relay");
        assert!(!guard.is_ours("127.0.0.1", 7001));
        for private in [
            "127.0.0.1:80",
            "10.1.2.3:443",
            "169.254.169.254:80",
            "[::1]:443",
            "[fe80::1]:443",
            "[::ffff:127.0.0.1]:443",
            "[::ffff:10.0.0.1]:443",
            "[fd00::1]:443",
            "100.64.0.1:443",
        ] {
            assert!(
                matches!(
                    guard.admit("relay.example", &[addr(private)]),
                    Err(Refused::Private { .. })
                ),
                "{private}"
            );
        }
        // A name resolving to one public and one private address: only the public is dialed.
        let mixed = [addr("127.0.0.1:443"), addr("93.184.216.34:443")];
        assert_eq!(
            guard.admit("relay.example", &mixed),
            Ok(vec![addr("93.184.216.34:443")])
        );
        assert_eq!(
            guard.admit("relay.example", &[]),
            Err(Refused::Unresolved("relay.example".into()))
        );
        // Address literals are refused before any lookup.
        assert!(guard.precheck("[::ffff:7f00:1]").is_err());
        assert!(guard.precheck("192.168.1.1").is_err());
        assert!(guard.precheck("relay.example").is_ok());
    }

    #[test]
    fn the_operators_lists_and_switch_decide_first() {
        let policy = ReplyRelayPolicy {
            allow_private: false,
            allow: vec!["lan.example".into()],
            deny: vec!["bad.example".into()],
        };
        let guard = RelayGuard::new([], policy);
        let lan = [addr("192.168.1.5:443")];
        assert_eq!(guard.admit("relay.lan.example", &lan), Ok(lan.to_vec()));
        assert_eq!(
            guard.admit("Relay.Bad.Example.", &[addr("93.184.216.34:443")]),
            Err(Refused::Denied("relay.bad.example".into()))
        );
        let open = RelayGuard::new(
            [],
            ReplyRelayPolicy {
                allow_private: true,
                ..ReplyRelayPolicy::default()
            },
        );
        assert_eq!(open.admit("x.example", &lan), Ok(lan.to_vec()));
    }
}
