//! Token buckets: how dvmd keeps anyone from making it spend (wallet invoices, stored records,
//! signatures) faster than the operator allows. Pure, apart from a lock.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;
use std::time::Instant;

/// The address a per-client limit counts a caller against: IPv4 as it is (also when mapped
/// into IPv6), IPv6 by its /64 (one host is given a whole /64).
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

/// This host (`127.0.0.1`, `::1`, or `127.0.0.1` mapped into IPv6): its own proxy, tools and
/// benchmarks, which per-client limits leave alone (a proxy on another address is named in
/// `[http] trusted_proxies`, and its clients are told apart by `X-Forwarded-For`).
pub fn is_this_host(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4 == Ipv4Addr::LOCALHOST,
        IpAddr::V6(v6) => {
            v6 == Ipv6Addr::LOCALHOST || v6.to_ipv4_mapped() == Some(Ipv4Addr::LOCALHOST)
        }
    }
}

/// A token bucket: `capacity` at most in a burst, refilled at `per_sec`.
#[derive(Debug)]
pub struct TokenBucket {
    capacity: f64,
    per_sec: f64,
    bucket: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// A full bucket of `per_minute` tokens, refilled at `per_minute` a minute.
    pub fn per_minute(per_minute: u32) -> Self {
        let capacity = f64::from(per_minute.max(1));
        Self::new(capacity, capacity / 60.0)
    }

    /// A full bucket of `burst` tokens, refilled at `per_sec`.
    pub fn new(burst: f64, per_sec: f64) -> Self {
        let capacity = burst.max(1.0);
        Self {
            capacity,
            per_sec: per_sec.max(0.0),
            bucket: Mutex::new((capacity, Instant::now())),
        }
    }

    /// Whether the bucket has refilled by `now` (forgetting it loses nothing).
    pub fn is_full_at(&self, now: Instant) -> bool {
        let bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, last) = *bucket;
        tokens + now.saturating_duration_since(last).as_secs_f64() * self.per_sec >= self.capacity
    }

    /// Take one token at `now`, if there is one.
    pub fn try_take_at(&self, now: Instant) -> bool {
        let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, last) = *bucket;
        let refilled = now.saturating_duration_since(last).as_secs_f64() * self.per_sec;
        let tokens = (tokens + refilled).min(self.capacity);
        if tokens >= 1.0 {
            *bucket = (tokens - 1.0, now);
            true
        } else {
            *bucket = (tokens, now);
            false
        }
    }
}

/// One bucket per key (a client address, an npub), for at most `max_keys` keys at once: when
/// the map is full, buckets that have refilled are forgotten (at most once a second, so a flood
/// of new keys cannot make every call pay for a scan), and a new key beyond that is refused.
#[derive(Debug)]
pub struct Buckets<K> {
    burst: f64,
    per_sec: f64,
    max_keys: usize,
    state: Mutex<Keyed<K>>,
}

#[derive(Debug)]
struct Keyed<K> {
    buckets: HashMap<K, TokenBucket>,
    pruned_at: Option<Instant>,
}

impl<K: Hash + Eq> Buckets<K> {
    /// Buckets of `burst` refilled at `per_sec`, for at most `max_keys` keys.
    pub fn new(burst: f64, per_sec: f64, max_keys: usize) -> Self {
        Self {
            burst,
            per_sec,
            max_keys,
            state: Mutex::new(Keyed {
                buckets: HashMap::new(),
                pruned_at: None,
            }),
        }
    }

    /// Take one of `key`'s tokens at `now`, if it has one.
    pub fn try_take(&self, key: K, now: Instant) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Keyed { buckets, pruned_at } = &mut *state;
        if !buckets.contains_key(&key) && buckets.len() >= self.max_keys {
            if pruned_at.is_none_or(|at| now.saturating_duration_since(at).as_secs() >= 1) {
                buckets.retain(|_, bucket| !bucket.is_full_at(now));
                *pruned_at = Some(now);
            }
            if buckets.len() >= self.max_keys {
                return false;
            }
        }
        buckets
            .entry(key)
            .or_insert_with(|| TokenBucket::new(self.burst, self.per_sec))
            .try_take_at(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_bucket_refills_at_its_rate() {
        let bucket = TokenBucket::new(2.0, 1.0);
        let now = Instant::now();
        assert!(bucket.try_take_at(now) && bucket.try_take_at(now));
        assert!(!bucket.try_take_at(now));
        assert!(bucket.try_take_at(now + Duration::from_secs(1)));
        assert!(bucket.is_full_at(now + Duration::from_secs(5)));
    }

    #[test]
    fn keys_have_their_own_buckets_and_the_map_is_bounded() {
        let buckets = Buckets::new(1.0, 1.0, 2);
        let now = Instant::now();
        assert!(buckets.try_take("a", now));
        assert!(!buckets.try_take("a", now), "a's one token is spent");
        assert!(buckets.try_take("b", now), "b has its own");
        assert!(
            !buckets.try_take("c", now),
            "full of keys that have not refilled"
        );
        let later = now + Duration::from_secs(2);
        assert!(buckets.try_take("c", later), "refilled keys are forgotten");
    }
}
