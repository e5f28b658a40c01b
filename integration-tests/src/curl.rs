//! Running the real `curl` binary.

use std::process::Command;

/// One curl run: the last response's status, headers (lower-cased names) and body.
#[derive(Debug, Clone)]
pub struct CurlResult {
    /// HTTP status of the final response (0 when none).
    pub status: u16,
    /// Header fields of the final response, names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// Response body bytes.
    pub body: Vec<u8>,
    /// curl's exit code.
    pub exit_code: i32,
    /// curl's stderr (error messages).
    pub stderr: String,
}

impl CurlResult {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Body as UTF-8 text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Body parsed as JSON; panics with the body on failure.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }
}

fn parse_head_block(block: &str) -> (u16, Vec<(String, String)>) {
    let mut lines = block.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_ascii_lowercase(), v.trim().to_string()))
        })
        .collect();
    (status, headers)
}

/// Runs `curl -sS --max-time 30 -D <tmp> -o <tmp> ARGS...` and parses the final response.
/// Panics with a clear message when curl is not installed.
pub fn curl(args: &[&str]) -> CurlResult {
    let dir = tempfile::tempdir().expect("tempdir");
    let head_path = dir.path().join("head");
    let body_path = dir.path().join("body");
    let out = Command::new("curl")
        .arg("-sS")
        .args(["--max-time", "60"])
        .arg("-D")
        .arg(&head_path)
        .arg("-o")
        .arg(&body_path)
        .args(args)
        .env_remove("http_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .unwrap_or_else(|e| {
            panic!("could not run `curl` ({e}); install curl to run the integration tests")
        });
    let head = std::fs::read_to_string(&head_path).unwrap_or_default();
    let body = std::fs::read(&body_path).unwrap_or_default();
    // The dump holds every response head (CONNECT 200, 100 Continue, ...); keep the last.
    let blocks: Vec<&str> = head
        .split("\r\n\r\n")
        .filter(|b| !b.trim().is_empty())
        .collect();
    let (status, headers) = blocks
        .last()
        .map(|b| parse_head_block(b))
        .unwrap_or((0, Vec::new()));
    CurlResult {
        status,
        headers,
        body,
        exit_code: out.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
