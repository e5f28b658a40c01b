//! In-process OTLP receivers on `127.0.0.1:0` (`audit.md`, "Tests that must exist"): a tonic
//! server implementing the logs collector service, and an HTTP/protobuf variant
//! (`POST /v1/logs`) decoded with prost. Both store every export request and flatten it into
//! [`Record`]s.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{
    LogsService, LogsServiceServer,
};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::origin::{read_head, runtime};

/// One attribute value, as it arrived.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    /// `string_value`.
    Str(String),
    /// `int_value`.
    Int(i64),
    /// `bool_value`.
    Bool(bool),
    /// Anything else, debug-printed.
    Other(String),
}

impl Val {
    /// The string value, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Val::Str(s) => Some(s),
            _ => None,
        }
    }
}

fn val(v: &Option<AnyValue>) -> Val {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => Val::Str(s.clone()),
        Some(any_value::Value::IntValue(i)) => Val::Int(*i),
        Some(any_value::Value::BoolValue(b)) => Val::Bool(*b),
        other => Val::Other(format!("{other:?}")),
    }
}

fn map(kvs: &[KeyValue]) -> BTreeMap<String, Val> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), val(&kv.value)))
        .collect()
}

/// One log record with its resource, flattened.
#[derive(Debug, Clone)]
pub struct Record {
    /// Resource attributes.
    pub resource: BTreeMap<String, Val>,
    /// Instrumentation scope name.
    pub scope: String,
    /// `LogRecord.event_name`.
    pub event_name: String,
    /// `LogRecord.severity_number`.
    pub severity_number: i32,
    /// The body, when it is a string.
    pub body: String,
    /// Record attributes (key → value; a duplicated key would show up in `attr_count`).
    pub attrs: BTreeMap<String, Val>,
    /// Number of attributes as sent (detects duplicates).
    pub attr_count: usize,
    /// Trace id (empty when the record was emitted outside a span).
    pub trace_id: Vec<u8>,
    /// Span id (empty when the record was emitted outside a span).
    pub span_id: Vec<u8>,
}

/// One exported span, flattened.
#[derive(Debug, Clone)]
pub struct SpanRec {
    /// Resource attributes.
    pub resource: BTreeMap<String, Val>,
    /// Span name.
    pub name: String,
    /// Span attributes.
    pub attrs: BTreeMap<String, Val>,
    /// Trace id.
    pub trace_id: Vec<u8>,
    /// Span id.
    pub span_id: Vec<u8>,
}

impl Record {
    /// A string attribute.
    pub fn s(&self, key: &str) -> Option<&str> {
        self.attrs.get(key).and_then(Val::as_str)
    }
}

#[derive(Default)]
struct Store {
    spans: Mutex<Vec<SpanRec>>,
    records: Mutex<Vec<Record>>,
    raw: Mutex<Vec<Vec<u8>>>,
    requests: AtomicUsize,
}

impl Store {
    fn add(&self, req: &ExportLogsServiceRequest) {
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.raw.lock().unwrap().push(req.encode_to_vec());
        let mut out = self.records.lock().unwrap();
        for rl in &req.resource_logs {
            let resource = rl
                .resource
                .as_ref()
                .map(|r| map(&r.attributes))
                .unwrap_or_default();
            for sl in &rl.scope_logs {
                let scope = sl
                    .scope
                    .as_ref()
                    .map(|s| s.name.clone())
                    .unwrap_or_default();
                for lr in &sl.log_records {
                    let body = match val(&lr.body) {
                        Val::Str(s) => s,
                        other => format!("{other:?}"),
                    };
                    out.push(Record {
                        resource: resource.clone(),
                        scope: scope.clone(),
                        event_name: lr.event_name.clone(),
                        severity_number: lr.severity_number,
                        body,
                        attrs: map(&lr.attributes),
                        attr_count: lr.attributes.len(),
                        trace_id: lr.trace_id.clone(),
                        span_id: lr.span_id.clone(),
                    });
                }
            }
        }
    }
}

struct Service(Arc<Store>);

#[tonic::async_trait]
impl TraceService for Service {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut out = self.0.spans.lock().unwrap();
        for rs in &request.get_ref().resource_spans {
            let resource = rs
                .resource
                .as_ref()
                .map(|r| map(&r.attributes))
                .unwrap_or_default();
            for ss in &rs.scope_spans {
                for sp in &ss.spans {
                    out.push(SpanRec {
                        resource: resource.clone(),
                        name: sp.name.clone(),
                        attrs: map(&sp.attributes),
                        trace_id: sp.trace_id.clone(),
                        span_id: sp.span_id.clone(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl LogsService for Service {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        self.0.add(request.get_ref());
        Ok(tonic::Response::new(ExportLogsServiceResponse {
            partial_success: None,
        }))
    }
}

/// A running receiver (gRPC or HTTP); stops when dropped.
pub struct OtlpReceiver {
    /// `127.0.0.1:PORT`.
    pub addr: std::net::SocketAddr,
    http: bool,
    store: Arc<Store>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl OtlpReceiver {
    /// Starts an OTLP/gRPC logs receiver on `127.0.0.1:0`.
    pub fn grpc() -> OtlpReceiver {
        let store = Arc::new(Store::default());
        let listener = runtime()
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind receiver");
        let addr = listener.local_addr().expect("addr");
        let svc = LogsServiceServer::new(Service(store.clone()));
        let traces = TraceServiceServer::new(Service(store.clone()));
        let task = runtime().spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .add_service(traces)
                .serve_with_incoming(incoming)
                .await;
        });
        OtlpReceiver {
            addr,
            http: false,
            store,
            task,
        }
    }

    /// Starts an OTLP/HTTP (protobuf) receiver on `127.0.0.1:0` answering `POST /v1/logs`.
    pub fn http() -> OtlpReceiver {
        let store = Arc::new(Store::default());
        let listener = runtime()
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind receiver");
        let addr = listener.local_addr().expect("addr");
        let st = store.clone();
        let task = runtime().spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else { return };
                let st = st.clone();
                tokio::spawn(async move {
                    // Keep-alive: serve requests until the client closes.
                    let mut carry: Vec<u8> = Vec::new();
                    loop {
                        let (head, mut body) = if carry.is_empty() {
                            match read_head(&mut s).await {
                                Some(x) => x,
                                None => return,
                            }
                        } else {
                            let mut chained = std::io::Cursor::new(std::mem::take(&mut carry))
                                .chain(&mut s);
                            match read_head(&mut chained).await {
                                Some(x) => x,
                                None => return,
                            }
                        };
                        let len: usize = head
                            .headers
                            .iter()
                            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                            .and_then(|(_, v)| v.trim().parse().ok())
                            .unwrap_or(0);
                        while body.len() < len {
                            let mut buf = vec![0u8; 65536];
                            match s.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => body.extend_from_slice(&buf[..n]),
                            }
                        }
                        carry = body.split_off(len);
                        let ok = head.method == "POST"
                            && head.target == "/v1/logs"
                            && head.headers.iter().any(|(k, v)| {
                                k.eq_ignore_ascii_case("content-type")
                                    && v.starts_with("application/x-protobuf")
                            });
                        let status = match ExportLogsServiceRequest::decode(body.as_slice()) {
                            Ok(req) if ok => {
                                st.add(&req);
                                "200 OK"
                            }
                            _ => "400 Bad Request",
                        };
                        let resp_body = ExportLogsServiceResponse {
                            partial_success: None,
                        }
                        .encode_to_vec();
                        let head = format!(
                            "HTTP/1.1 {status}\r\ncontent-type: application/x-protobuf\r\ncontent-length: {}\r\n\r\n",
                            resp_body.len()
                        );
                        if s.write_all(head.as_bytes()).await.is_err()
                            || s.write_all(&resp_body).await.is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        OtlpReceiver {
            addr,
            http: true,
            store,
            task,
        }
    }

    /// The endpoint to configure: `http://127.0.0.1:PORT` (gRPC) or
    /// `http://127.0.0.1:PORT/v1/logs` (HTTP).
    pub fn endpoint(&self) -> String {
        if self.http {
            format!("http://{}/v1/logs", self.addr)
        } else {
            format!("http://{}", self.addr)
        }
    }

    /// Every record received so far.
    pub fn records(&self) -> Vec<Record> {
        self.store.records.lock().unwrap().clone()
    }

    /// Every span received so far (gRPC receiver only).
    pub fn spans(&self) -> Vec<SpanRec> {
        self.store.spans.lock().unwrap().clone()
    }

    /// Export requests received so far.
    pub fn requests(&self) -> usize {
        self.store.requests.load(Ordering::SeqCst)
    }

    /// Every export request as received (protobuf bytes), for "never appears" checks.
    pub fn raw(&self) -> Vec<Vec<u8>> {
        self.store.raw.lock().unwrap().clone()
    }

    /// Waits (≤ `timeout`) until a record satisfies `pred`; returns it.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&Record) -> bool) -> Option<Record> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self.records().into_iter().find(|r| pred(r)) {
                return Some(r);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (≤ `timeout`) for the record of decision `id`.
    pub fn wait_for_decision(&self, id: &str, timeout: Duration) -> Option<Record> {
        self.wait_for(timeout, |r| r.s("portcullis.decision.id") == Some(id))
    }
}
