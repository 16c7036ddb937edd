//! `[http]`: the checks on the HTTP listener's settings (the `/v1` API, NIP-98, L402, CORS,
//! proxies), run when the configuration is built.

use super::{ConfigError, HttpSection};

/// Refuse `[http]` values that are out of range or malformed.
pub(super) fn check(http: &HttpSection) -> Result<(), ConfigError> {
    let invalid = ConfigError::Invalid;
    if let Some(url) = &http.public_url {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(invalid(format!(
                "http.public_url must start with http:// or https://, not {url:?}"
            )));
        }
    }
    if !(1..=3600).contains(&http.auth_window_secs) {
        return Err(invalid(
            "http.auth_window_secs must be between 1 and 3600".into(),
        ));
    }
    if http.auth_replay_capacity == 0 || http.max_topups_per_minute == 0 {
        return Err(invalid(
            "http.auth_replay_capacity and http.max_topups_per_minute must be at least 1".into(),
        ));
    }
    if http.max_body_bytes < 1024 {
        return Err(invalid("http.max_body_bytes must be at least 1024".into()));
    }
    if !(1..=600).contains(&http.body_timeout_secs) {
        return Err(invalid(
            "http.body_timeout_secs must be between 1 and 600".into(),
        ));
    }
    if http.max_topup_msat < 1_000 {
        return Err(invalid("http.max_topup_msat must be at least 1000".into()));
    }
    if http.max_challenges_per_minute == 0 || http.max_challenges_per_ip_per_minute == 0 {
        return Err(invalid(
            "http.max_challenges_per_minute and http.max_challenges_per_ip_per_minute must be at least 1"
                .into(),
        ));
    }
    if http.l402_token_lifetime_secs < 60 {
        return Err(invalid(
            "http.l402_token_lifetime_secs must be at least 60".into(),
        ));
    }
    for origin in &http.cors_origins {
        let scheme = origin.starts_with("http://") || origin.starts_with("https://");
        if origin != "*" && (!scheme || origin.ends_with('/')) {
            return Err(invalid(format!(
                "http.cors_origins: {origin:?} is not `*` or an origin such as https://app.example (no trailing slash)"
            )));
        }
    }
    if http.max_connections == 0 || http.max_connections_per_ip == 0 {
        return Err(invalid(
            "http.max_connections and http.max_connections_per_ip must be at least 1".into(),
        ));
    }
    if http.header_timeout_secs == 0 {
        return Err(invalid(
            "http.header_timeout_secs must be at least 1".into(),
        ));
    }
    for proxy in &http.trusted_proxies {
        if proxy.parse::<std::net::IpAddr>().is_err() {
            return Err(invalid(format!(
                "http.trusted_proxies: {proxy:?} is not an IP address"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{Config, FileConfig, Overrides, RelaysFile};
    use super::*;

    #[test]
    fn http_settings_are_checked() {
        let dev = Overrides {
            dev: true,
            ..Overrides::default()
        };
        let refused = |edit: fn(&mut HttpSection), key: &str| {
            let mut file = FileConfig::default();
            edit(&mut file.http);
            let err = Config::build(file, RelaysFile::default(), dev.clone()).expect_err("refused");
            assert!(err.to_string().contains(key), "{key}: {err}");
        };
        refused(
            |h| h.public_url = Some("dvm.example.com".into()),
            "public_url",
        );
        refused(|h| h.auth_window_secs = 0, "auth_window_secs");
        refused(|h| h.auth_replay_capacity = 0, "auth_replay_capacity");
        refused(|h| h.max_body_bytes = 100, "max_body_bytes");
        refused(|h| h.body_timeout_secs = 0, "body_timeout_secs");
        refused(|h| h.max_topup_msat = 999, "max_topup_msat");
        refused(
            |h| h.max_challenges_per_ip_per_minute = 0,
            "max_challenges_per_ip_per_minute",
        );
        refused(
            |h| h.l402_token_lifetime_secs = 5,
            "l402_token_lifetime_secs",
        );
        refused(
            |h| h.trusted_proxies = vec!["proxy.local".into()],
            "trusted_proxies",
        );
        refused(
            |h| h.cors_origins = vec!["app.example".into()],
            "cors_origins",
        );
        let mut file = FileConfig::default();
        file.http.public_url = Some("https://dvm.example.com".into());
        let config = Config::build(file, RelaysFile::default(), dev).expect("valid");
        assert_eq!(
            config.http.public_url.as_deref(),
            Some("https://dvm.example.com")
        );
    }
}
