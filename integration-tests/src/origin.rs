//! Loopback origin servers (tokio, on a shared background runtime).

use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

/// The shared runtime all helper servers run on.
pub fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

/// Lower-case hex of a SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A running origin; stops on drop.
pub struct Origin {
    /// Listening address.
    pub addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<serde_json::Value>>>,
    task: JoinHandle<()>,
}

impl Origin {
    /// Port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
    /// Connections whose handler has finished (closed or aborted).
    pub fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }
    /// Requests recorded so far (echo origin: the JSON it answered).
    pub fn requests(&self) -> Vec<serde_json::Value> {
        self.requests.lock().unwrap().clone()
    }
    /// Forgets the recorded requests and returns how many there were (long runs such as the
    /// soak call it periodically so the log stays bounded).
    pub fn take_request_count(&self) -> usize {
        std::mem::take(&mut *self.requests.lock().unwrap()).len()
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A connection handler of a test origin.
pub(crate) type Handler = Arc<
    dyn Fn(
            TcpStream,
            Arc<Mutex<Vec<serde_json::Value>>>,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
        + Send
        + Sync,
>;

fn spawn(ip: &str, handler: Handler) -> Origin {
    try_spawn(ip, 0, handler).unwrap_or_else(|e| panic!("bind origin on {ip}: {e}"))
}

pub(crate) fn try_spawn(ip: &str, port: u16, handler: Handler) -> std::io::Result<Origin> {
    let rt = runtime();
    let listener = rt.block_on(TcpListener::bind((ip, port)))?;
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(Mutex::new(Vec::new()));
    let closed = Arc::new(AtomicUsize::new(0));
    let (c, r, d) = (connections.clone(), requests.clone(), closed.clone());
    let task = rt.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            c.fetch_add(1, Ordering::SeqCst);
            let fut = handler(stream, r.clone());
            let d = d.clone();
            tokio::spawn(async move {
                fut.await;
                d.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    Ok(Origin {
        addr,
        connections,
        closed,
        requests,
        task,
    })
}

/// A parsed request head.
#[derive(Debug, Clone)]
pub struct Head {
    /// Method.
    pub method: String,
    /// Request target.
    pub target: String,
    /// Header fields in order (original case).
    pub headers: Vec<(String, String)>,
}

impl Head {
    fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads a request head (≤ 1 MiB, 30 s); returns it and any bytes read past it.
pub async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> Option<(Head, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > 1 << 20 {
            return None;
        }
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let text = String::from_utf8_lossy(&buf[..end]).into_owned();
    let rest = buf[end + 4..].to_vec();
    let mut lines = text.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let target = first.next()?.to_string();
    let headers = lines
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    Some((
        Head {
            method,
            target,
            headers,
        },
        rest,
    ))
}

struct BufReaderish<'a> {
    s: &'a mut TcpStream,
    pending: Vec<u8>,
}

impl BufReaderish<'_> {
    async fn fill(&mut self) -> bool {
        let mut chunk = vec![0u8; 65536];
        match tokio::time::timeout(Duration::from_secs(60), self.s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => {
                self.pending.extend_from_slice(&chunk[..n]);
                true
            }
            _ => false,
        }
    }
    async fn line(&mut self) -> Option<String> {
        for _ in 0..10_000 {
            if let Some(i) = self.pending.windows(2).position(|w| w == b"\r\n") {
                let l = String::from_utf8_lossy(&self.pending[..i]).into_owned();
                self.pending.drain(..i + 2);
                return Some(l);
            }
            if !self.fill().await {
                return None;
            }
        }
        None
    }
    /// Feeds exactly `n` bytes into the hasher.
    async fn take(&mut self, mut n: usize, h: &mut Sha256) -> Option<()> {
        while n > 0 {
            if self.pending.is_empty() && !self.fill().await {
                return None;
            }
            let k = n.min(self.pending.len());
            h.update(&self.pending[..k]);
            self.pending.drain(..k);
            n -= k;
        }
        Some(())
    }
}

/// Reads a body per the head's framing; returns (sha256 hex, length) and leftover bytes.
async fn read_body(
    s: &mut TcpStream,
    head: &Head,
    rest: Vec<u8>,
) -> Option<(String, u64, Vec<u8>)> {
    let mut r = BufReaderish { s, pending: rest };
    let mut h = Sha256::new();
    let mut total = 0u64;
    let chunked = head
        .get("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        loop {
            let line = r.line().await?;
            let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
            if size == 0 {
                // Trailers until empty line.
                for _ in 0..100 {
                    if r.line().await?.is_empty() {
                        break;
                    }
                }
                break;
            }
            r.take(size, &mut h).await?;
            total += size as u64;
            r.line().await?;
        }
    } else if let Some(len) = head.get("content-length").and_then(|v| v.parse().ok()) {
        r.take(len, &mut h).await?;
        total = len as u64;
    }
    Some((hex(&h.finalize()), total, r.pending))
}

/// HTTP echo origin: answers every request with JSON
/// `{"method","path","headers":[[name,value]...],"body_sha256","body_len"}`; keep-alive.
pub fn http_echo(ip: &str) -> Origin {
    http_echo_at(ip, 0).unwrap_or_else(|e| panic!("bind echo origin on {ip}: {e}"))
}

/// [`http_echo`] on a given port (0 = any).
pub fn http_echo_at(ip: &str, port: u16) -> std::io::Result<Origin> {
    try_spawn(
        ip,
        port,
        Arc::new(|mut s, log| {
            Box::pin(async move {
                let mut rest = Vec::new();
                for _ in 0..1000 {
                    let (head, more) = if rest.is_empty() {
                        match read_head(&mut s).await {
                            Some(x) => x,
                            None => return,
                        }
                    } else {
                        // Prepend leftover bytes by chaining a cursor.
                        let mut chained = (&rest[..]).chain(&mut s);
                        match read_head(&mut chained).await {
                            Some(x) => x,
                            None => return,
                        }
                    };
                    let Some((sha, len, left)) = read_body(&mut s, &head, more).await else {
                        return;
                    };
                    rest = left;
                    let headers: Vec<serde_json::Value> = head
                        .headers
                        .iter()
                        .map(|(k, v)| serde_json::json!([k, v]))
                        .collect();
                    let v = serde_json::json!({
                        "method": head.method,
                        "path": head.target,
                        "headers": headers,
                        "body_sha256": sha,
                        "body_len": len,
                    });
                    log.lock().unwrap().push(v.clone());
                    let body = v.to_string();
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{}",
                        body.len(),
                        body
                    );
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                    if head
                        .get("connection")
                        .is_some_and(|c| c.eq_ignore_ascii_case("close"))
                    {
                        return;
                    }
                }
            })
        }),
    )
}

/// Origin that answers every request with `status`, the given extra headers and `body`.
pub fn fixed_response(ip: &str, status: u16, headers: &[(&str, &str)], body: &str) -> Origin {
    fixed_response_bytes(ip, status, headers, body.as_bytes())
}

/// [`fixed_response`] with a binary body.
pub fn fixed_response_bytes(
    ip: &str,
    status: u16,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Origin {
    let mut head = format!("HTTP/1.1 {status} X\r\ncontent-length: {}\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    let resp = Arc::new(bytes);
    spawn(
        ip,
        Arc::new(move |mut s, _log| {
            let resp = resp.clone();
            Box::pin(async move {
                for _ in 0..1000 {
                    let Some((head, more)) = read_head(&mut s).await else {
                        return;
                    };
                    if read_body(&mut s, &head, more).await.is_none() {
                        return;
                    }
                    if s.write_all(&resp).await.is_err() {
                        return;
                    }
                }
            })
        }),
    )
}

/// Origin that accepts and reads but never answers (holds the connection ≤ 120 s).
pub fn never_answer(ip: &str) -> Origin {
    spawn(
        ip,
        Arc::new(|mut s, _log| {
            Box::pin(async move {
                let mut buf = [0u8; 4096];
                let _ = tokio::time::timeout(Duration::from_secs(120), async {
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                    tokio::time::sleep(Duration::from_secs(120)).await;
                })
                .await;
            })
        }),
    )
}

async fn echo_until_eof(s: &mut TcpStream, first: &[u8]) {
    if !first.is_empty() && s.write_all(first).await.is_err() {
        return;
    }
    let mut buf = vec![0u8; 65536];
    loop {
        match tokio::time::timeout(Duration::from_secs(60), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            _ => break,
        }
    }
    let _ = s.shutdown().await;
}

/// WebSocket-style origin: answers an upgrade request with `101 Switching Protocols` and then
/// echoes raw bytes; a request without `Upgrade` gets 400.
pub fn websocket_echo(ip: &str) -> Origin {
    spawn(
        ip,
        Arc::new(|mut s, log| {
            Box::pin(async move {
                let Some((head, rest)) = read_head(&mut s).await else {
                    return;
                };
                let headers: Vec<serde_json::Value> = head
                    .headers
                    .iter()
                    .map(|(k, v)| serde_json::json!([k, v]))
                    .collect();
                log.lock()
                    .unwrap()
                    .push(serde_json::json!({"method": head.method, "path": head.target, "headers": headers}));
                if head.get("upgrade").is_none() {
                    let _ = s
                        .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    return;
                }
                let key = head.get("sec-websocket-key").unwrap_or("").to_string();
                let resp = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: accept-{key}\r\n\r\n"
                );
                if s.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
                echo_until_eof(&mut s, &rest).await;
            })
        }),
    )
}

/// Raw TCP echo: echoes bytes; on the client's EOF it half-closes its own side.
pub fn tcp_echo(ip: &str) -> Origin {
    spawn(
        ip,
        Arc::new(|mut s, _log| Box::pin(async move { echo_until_eof(&mut s, &[]).await })),
    )
}

/// TCP origin that sends `greeting` first, then closes its write side, and then reads (and
/// discards) until the client's EOF.
pub fn tcp_send_then_close(ip: &str, greeting: &'static [u8]) -> Origin {
    spawn(
        ip,
        Arc::new(move |mut s, _log| {
            Box::pin(async move {
                if s.write_all(greeting).await.is_err() {
                    return;
                }
                let _ = s.shutdown().await;
                let mut buf = vec![0u8; 65536];
                let _ = tokio::time::timeout(Duration::from_secs(60), async {
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                })
                .await;
            })
        }),
    )
}

/// TCP sink: reads to EOF, then writes the lower-case hex SHA-256 of everything read and closes.
pub fn tcp_sink(ip: &str) -> Origin {
    spawn(
        ip,
        Arc::new(|mut s, _log| {
            Box::pin(async move {
                let mut h = Sha256::new();
                let mut buf = vec![0u8; 65536];
                loop {
                    match tokio::time::timeout(Duration::from_secs(60), s.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => h.update(&buf[..n]),
                        _ => break,
                    }
                }
                let _ = s.write_all(hex(&h.finalize()).as_bytes()).await;
                let _ = s.shutdown().await;
            })
        }),
    )
}

/// A loopback listener whose backlog is full and never accepted, so new connects hang.
pub struct Blackhole {
    fd: i32,
    /// Listening port.
    pub port: u16,
    _fillers: Vec<std::net::TcpStream>,
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        // SAFETY: closing a descriptor this struct owns.
        unsafe { libc::close(self.fd) };
    }
}

pub fn blackhole() -> Blackhole {
    // SAFETY: plain socket syscalls on a descriptor we own; the sockaddr is fully initialised.
    let (fd, port) = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0);
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        assert_eq!(
            libc::bind(fd, &addr as *const _ as *const libc::sockaddr, len),
            0
        );
        assert_eq!(libc::listen(fd, 0), 0);
        let mut out: libc::sockaddr_in = std::mem::zeroed();
        let mut olen = len;
        libc::getsockname(fd, &mut out as *mut _ as *mut libc::sockaddr, &mut olen);
        (fd, u16::from_be(out.sin_port))
    };
    let target = std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port));
    let mut fillers = Vec::new();
    for _ in 0..16 {
        match std::net::TcpStream::connect_timeout(&target, Duration::from_millis(300)) {
            Ok(s) => fillers.push(s),
            Err(_) => break,
        }
    }
    Blackhole {
        fd,
        port,
        _fillers: fillers,
    }
}

/// Origin that answers every request with a `content-length: 1048576` head, sends only 64 KiB of
/// the body and then closes the connection.
pub fn truncated_response(ip: &str) -> Origin {
    spawn(
        ip,
        Arc::new(|mut s, _log| {
            Box::pin(async move {
                let Some((head, more)) = read_head(&mut s).await else {
                    return;
                };
                if read_body(&mut s, &head, more).await.is_none() {
                    return;
                }
                let mut out = b"HTTP/1.1 200 OK\r\ncontent-length: 1048576\r\n\r\n".to_vec();
                out.extend_from_slice(&[b'z'; 65536]);
                let _ = s.write_all(&out).await;
                let _ = s.shutdown().await;
            })
        }),
    )
}

/// What [`reset_mid_body`] sends before it resets the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Partial {
    /// After reading a request: `200` with `content-length: 1048576` and 64 KiB of it.
    ContentLength,
    /// After reading a request: `200` chunked, one 64 KiB chunk and no terminating chunk.
    Chunked,
    /// Right after accepting, without reading anything (a tunnel target): 64 KiB of raw bytes.
    Raw,
}

/// Bytes of body (or raw data) [`reset_mid_body`] sends before the reset.
pub const PARTIAL_LEN: usize = 65536;

/// Origin that sends a partial answer, then waits until the test adds a permit to the returned
/// semaphore (one per connection, at most 30 s) and closes with `SO_LINGER` 0, so the kernel
/// sends a TCP RST instead of a FIN: an origin that dies mid-stream.
pub fn reset_mid_body(ip: &str, partial: Partial) -> (Origin, Arc<tokio::sync::Semaphore>) {
    let trigger = Arc::new(tokio::sync::Semaphore::new(0));
    let t = trigger.clone();
    let origin = spawn(
        ip,
        Arc::new(move |mut s, _log| {
            let t = t.clone();
            Box::pin(async move {
                let mut out = Vec::with_capacity(PARTIAL_LEN + 64);
                match partial {
                    Partial::Raw => {}
                    Partial::ContentLength | Partial::Chunked => {
                        let Some((head, more)) = read_head(&mut s).await else {
                            return;
                        };
                        if read_body(&mut s, &head, more).await.is_none() {
                            return;
                        }
                        if partial == Partial::Chunked {
                            out.extend_from_slice(
                                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                            );
                            out.extend_from_slice(format!("{PARTIAL_LEN:x}\r\n").as_bytes());
                        } else {
                            out.extend_from_slice(
                                b"HTTP/1.1 200 OK\r\ncontent-length: 1048576\r\n\r\n",
                            );
                        }
                    }
                }
                out.extend_from_slice(&[b'r'; PARTIAL_LEN]);
                if partial == Partial::Chunked {
                    out.extend_from_slice(b"\r\n");
                }
                if s.write_all(&out).await.is_err() {
                    return;
                }
                if let Ok(Ok(permit)) =
                    tokio::time::timeout(Duration::from_secs(30), t.acquire()).await
                {
                    permit.forget();
                }
                let _ = s.set_zero_linger();
                drop(s);
            })
        }),
    );
    (origin, trigger)
}
