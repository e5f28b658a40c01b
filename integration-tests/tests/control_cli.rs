//! The portcullis-control command line contract: `--help` exits 0, usage errors exit 2.

use std::process::Command;

use portcullis_integration_tests::proxy::control_bin;

fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(control_bin())
        .args(args)
        .output()
        .expect("run portcullis-control");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_lists_every_subcommand() {
    let (code, out, _) = run(&["--help"]);
    assert_eq!(code, Some(0));
    for sub in [
        "serve",
        "exec",
        "pending",
        "approve",
        "deny",
        "policy",
        "socks-connect",
    ] {
        assert!(out.contains(sub), "--help should list {sub}: {out}");
    }
    for sub in ["serve", "exec", "approve"] {
        assert_eq!(run(&[sub, "--help"]).0, Some(0), "{sub} --help");
    }
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["--bogus"][..],
        &["serve", "--bogus"],
        &["exec"],
        &["approve"],
        &["approve", "ask_0123456789abcdef", "--for", "forever"],
        &["serve", "--ask-timeout", "0"],
    ] {
        let (code, _, err) = run(args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
    }
}
