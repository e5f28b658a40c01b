//! README.md CLI contract: `--help`, usage errors, configuration errors, ready line, signals.

use portcullis_integration_tests::{ProxyProcess, run_to_exit};
use std::time::Duration;

#[test]
fn help_exits_0() {
    let (status, stdout, _stderr) = run_to_exit(&["--help"], None);
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM after the ready line must be a clean shutdown, got {status:?}"
    );
    assert!(stdout.contains("--allow"), "{stdout}");
    assert!(stdout.contains("--config"), "{stdout}");
}

#[test]
fn bad_flag_exits_2() {
    let (status, stdout, stderr) = run_to_exit(&["--no-such-flag"], None);
    assert_eq!(status.code(), Some(2), "stderr: {stderr}");
    assert!(!stdout.contains("\"ready\""));
}

#[test]
fn bad_config_exits_2_with_config_error() {
    let cases = [
        "[network]\nallowed_domains = 5\n",
        "[limits]\ndns_timeout_ms = 1\n",
        "[network]\nallowed_domains = [\"**\"]\n",
        "this is not toml ===\n",
    ];
    for cfg in cases {
        let (status, stdout, stderr) = run_to_exit(
            &[
                "--http",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
                "--socks5",
                "127.0.0.1:0",
            ],
            Some(cfg),
        );
        assert_eq!(status.code(), Some(2), "{cfg:?}: {stderr}");
        assert!(stderr.contains("config error:"), "{cfg:?}: {stderr}");
        assert!(!stdout.contains("\"ready\""), "{cfg:?}");
    }
}

#[test]
fn ready_line_shape_and_sigterm_right_after_ready_exits_0() {
    let mut proxy = ProxyProcess::start(&[], None);
    let keys: Vec<&String> = proxy.ready.as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 5, "{}", proxy.ready);
    assert_eq!(proxy.ready["component"], "proxy");
    assert!(proxy.http.starts_with("127.0.0.1:"));
    proxy.signal(libc::SIGTERM);
    let status = proxy
        .wait_exit(Duration::from_secs(30))
        .expect("exit after SIGTERM");
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM after the ready line must be a clean shutdown, got {status:?}"
    );
}

#[test]
fn disabled_socks5_is_null_in_ready_line() {
    let proxy = ProxyProcess::start_exact(
        &["--http", "127.0.0.1:0", "--admin", "127.0.0.1:0"],
        Some("[network]\nenable_socks5 = false\n"),
    );
    assert_eq!(proxy.ready["socks5"], serde_json::Value::Null);
    assert!(proxy.socks5.is_none());
}
