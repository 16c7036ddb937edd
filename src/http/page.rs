//! The sign-in page (`GET /`): one self-contained HTML file (`page.html`, no CDN, no build step)
//! that asks a NIP-07 extension (`window.nostr`) for the public key and signs a NIP-98 event
//! for each `/v1` call: balance, tier, recent jobs with their receipts, ledger entries, a chat
//! on `/v1/chat/completions` (streamed), top-up with the invoice as text and QR code, withdraw,
//! and the auto-payout setting. And `GET /v1/qr.svg?text=`, the QR code it shows.

use axum::extract::Query;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;

use super::HttpState;

/// The page, compiled in.
const PAGE: &str = include_str!("page.html");
/// The longest text a QR code is made of (a BOLT11 invoice is well under 1,000 characters).
const MAX_QR_TEXT: usize = 2_048;

/// `GET /` and `GET /v1/qr.svg`.
pub(super) fn routes() -> Router<HttpState> {
    Router::new()
        .route("/", get(page))
        .route("/v1/qr.svg", get(qr))
}

async fn page() -> impl IntoResponse {
    (
        [
            (header::CACHE_CONTROL, "no-cache"),
            // Scripts and styles only from the page itself; calls only to this origin.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 img-src 'self'; connect-src 'self'",
            ),
        ],
        Html(PAGE),
    )
}

#[derive(Deserialize)]
struct QrQuery {
    text: String,
}

async fn qr(query: Result<Query<QrQuery>, axum::extract::rejection::QueryRejection>) -> Response {
    let Ok(Query(QrQuery { text })) = query else {
        return (StatusCode::BAD_REQUEST, "name the `text` to encode").into_response();
    };
    if text.len() > MAX_QR_TEXT {
        return (StatusCode::BAD_REQUEST, "text too long for a QR code here").into_response();
    }
    match svg(&text) {
        Some(svg) => (
            [
                (header::CONTENT_TYPE, "image/svg+xml"),
                (header::CACHE_CONTROL, "public, max-age=86400"),
            ],
            svg,
        )
            .into_response(),
        None => (StatusCode::BAD_REQUEST, "cannot encode that as a QR code").into_response(),
    }
}

/// `text` as an SVG QR code (upper-cased first when it is a BOLT11 invoice: the alphanumeric
/// mode makes a smaller code, and wallets read either case).
pub fn svg(text: &str) -> Option<String> {
    let text = if text.starts_with("lnbc") || text.starts_with("lntb") {
        text.to_uppercase()
    } else {
        text.to_owned()
    };
    let code = qrcode::QrCode::new(text.as_bytes()).ok()?;
    Some(
        code.render::<qrcode::render::svg::Color<'_>>()
            .min_dimensions(240, 240)
            .build(),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_invoice_becomes_an_svg_qr_code() {
        let svg = super::svg("lnbcrt10u1pexample").expect("svg");
        assert!(svg.contains("<svg") && svg.contains("</svg>"), "{svg}");
        assert!(
            super::svg(&"x".repeat(10_000)).is_none(),
            "too long for any QR code"
        );
    }

    #[test]
    fn the_page_signs_each_call_and_needs_nothing_from_elsewhere() {
        let page = super::PAGE;
        assert!(page.contains("window.nostr.signEvent") && page.contains("kind: 27235"));
        assert!(
            !page.contains("http://") && !page.contains("https://"),
            "no CDN"
        );
    }
}
