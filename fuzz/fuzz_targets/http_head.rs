//! The HTTP request head as the proxy sees it: the raw head parsed as hyper does (httparse),
//! then the request-target and `Host` rules of the data plane (`http.md` §2, §3, §6), then the
//! decision.
//!
//! Invariants: never panics; an accepted target's host equals the policy normaliser's host of
//! the request target's authority (the decided host is the normalised authority), with the
//! written or the scheme's default port; a present `Host` header names the same host; the
//! forwarded `Host` value parses back to the same destination; normalisation is idempotent;
//! the decision obeys the policy invariants.
#![no_main]

mod common;

use std::net::IpAddr;

use common::{Scenario, assert_normalisation_idempotent, checked_pattern, decide_and_check};
use http::{HeaderName, HeaderValue, Method, Request, Uri, Version, header};
use libfuzzer_sys::fuzz_target;
use portcullis::decision::Protocol;
use portcullis::policy::{AskMode, ListKind, normalize_host, split_authority};
use portcullis_dataplane::http_target::{absolute_target, connect_target};

fn scenario(limited: bool) -> Scenario {
    let allow = [
        "example.com",
        "**.example.org",
        "127.0.0.1:8080",
        "localhost",
        "[::1]:80",
    ];
    let deny = ["evil.example.org", "169.254.0.0/16", "*:25"];
    Scenario {
        enabled: true,
        limited,
        mitm: false,
        allow_local_binding: false,
        asks: AskMode::Standalone,
        allowed: allow
            .iter()
            .filter_map(|e| checked_pattern(e, ListKind::Allow))
            .collect(),
        denied: deny
            .iter()
            .filter_map(|e| checked_pattern(e, ListKind::Deny))
            .collect(),
        session_allows: Vec::new(),
    }
}

fn build(data: &[u8]) -> Option<Request<()>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Request::new(&mut headers);
    parsed.parse(data).ok()?;
    let method = Method::from_bytes(parsed.method?.as_bytes()).ok()?;
    let uri: Uri = parsed.path?.parse().ok()?;
    let version = if parsed.version? == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut req = Request::builder().method(method).uri(uri).version(version);
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(h.value).ok()?;
        req = req.header(name, value);
    }
    req.body(()).ok()
}

fuzz_target!(|data: &[u8]| {
    let Some(req) = build(data) else {
        return;
    };
    let connect = req.method() == Method::CONNECT;
    let result = if connect {
        connect_target(&req)
    } else {
        absolute_target(&req)
    };
    let Ok(dest) = result else {
        return;
    };
    assert_normalisation_idempotent(&dest.host);

    // The decided host is the normalised authority of the request target.
    let authority = req
        .uri()
        .authority()
        .expect("an accepted target has an authority");
    let (raw_host, raw_port) = split_authority(authority.as_str()).expect("accepted authority");
    assert_eq!(
        normalize_host(raw_host).as_ref(),
        Ok(&dest.host),
        "{authority}"
    );
    match (raw_port, dest.scheme) {
        (Some(p), _) => assert_eq!(p, dest.port),
        (None, Some(s)) => assert_eq!(s.default_port(), dest.port),
        (None, None) => panic!("CONNECT accepted without a port"),
    }
    // A Host header that was accepted names the same destination.
    if let Some(h) = req.headers().get(header::HOST) {
        let text = h.to_str().expect("accepted Host is text");
        let (hh, _) = split_authority(text).expect("accepted Host splits");
        assert_eq!(normalize_host(hh).as_ref(), Ok(&dest.host), "Host {text:?}");
    }
    // The Host value the proxy forwards parses back to the same destination.
    let forwarded = dest.host_header();
    let (fh, fp) = split_authority(&forwarded).expect("forwarded Host splits");
    assert_eq!(
        normalize_host(fh).as_ref(),
        Ok(&dest.host),
        "forwarded {forwarded:?}"
    );
    let fport = fp.or(dest.scheme.map(|s| s.default_port()));
    assert_eq!(fport, Some(dest.port), "forwarded {forwarded:?}");

    let protocol = if connect {
        Protocol::HttpsConnect
    } else {
        Protocol::Http
    };
    let upgrade = req.headers().contains_key(header::UPGRADE);
    let method = req.method().as_str();
    for limited in [false, true] {
        let sc = scenario(limited);
        let policy = sc.compile();
        for answer in [
            &["93.184.216.34"][..],
            &["127.0.0.1"],
            &["8.8.8.8", "10.0.0.1"],
        ] {
            let resolved: Vec<IpAddr> = answer.iter().filter_map(|a| a.parse().ok()).collect();
            decide_and_check(
                &sc,
                &policy,
                protocol,
                &dest.host,
                dest.port,
                Some(method),
                upgrade,
                &resolved,
            );
        }
    }
});
