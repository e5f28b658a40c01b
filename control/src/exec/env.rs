//! The proxy environment of COMMAND (env.md): built from exec's own environment and the
//! sidecar's addresses, as a pure function so every rule is unit-tested.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// What the child environment is built from.
#[derive(Debug, Clone)]
pub struct ProxyEndpoints {
    /// The sidecar's HTTP listener.
    pub http: SocketAddr,
    /// The sidecar's SOCKS5 listener, when enabled.
    pub socks5: Option<SocketAddr>,
    /// SOCKS5 credentials (`socks_username`, password), when configured.
    pub socks_auth: Option<(String, String)>,
    /// `<mitm dir>` when MITM is prepared (CA variables, env.md §3).
    pub mitm_dir: Option<PathBuf>,
    /// The effective `allow_local_binding` when COMMAND starts.
    pub allow_local_binding: bool,
    /// The running `portcullis-control` executable (for `GIT_SSH_COMMAND`).
    pub control_exe: Option<PathBuf>,
}

/// Variables COMMAND never inherits (env.md §1 rule 1).
const REMOVED: [&str; 3] = ["PORTCULLIS_TOKEN", "PORTCULLIS_CONTROL", "YARN_NO_PROXY"];

/// Variables that carry `http://H` (env.md §2).
const HTTP_VARS: [&str; 21] = [
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "http_proxy",
    "https_proxy",
    "WS_PROXY",
    "WSS_PROXY",
    "ws_proxy",
    "wss_proxy",
    "npm_config_proxy",
    "npm_config_https_proxy",
    "NPM_CONFIG_PROXY",
    "NPM_CONFIG_HTTPS_PROXY",
    "YARN_HTTP_PROXY",
    "YARN_HTTPS_PROXY",
    "BUNDLE_HTTP_PROXY",
    "BUNDLE_HTTPS_PROXY",
    "PIP_PROXY",
    "DOCKER_HTTP_PROXY",
    "DOCKER_HTTPS_PROXY",
    "GLOBAL_AGENT_HTTP_PROXY",
    "GLOBAL_AGENT_HTTPS_PROXY",
];

/// Variables that carry `socks5h://S` when SOCKS5 is on, else `http://H`.
const ALL_VARS: [&str; 4] = ["ALL_PROXY", "all_proxy", "FTP_PROXY", "ftp_proxy"];

/// Variables that carry the loopback-only bypass list (env.md §2.1).
const NO_PROXY_VARS: [&str; 5] = [
    "NO_PROXY",
    "no_proxy",
    "npm_config_noproxy",
    "NPM_CONFIG_NOPROXY",
    "GLOBAL_AGENT_NO_PROXY",
];

/// The one bypass list: loopback only.
pub const NO_PROXY: &str = "localhost,127.0.0.1,::1";

/// Marker an exec leaves at the start of its `GIT_SSH_COMMAND` (env.md §4).
const GIT_SSH_MARKER: &str = "PORTCULLIS_GIT_SSH=1 ";

/// A warning produced while building the environment (logged by the caller).
pub type Warning = String;

/// COMMAND's environment: `inherited` with the proxy variables set and the removed ones gone.
pub fn child_env(
    inherited: impl IntoIterator<Item = (OsString, OsString)>,
    p: &ProxyEndpoints,
) -> (BTreeMap<OsString, OsString>, Vec<Warning>) {
    let mut env: BTreeMap<OsString, OsString> = inherited.into_iter().collect();
    let mut warnings = Vec::new();
    for name in REMOVED {
        env.remove(&OsString::from(name));
    }
    let mut set = |k: &str, v: &str| {
        env.insert(k.into(), v.into());
    };
    let http = format!("http://{}", p.http);
    for name in HTTP_VARS {
        set(name, &http);
    }
    let all = match p.socks5 {
        Some(s) => socks_url(s, p.socks_auth.as_ref()),
        None => http.clone(),
    };
    for name in ALL_VARS {
        set(name, &all);
    }
    for name in NO_PROXY_VARS {
        set(name, NO_PROXY);
    }
    set("NODE_USE_ENV_PROXY", "1");
    set("ELECTRON_GET_USE_PROXY", "true");
    set("PORTCULLIS_PROXY_ACTIVE", "1");
    set(
        "PORTCULLIS_ALLOW_LOCAL_BINDING",
        if p.allow_local_binding { "1" } else { "0" },
    );
    if let Some(dir) = &p.mitm_dir {
        let bundle = dir.join("ca-bundle.pem");
        let ca = dir.join("ca.pem");
        for name in portcullis::config::CA_BUNDLE_VARS {
            env.insert(name.into(), bundle.clone().into_os_string());
        }
        for name in portcullis::config::CA_ALONE_VARS {
            env.insert(name.into(), ca.clone().into_os_string());
        }
    }
    // GIT_SSH_COMMAND through the SOCKS listener, only without SOCKS authentication (§4).
    if let (Some(socks), None) = (p.socks5, &p.socks_auth) {
        let user_value = |k: &str| {
            env.get(&OsString::from(k))
                .filter(|v| !v.is_empty())
                .cloned()
        };
        let ours = user_value("GIT_SSH_COMMAND")
            .map(|v| v.to_string_lossy().starts_with(GIT_SSH_MARKER))
            .unwrap_or(false);
        let user_set =
            (user_value("GIT_SSH_COMMAND").is_some() && !ours) || user_value("GIT_SSH").is_some();
        if !user_set && let Some(exe) = &p.control_exe {
            match git_ssh_command(exe, socks) {
                Ok(v) => {
                    env.insert("GIT_SSH_COMMAND".into(), v.into());
                }
                Err(w) => warnings.push(w),
            }
        }
    }
    (env, warnings)
}

/// `socks5h://[USER:PASS@]S`, credentials percent-encoded.
fn socks_url(addr: SocketAddr, auth: Option<&(String, String)>) -> String {
    match auth {
        Some((user, pass)) => format!(
            "socks5h://{}:{}@{addr}",
            percent_encode(user),
            percent_encode(pass)
        ),
        None => format!("socks5h://{addr}"),
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `PORTCULLIS_GIT_SSH=1 ssh -o ProxyCommand="'E' socks-connect S %h %p"`, refused when `E`
/// holds a character that would need quoting.
fn git_ssh_command(exe: &Path, socks: SocketAddr) -> Result<String, Warning> {
    let e = exe.to_str().ok_or_else(|| {
        format!(
            "GIT_SSH_COMMAND not set: the path of portcullis-control ({}) is not UTF-8",
            exe.display()
        )
    })?;
    if let Some(c) = e
        .chars()
        .find(|c| matches!(c, '\'' | '"' | '$' | '`' | '\\' | '%' | '\n'))
    {
        return Err(format!(
            "GIT_SSH_COMMAND not set: the path of portcullis-control ({e}) contains {c:?}, which cannot be quoted safely"
        ));
    }
    Ok(format!(
        "{GIT_SSH_MARKER}ssh -o ProxyCommand=\"'{e}' socks-connect {socks} %h %p\""
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints() -> ProxyEndpoints {
        ProxyEndpoints {
            http: "127.0.0.1:4000".parse().unwrap(),
            socks5: Some("127.0.0.1:5000".parse().unwrap()),
            socks_auth: None,
            mitm_dir: None,
            allow_local_binding: false,
            control_exe: Some(PathBuf::from("/usr/bin/portcullis-control")),
        }
    }

    fn get<'a>(env: &'a BTreeMap<OsString, OsString>, k: &str) -> Option<&'a str> {
        env.get(&OsString::from(k)).and_then(|v| v.to_str())
    }

    fn inherited(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    #[test]
    fn http_vars_never_socks_and_all_proxy_is_socks() {
        let (env, _) = child_env(Vec::new(), &endpoints());
        for (k, v) in &env {
            let (k, v) = (k.to_str().unwrap(), v.to_str().unwrap());
            let upper = k.to_ascii_uppercase();
            if !upper.contains("PROXY") || upper.contains("NO_PROXY") || upper.contains("NOPROXY") {
                continue;
            }
            if ALL_VARS.contains(&k) {
                assert_eq!(v, "socks5h://127.0.0.1:5000", "{k}");
            } else if upper.ends_with("_PROXY")
                && k != "NODE_USE_ENV_PROXY"
                && k != "ELECTRON_GET_USE_PROXY"
            {
                assert_eq!(v, "http://127.0.0.1:4000", "{k}");
            }
        }
        assert_eq!(get(&env, "HTTPS_PROXY"), Some("http://127.0.0.1:4000"));
        assert_eq!(
            get(&env, "GLOBAL_AGENT_HTTPS_PROXY"),
            Some("http://127.0.0.1:4000")
        );
        assert_eq!(get(&env, "NODE_USE_ENV_PROXY"), Some("1"));
        assert_eq!(get(&env, "ELECTRON_GET_USE_PROXY"), Some("true"));
        assert_eq!(get(&env, "PORTCULLIS_PROXY_ACTIVE"), Some("1"));
        assert_eq!(get(&env, "PORTCULLIS_ALLOW_LOCAL_BINDING"), Some("0"));
    }

    #[test]
    fn socks_disabled_means_http_everywhere_and_no_git_ssh() {
        let mut p = endpoints();
        p.socks5 = None;
        let (env, _) = child_env(Vec::new(), &p);
        assert_eq!(get(&env, "ALL_PROXY"), Some("http://127.0.0.1:4000"));
        assert_eq!(get(&env, "ftp_proxy"), Some("http://127.0.0.1:4000"));
        assert_eq!(get(&env, "GIT_SSH_COMMAND"), None);
    }

    #[test]
    fn removed_and_replaced_and_never_set() {
        let (env, _) = child_env(
            inherited(&[
                ("PORTCULLIS_TOKEN", "t"),
                ("PORTCULLIS_CONTROL", "unix:/x"),
                ("YARN_NO_PROXY", "*"),
                ("NO_PROXY", ".corp.example"),
                ("HOME", "/home/u"),
            ]),
            &endpoints(),
        );
        for k in ["PORTCULLIS_TOKEN", "PORTCULLIS_CONTROL", "YARN_NO_PROXY"] {
            assert_eq!(get(&env, k), None, "{k}");
        }
        for k in NO_PROXY_VARS {
            assert_eq!(get(&env, k), Some(NO_PROXY), "{k}");
        }
        assert_eq!(get(&env, "HOME"), Some("/home/u"));
        assert_eq!(get(&env, "npm_config_http_proxy"), None);
        assert_eq!(get(&env, "NPM_CONFIG_HTTP_PROXY"), None);
    }

    #[test]
    fn ipv6_is_bracketed_and_credentials_encoded() {
        let mut p = endpoints();
        p.http = "[::1]:4000".parse().unwrap();
        p.socks5 = Some("[::1]:5000".parse().unwrap());
        p.socks_auth = Some(("us er".into(), "p@ss:/".into()));
        let (env, _) = child_env(Vec::new(), &p);
        assert_eq!(get(&env, "HTTP_PROXY"), Some("http://[::1]:4000"));
        assert_eq!(
            get(&env, "ALL_PROXY"),
            Some("socks5h://us%20er:p%40ss%3A%2F@[::1]:5000")
        );
        // SOCKS authentication: no GIT_SSH_COMMAND (env.md §4 heading).
        assert_eq!(get(&env, "GIT_SSH_COMMAND"), None);
    }

    #[test]
    fn ca_vars_only_with_mitm() {
        let (env, _) = child_env(Vec::new(), &endpoints());
        assert_eq!(get(&env, "SSL_CERT_FILE"), None);
        let mut p = endpoints();
        p.mitm_dir = Some("/run/x/mitm".into());
        let (env, _) = child_env(inherited(&[("SSL_CERT_FILE", "/etc/x.pem")]), &p);
        for k in portcullis::config::CA_BUNDLE_VARS {
            assert_eq!(get(&env, k), Some("/run/x/mitm/ca-bundle.pem"), "{k}");
        }
        assert_eq!(get(&env, "NODE_EXTRA_CA_CERTS"), Some("/run/x/mitm/ca.pem"));
        assert_eq!(
            get(&env, "PORTCULLIS_CA_CERTIFICATE"),
            Some("/run/x/mitm/ca.pem")
        );
    }

    #[test]
    fn git_ssh_command_rules() {
        let (env, _) = child_env(Vec::new(), &endpoints());
        assert_eq!(
            get(&env, "GIT_SSH_COMMAND"),
            Some(
                "PORTCULLIS_GIT_SSH=1 ssh -o ProxyCommand=\"'/usr/bin/portcullis-control' socks-connect 127.0.0.1:5000 %h %p\""
            )
        );
        let (env, _) = child_env(inherited(&[("GIT_SSH_COMMAND", "ssh -v")]), &endpoints());
        assert_eq!(get(&env, "GIT_SSH_COMMAND"), Some("ssh -v"));
        let (env, _) = child_env(inherited(&[("GIT_SSH", "/bin/myssh")]), &endpoints());
        assert_eq!(get(&env, "GIT_SSH_COMMAND"), None);
        let (env, _) = child_env(
            inherited(&[("GIT_SSH_COMMAND", "PORTCULLIS_GIT_SSH=1 ssh -o old")]),
            &endpoints(),
        );
        assert!(
            get(&env, "GIT_SSH_COMMAND")
                .unwrap()
                .contains("127.0.0.1:5000")
        );
        let mut p = endpoints();
        p.control_exe = Some("/tmp/it's/portcullis-control".into());
        let (env, warnings) = child_env(Vec::new(), &p);
        assert_eq!(get(&env, "GIT_SSH_COMMAND"), None);
        assert_eq!(warnings.len(), 1);
    }
}
