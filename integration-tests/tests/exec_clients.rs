//! Real clients through `exec`'s environment (env.md tests 9 and 12): git over HTTP and over
//! ssh (through `GIT_SSH_COMMAND` and the SOCKS5 listener), pip from a loopback simple index and
//! npm from a loopback registry — each allowed once and blocked once. Origins are
//! `python3 -m http.server` and an sshd of the test's own, on loopback.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use portcullis_integration_tests::DnsServer;
use portcullis_integration_tests::proxy::control_bin;

/// A static file server on 127.0.0.1 (python's http.server), killed on drop.
struct StaticServer {
    child: Child,
    port: u16,
}

impl StaticServer {
    fn start(root: &Path) -> StaticServer {
        let mut child = Command::new("python3")
            .args(["-u", "-m", "http.server", "--bind", "127.0.0.1", "0"])
            .current_dir(root)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 is needed for the static origin");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        // "Serving HTTP on 127.0.0.1 port 41234 (http://127.0.0.1:41234/) ..."
        let port = line
            .split_whitespace()
            .skip_while(|w| *w != "port")
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected http.server banner: {line}"));
        StaticServer { child, port }
    }
}

impl Drop for StaticServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Names resolve to loopback; `good` is allowed, `bad` is denied.
fn setup(dir: &Path, good: &str, bad: &str) -> (DnsServer, std::path::PathBuf) {
    let dns = DnsServer::start();
    for name in [good, bad] {
        dns.set(name, &["127.0.0.1".parse().unwrap()]);
    }
    let cfg = dir.join("portcullis.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"{}\"\n[network]\nallow_local_binding = true\ndns_servers = [\"{}\"]\nallowed_domains = [\"{good}\"]\ndenied_domains = [\"{bad}\"]\n",
            dir.join("state").display(),
            dns.addr_string()
        ),
    )
    .unwrap();
    (dns, cfg)
}

fn exec(cfg: &Path, dir: &Path, command: &[&str]) -> Output {
    exec_env(cfg, dir, command, &[])
}

/// `exec` with extra environment variables for the command; bounded to 120 s.
fn exec_env(cfg: &Path, dir: &Path, command: &[&str], env: &[(&str, &str)]) -> Output {
    let mut child = Command::new(control_bin())
        .arg("exec")
        .arg("--config")
        .arg(cfg)
        .args(["--no-prompt", "--"])
        .args(command)
        .current_dir(dir)
        .env("HOME", dir)
        .env("npm_config_cache", dir.join("npm-cache"))
        .env("npm_config_update_notifier", "false")
        .env("PIP_CACHE_DIR", dir.join("pip-cache"))
        .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env_remove("GIT_SSH_COMMAND")
        .env_remove("GIT_SSH")
        .env_remove("PORTCULLIS_LOG")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("exec did not finish in time");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn sh(dir: &Path, script: &str) {
    let out = Command::new("sh")
        .args(["-c", script])
        .current_dir(dir)
        .env("HOME", dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{script}: {}", text(&out.stderr));
}

#[test]
fn git_clone_over_http_allowed_and_blocked() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("www");
    std::fs::create_dir_all(&root).unwrap();
    sh(
        dir.path(),
        "git init -q -b main src && cd src && echo hello > README && git add README && \
         git -c user.name=t -c user.email=t@t commit -q -m one && cd .. && \
         git clone -q --bare src www/repo.git && cd www/repo.git && git update-server-info",
    );
    let server = StaticServer::start(&root);
    let (_dns, cfg) = setup(dir.path(), "git.test", "blocked-git.test");
    let port = server.port;
    let out = exec(
        &cfg,
        dir.path(),
        &[
            "git",
            "clone",
            "-q",
            &format!("http://git.test:{port}/repo.git"),
            "copy",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("copy/README")).unwrap(),
        "hello\n"
    );
    let out = exec(
        &cfg,
        dir.path(),
        &[
            "git",
            "clone",
            "-q",
            &format!("http://blocked-git.test:{port}/repo.git"),
            "copy2",
        ],
    );
    let stderr = text(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr.contains("403"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "portcullis: blocked blocked-git.test:{port} (http): denied x"
        )),
        "{stderr}"
    );
}

/// A minimal pure-python wheel, written with python's zipfile.
fn make_wheel(dir: &Path) {
    let script = r#"
import zipfile, hashlib, base64
name = "demo_pkg-1.0-py3-none-any.whl"
files = {
    "demo_pkg/__init__.py": b"VALUE = 1\n",
    "demo_pkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: demo-pkg\nVersion: 1.0\n",
    "demo_pkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
record = []
for path, data in files.items():
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    record.append(f"{path},sha256={digest},{len(data)}")
record.append("demo_pkg-1.0.dist-info/RECORD,,")
files["demo_pkg-1.0.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
with zipfile.ZipFile("www/files/" + name, "w") as z:
    for path, data in files.items():
        z.writestr(path, data)
"#;
    std::fs::create_dir_all(dir.join("www/files")).unwrap();
    std::fs::create_dir_all(dir.join("www/simple/demo-pkg")).unwrap();
    let out = Command::new("python3")
        .args(["-c", script])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::fs::write(
        dir.join("www/simple/demo-pkg/index.html"),
        "<!DOCTYPE html><html><body><a href=\"../../files/demo_pkg-1.0-py3-none-any.whl\">demo_pkg-1.0-py3-none-any.whl</a></body></html>\n",
    )
    .unwrap();
}

#[test]
fn pip_download_from_loopback_index_allowed_and_blocked() {
    let dir = tempfile::tempdir().unwrap();
    make_wheel(dir.path());
    let server = StaticServer::start(&dir.path().join("www"));
    let (_dns, cfg) = setup(dir.path(), "pypi.test", "blocked-pypi.test");
    let port = server.port;
    let pip = |host: &str, dest: &str| {
        exec(
            &cfg,
            dir.path(),
            &[
                "python3",
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--retries",
                "0",
                "--timeout",
                "20",
                "--index-url",
                &format!("http://{host}:{port}/simple/"),
                "--trusted-host",
                host,
                "-d",
                dest,
                "demo-pkg",
            ],
        )
    };
    let out = pip("pypi.test", "dl");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(dir.path().join("dl/demo_pkg-1.0-py3-none-any.whl").exists());
    let out = pip("blocked-pypi.test", "dl2");
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    // pip hides the index's status; exec's summary names the block and its reason.
    assert_ne!(out.status.code(), Some(0), "{all}");
    assert!(
        !dir.path()
            .join("dl2/demo_pkg-1.0-py3-none-any.whl")
            .exists(),
        "{all}"
    );
    assert!(
        all.contains(&format!(
            "portcullis: blocked blocked-pypi.test:{port} (http): denied x"
        )),
        "{all}"
    );
}

#[test]
fn npm_view_from_loopback_registry_allowed_and_blocked() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("www");
    std::fs::create_dir_all(&root).unwrap();
    let server = StaticServer::start(&root);
    let port = server.port;
    let packument = format!(
        r#"{{"name":"demo-pkg","dist-tags":{{"latest":"1.2.3"}},"versions":{{"1.2.3":{{"name":"demo-pkg","version":"1.2.3","description":"loopback registry stub","dist":{{"tarball":"http://npm.test:{port}/demo-pkg-1.2.3.tgz","shasum":"0000000000000000000000000000000000000000"}}}}}},"time":{{"1.2.3":"2026-01-01T00:00:00.000Z"}}}}"#
    );
    std::fs::write(root.join("demo-pkg"), packument).unwrap();
    let (_dns, cfg) = setup(dir.path(), "npm.test", "blocked-npm.test");
    let npm = |host: &str| {
        exec(
            &cfg,
            dir.path(),
            &[
                "npm",
                "view",
                "demo-pkg",
                "version",
                "--registry",
                &format!("http://{host}:{port}/"),
                "--fetch-retries",
                "0",
            ],
        )
    };
    let out = npm("npm.test");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout).trim(), "1.2.3");
    let out = npm("blocked-npm.test");
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert_ne!(out.status.code(), Some(0), "{all}");
    assert!(all.contains("403"), "{all}");
    assert!(
        all.contains(&format!(
            "portcullis: blocked blocked-npm.test:{port} (http): denied x"
        )),
        "{all}"
    );
}

/// An sshd of the test's own on 127.0.0.1 (own host key, config and port), killed on drop.
struct Sshd {
    child: Child,
    port: u16,
}

impl Sshd {
    /// Starts `/usr/sbin/sshd` accepting `client_pub` for the current user.
    fn start(dir: &Path, client_pub: &Path) -> Sshd {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        sh(
            dir,
            "ssh-keygen -q -t ed25519 -N '' -f sshd_host_key -C host",
        );
        // Run as root, sshd wants its privilege-separation directory (the package creates it).
        if Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| text(&o.stdout).trim() == "0")
        {
            std::fs::create_dir_all("/run/sshd").unwrap();
        }
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "ListenAddress 127.0.0.1:{port}\nHostKey {}\nAuthorizedKeysFile {}\nPidFile {}\n\
                 UsePAM no\nStrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nLogLevel ERROR\n",
                dir.join("sshd_host_key").display(),
                client_pub.display(),
                dir.join("sshd.pid").display()
            ),
        )
        .unwrap();
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssh-server (/usr/sbin/sshd) is needed for the git-over-ssh test");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "sshd did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Sshd { child, port }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// env.md test 9: exec's `GIT_SSH_COMMAND` takes `git ls-remote` over ssh through the SOCKS5
/// listener (the name only resolves through the proxy's DNS, so success means it went through
/// the helper); a denied host makes the helper print the refusal and git fail.
#[test]
fn git_ssh_command_set_and_works() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sh(
        d,
        "git init -q -b main src && cd src && echo hello > README && git add README && \
         git -c user.name=t -c user.email=t@t commit -q -m one && cd .. && \
         git clone -q --bare src repo.git && \
         ssh-keygen -q -t ed25519 -N '' -f client_key -C client",
    );
    let sshd = Sshd::start(d, &d.join("client_key.pub"));
    // The ssh exec's GIT_SSH_COMMAND names is found on PATH: a wrapper adds this test's client
    // key and host-key settings with -F; the ProxyCommand stays exec's.
    let bin = d.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(
        d.join("ssh_config"),
        format!(
            "Host *\n  IdentityFile {}\n  IdentitiesOnly yes\n  StrictHostKeyChecking no\n  \
             UserKnownHostsFile /dev/null\n  BatchMode yes\n  LogLevel ERROR\n",
            d.join("client_key").display()
        ),
    )
    .unwrap();
    let wrapper = bin.join("ssh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec /usr/bin/ssh -F '{}' \"$@\"\n",
            d.join("ssh_config").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let user = Command::new("id").arg("-un").output().unwrap();
    let user = text(&user.stdout).trim().to_string();
    let (_dns, cfg) = setup(d, "ssh-git.test", "blocked-ssh.test");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let repo = d.join("repo.git");
    let ls_remote = |host: &str| {
        let url = format!("ssh://{user}@{host}:{}{}", sshd.port, repo.display());
        let out = exec_env(&cfg, d, &["git", "ls-remote", &url], &[("PATH", &path)]);
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    let (code, stdout, stderr) = ls_remote("ssh-git.test");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("refs/heads/main"), "{stdout}\n{stderr}");

    let (code, _, stderr) = ls_remote("blocked-ssh.test");
    assert_ne!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "portcullis: SOCKS5 proxy refused blocked-ssh.test:{} (reply 0x02: blocked by network policy)",
            sshd.port
        )),
        "{stderr}"
    );
}
