//! A scripted HTTPS server on `127.0.0.1:0` for the enterprise-requirements tests
//! (`requirements.md`, "Tests that must exist"): hyper 1 over tokio-rustls, with a leaf
//! certificate for `127.0.0.1`/`localhost` issued by a fresh rcgen CA. Each test queues the
//! answers it wants; every request is recorded.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::channel::Channel;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_rustls::rustls;

use crate::origin::runtime;

/// One scripted answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// Response headers.
    pub headers: Vec<(String, String)>,
    /// Body bytes.
    pub body: Vec<u8>,
    /// Wait before answering at all.
    pub delay: Duration,
    /// Send the body one byte at a time with this pause (slow loris).
    pub trickle: Option<Duration>,
}

impl Answer {
    /// 200 with a TOML document.
    pub fn toml(body: &str) -> Answer {
        Answer::status(200)
            .header("content-type", "application/toml")
            .body(body)
    }

    /// 200 with a JSON document.
    pub fn json(body: &str) -> Answer {
        Answer::status(200)
            .header("content-type", "application/json")
            .body(body)
    }

    /// An empty answer with `status`.
    pub fn status(status: u16) -> Answer {
        Answer {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            delay: Duration::ZERO,
            trickle: None,
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Answer {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl AsRef<[u8]>) -> Answer {
        self.body = body.as_ref().to_vec();
        self
    }

    /// Waits `d` before answering.
    pub fn delayed(mut self, d: Duration) -> Answer {
        self.delay = d;
        self
    }

    /// Sends the body one byte per `d`.
    pub fn trickled(mut self, d: Duration) -> Answer {
        self.trickle = Some(d);
        self
    }
}

/// One request the backend saw.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Headers, names in lower case.
    pub headers: Vec<(String, String)>,
}

impl Recorded {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct Script {
    queue: VecDeque<Answer>,
    default: Option<Answer>,
    requests: Vec<Recorded>,
}

/// The running backend; stops when dropped.
pub struct HttpsBackend {
    port: u16,
    ca_pem: String,
    script: Arc<Mutex<Script>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HttpsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A CA and a leaf for `127.0.0.1`/`localhost`: (CA PEM, leaf chain DER, leaf key DER).
fn certificates() -> (
    String,
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Portcullis test requirements CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA certificate");
    let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
    let mut leaf_params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("leaf params");
    leaf_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    leaf_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = leaf_params
        .signed_by(&leaf_key, &ca)
        .expect("leaf certificate");
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    (ca.pem(), vec![leaf.der().clone()], key)
}

impl HttpsBackend {
    /// Binds `127.0.0.1:0` and serves (HTTP/1.1 and HTTP/2 by ALPN). Without a scripted answer
    /// the backend answers 404.
    pub fn start() -> HttpsBackend {
        let (ca_pem, chain, key) = certificates();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server certificate");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let script = Arc::new(Mutex::new(Script::default()));
        let listener = runtime()
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind the HTTPS backend");
        let port = listener.local_addr().expect("local addr").port();
        let shared = script.clone();
        let task = runtime().spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let script = shared.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req| {
                        let script = script.clone();
                        async move { Ok::<_, Infallible>(answer(&script, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        HttpsBackend {
            port,
            ca_pem,
            script,
            task,
        }
    }

    /// `https://127.0.0.1:PORT` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The CA certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Writes the CA PEM to `dir/ca.pem` and returns the path.
    pub fn write_ca(&self, dir: &Path) -> PathBuf {
        let p = dir.join("ca.pem");
        std::fs::write(&p, &self.ca_pem).expect("write CA PEM");
        p
    }

    /// Queues answers, used in order, one per request.
    pub fn push(&self, answers: impl IntoIterator<Item = Answer>) {
        if let Ok(mut s) = self.script.lock() {
            s.queue.extend(answers);
        }
    }

    /// The answer used once the queue is empty.
    pub fn set_default(&self, answer: Answer) {
        if let Ok(mut s) = self.script.lock() {
            s.default = Some(answer);
        }
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.script
            .lock()
            .map(|s| s.requests.clone())
            .unwrap_or_default()
    }
}

async fn answer(script: &Mutex<Script>, req: Request<Incoming>) -> Response<Channel<Bytes>> {
    let recorded = Recorded {
        method: req.method().to_string(),
        path: req
            .uri()
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        headers: req
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    };
    let a = match script.lock() {
        Ok(mut s) => {
            s.requests.push(recorded);
            s.queue
                .pop_front()
                .or_else(|| s.default.clone())
                .unwrap_or_else(|| Answer::status(404))
        }
        Err(_) => Answer::status(500),
    };
    if !a.delay.is_zero() {
        tokio::time::sleep(a.delay).await;
    }
    let (mut tx, body) = Channel::<Bytes>::new(4);
    let mut builder = Response::builder().status(a.status);
    for (n, v) in &a.headers {
        builder = builder.header(n.as_str(), v.as_str());
    }
    if a.trickle.is_none() {
        builder = builder.header("content-length", a.body.len().to_string());
    }
    tokio::spawn(async move {
        match a.trickle {
            None => {
                if !a.body.is_empty() {
                    let _ = tx.send_data(Bytes::from(a.body)).await;
                }
            }
            Some(pause) => {
                for b in a.body {
                    if tx.send_data(Bytes::from(vec![b])).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(pause).await;
                }
            }
        }
    });
    builder
        .body(body)
        .unwrap_or_else(|_| Response::new(Channel::new(1).1))
}
