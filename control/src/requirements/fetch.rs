//! Fetching the requirements document (`requirements.md` §2): reqwest with rustls, no proxy,
//! no redirects, an overall deadline shared by every attempt and wait, exponential backoff
//! with jitter (or `Retry-After`), and a 1 MiB body limit.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, ETAG, IF_NONE_MATCH, LOCATION};

use super::document::{self, Requirements};

/// Largest accepted body.
pub const MAX_BODY: usize = 1 << 20;

/// What one fetch needs.
#[derive(Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    /// The requirements URL.
    pub url: String,
    token: Option<String>,
    /// Overall budget of one fetch.
    pub timeout: Duration,
    /// Attempts per fetch.
    pub max_attempts: u32,
}

/// A successful fetch.
#[derive(Debug, Clone)]
pub enum Fetched {
    /// 200 with a valid document.
    Document {
        /// The validated requirements.
        doc: Requirements,
        /// The document text.
        body: String,
        /// The answer's content type (empty when absent).
        content_type: String,
        /// The answer's ETag.
        etag: Option<String>,
    },
    /// 304 after `If-None-Match`: the cached document stays.
    NotModified,
}

/// How one attempt ended.
enum Attempt {
    Done(Fetched),
    /// Not retried.
    Fatal(String),
    /// Retried; the optional wait is a `Retry-After`.
    Transient(String, Option<Duration>),
}

impl Fetcher {
    /// Builds the client: rustls (TLS 1.2+), the platform verifier or only `ca_pem`'s roots,
    /// no proxy, no redirects, `User-Agent: portcullis/<version>`.
    pub fn new(
        url: String,
        token: Option<String>,
        ca_pem: Option<&[u8]>,
        timeout: Duration,
        max_attempts: u32,
    ) -> Result<Fetcher, String> {
        // The process installs ring at start; this only matters when it has not.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut b = reqwest::Client::builder()
            .tls_backend_rustls()
            .tls_version_min(reqwest::tls::Version::TLS_1_2)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(format!("portcullis/{}", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| format!("requirements.ca_file: not a PEM bundle: {e}"))?;
            if certs.is_empty() {
                return Err("requirements.ca_file: no certificate in the PEM bundle".into());
            }
            b = b.tls_certs_only(certs);
        }
        let client = b
            .build()
            .map_err(|e| format!("cannot build the requirements HTTPS client: {e}"))?;
        Ok(Fetcher {
            client,
            url,
            token,
            timeout,
            max_attempts,
        })
    }

    /// The URL without its query string (for messages).
    pub fn shown_url(&self) -> &str {
        let end = self.url.find(['?', '#']).unwrap_or(self.url.len());
        &self.url[..end]
    }

    /// One fetch: attempts until success, a non-retried failure, the attempt limit or the
    /// deadline. The error is the complete message of §2.
    pub async fn fetch(&self, etag: Option<&str>) -> Result<Fetched, String> {
        let deadline = Instant::now() + self.timeout;
        let mut attempts = 0u32;
        let cause = loop {
            attempts += 1;
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break "timed out".to_string();
            }
            let (cause, retry_after) =
                match tokio::time::timeout(remaining, self.attempt(etag, remaining)).await {
                    Ok(Attempt::Done(f)) => return Ok(f),
                    Ok(Attempt::Fatal(c)) => break c,
                    Ok(Attempt::Transient(c, r)) => (c, r),
                    Err(_) => ("timed out".to_string(), None),
                };
            if attempts >= self.max_attempts {
                break cause;
            }
            let wait = retry_after.unwrap_or_else(|| backoff(attempts));
            if Instant::now() + wait >= deadline {
                break cause;
            }
            tracing::debug!(attempt = attempts, %cause, ?wait, "requirements fetch failed; retrying");
            tokio::time::sleep(wait).await;
        };
        Err(format!(
            "cannot load enterprise requirements from {} after {attempts} attempt{}: {cause}",
            self.shown_url(),
            if attempts == 1 { "" } else { "s" }
        ))
    }

    async fn attempt(&self, etag: Option<&str>, remaining: Duration) -> Attempt {
        let mut req = self
            .client
            .get(&self.url)
            .timeout(remaining)
            .header(ACCEPT, "application/toml, application/json;q=0.9");
        if let Some(t) = &self.token {
            req = req.header(AUTHORIZATION, format!("Bearer {t}"));
        }
        if let Some(e) = etag {
            req = req.header(IF_NONE_MATCH, e);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return classify_error(&e),
        };
        let status = resp.status();
        let header = |name| {
            resp.headers()
                .get(name)
                .and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok())
                .map(str::to_string)
        };
        if status == StatusCode::NOT_MODIFIED && etag.is_some() {
            return Attempt::Done(Fetched::NotModified);
        }
        if status.is_redirection() {
            let to = header(LOCATION).unwrap_or_else(|| "(no Location)".into());
            return Attempt::Fatal(format!("unexpected redirect ({}) to {to}", status.as_u16()));
        }
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Attempt::Fatal(format!(
                "requirements backend rejected the credentials ({})",
                status.as_u16()
            ));
        }
        if status == StatusCode::REQUEST_TIMEOUT
            || status == StatusCode::TOO_MANY_REQUESTS
            || status.is_server_error()
        {
            let retry_after = if status == StatusCode::TOO_MANY_REQUESTS
                || status == StatusCode::SERVICE_UNAVAILABLE
            {
                header(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs)
            } else {
                None
            };
            return Attempt::Transient(format!("HTTP {}", status.as_u16()), retry_after);
        }
        if status != StatusCode::OK {
            return Attempt::Fatal(format!("requirements backend answered {}", status.as_u16()));
        }
        let content_type = header(CONTENT_TYPE).unwrap_or_default();
        let new_etag = header(ETAG);
        let body = match read_limited(resp).await {
            Ok(b) => b,
            Err(a) => return a,
        };
        let Ok(body) = String::from_utf8(body) else {
            return Attempt::Fatal("invalid requirements document: not valid UTF-8".into());
        };
        match document::parse(&content_type, &body) {
            Ok((doc, unknown)) => {
                if !unknown.is_empty() {
                    tracing::warn!(
                        "requirements document: ignoring unknown top-level keys: {}",
                        unknown.join(", ")
                    );
                }
                Attempt::Done(Fetched::Document {
                    doc,
                    body,
                    content_type,
                    etag: new_etag,
                })
            }
            Err(detail) => Attempt::Fatal(format!("invalid requirements document: {detail}")),
        }
    }
}

/// Reads the body, refusing more than [`MAX_BODY`] bytes (checked by length and while reading).
async fn read_limited(mut resp: reqwest::Response) -> Result<Vec<u8>, Attempt> {
    let too_big = || Attempt::Fatal("requirements document larger than 1 MiB".into());
    if resp.content_length().is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_big());
    }
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_BODY {
                    return Err(too_big());
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => return Err(classify_error(&e)),
        }
    }
}

/// A transport error: TLS failures are final, everything else is retried.
fn classify_error(e: &reqwest::Error) -> Attempt {
    if e.is_timeout() {
        return Attempt::Transient("timed out".into(), None);
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut last = e.to_string();
    while let Some(s) = source {
        if let Some(tls) = s.downcast_ref::<rustls::Error>() {
            return Attempt::Fatal(format!("TLS error: {tls}"));
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && let Some(tls) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
        {
            return Attempt::Fatal(format!("TLS error: {tls}"));
        }
        last = s.to_string();
        // Some layers carry the rustls error only as text.
        if last.starts_with("invalid peer certificate") || last.contains("received fatal alert") {
            return Attempt::Fatal(format!("TLS error: {last}"));
        }
        source = s.source();
    }
    Attempt::Transient(last, None)
}

/// `250 ms · 2^(n−1)` times a uniform random factor in [0.5, 1.0].
fn backoff(n: u32) -> Duration {
    let base = 250u64.saturating_mul(1u64 << (n.saturating_sub(1)).min(20));
    let r = portcullis::secret::random_hex(4)
        .ok()
        .and_then(|h| u32::from_str_radix(&h, 16).ok())
        .unwrap_or(u32::MAX);
    let factor = 0.5 + 0.5 * (f64::from(r) / f64::from(u32::MAX));
    Duration::from_millis((base as f64 * factor) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded() {
        for n in 1..6 {
            let full = 250u64 << (n - 1);
            let d = backoff(n).as_millis() as u64;
            assert!(d >= full / 2 && d <= full, "{n}: {d}");
        }
    }
}
