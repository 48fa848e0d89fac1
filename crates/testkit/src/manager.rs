//! The `manager` binary on loopback with its own SQLite file (or a database URL), and a
//! small HTTP client for its REST API.

use crate::daemon::{bin_path, free_port, spawn_until_ready};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

/// The root password every test manager starts with.
pub const ROOT_PASSWORD: &str = "test-root-password";

/// A running manager; killed when dropped.
pub struct Manager {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub rest_port: u16,
    pub grpc_port: u16,
    child: Option<Child>,
}

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

impl Manager {
    /// Starts a manager on an SQLite file in `dir`; `extra_yaml` is appended to its config
    /// right after the `database:` section (lines indented by two spaces extend it).
    pub fn start(dir: &Path, extra_yaml: &str) -> anyhow::Result<Manager> {
        Manager::start_full(dir, "", extra_yaml)
    }

    /// [`Manager::start`] with `grpc_yaml` (lines indented by four spaces) under
    /// `server.grpc` (e.g. `tls:`).
    pub fn start_full(dir: &Path, grpc_yaml: &str, extra_yaml: &str) -> anyhow::Result<Manager> {
        std::fs::create_dir_all(dir)?;
        let (rest_port, grpc_port) = (free_port(), free_port());
        let config = dir.join("manager.yaml");
        std::fs::write(
            &config,
            format!(
                "server:\n  rest:\n    addr: 127.0.0.1:{rest_port}\n  grpc:\n    listenIP: 127.0.0.1\n    advertiseIP: 127.0.0.1\n    port: {{start: {grpc_port}, end: {grpc_port}}}\n{grpc_yaml}\
                 keepAliveTimeout: 5s\n\
                 database:\n  type: sqlite\n  sqlite:\n    path: {}\n{extra_yaml}",
                dir.join("manager.db").display()
            ),
        )?;
        let mut m = Manager {
            dir: dir.to_path_buf(),
            config,
            rest_port,
            grpc_port,
            child: None,
        };
        m.restart()?;
        Ok(m)
    }

    /// (Re)starts the process and waits until both ports answer.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let mut command = Command::new(bin_path("manager"));
        command
            .arg("--config")
            .arg(&self.config)
            .env("DRAGONFLY_INITIAL_ROOT_PASSWORD", ROOT_PASSWORD);
        let (rest, grpc) = (self.rest_port, self.grpc_port);
        let child = spawn_until_ready("manager", command, &self.dir.join("manager.log"), || {
            std::net::TcpStream::connect(("127.0.0.1", rest)).is_ok()
                && std::net::TcpStream::connect(("127.0.0.1", grpc)).is_ok()
        })?;
        self.child = Some(child);
        Ok(())
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `127.0.0.1:<grpc port>`, what `manager.addr` takes.
    pub fn grpc_addr(&self) -> String {
        format!("127.0.0.1:{}", self.grpc_port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("manager.log")).unwrap_or_default()
    }

    /// One REST request (`Authorization: Bearer <token>` when given; `body` is JSON).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> Answer {
        http(self.rest_port, method, path, token, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// A sign-in token of root.
    pub fn root_token(&self) -> String {
        let body = serde_json::json!({"name": "root", "password": ROOT_PASSWORD}).to_string();
        let a = self.request("POST", "/api/v1/users/signin", None, Some(&body));
        assert_eq!(a.status, 200, "root sign-in failed: {}", a.body);
        a.json()["token"].as_str().expect("token").to_string()
    }

    /// A personal access token of root with these scopes (for the open API).
    pub fn personal_access_token(&self, scopes: &[&str]) -> String {
        let body =
            serde_json::json!({"name": format!("t{}", free_port()), "scopes": scopes}).to_string();
        let a = self.request(
            "POST",
            "/api/v1/personal-access-tokens",
            Some(&self.root_token()),
            Some(&body),
        );
        assert_eq!(a.status, 200, "creating a token failed: {}", a.body);
        a.json()["token"].as_str().expect("token").to_string()
    }

    /// Polls `GET path` (a job) until its state is no longer PENDING, at most `limit`.
    pub fn wait_job(&self, path: &str, token: &str, limit: Duration) -> serde_json::Value {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let a = self.request("GET", path, Some(token), None);
            assert_eq!(a.status, 200, "{path}: {}", a.body);
            let job = a.json();
            if job["state"] != "PENDING" {
                return job;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "job still PENDING after {limit:?}: {job}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A plain HTTP/1.1 request to 127.0.0.1:`port`; the connection closes after the answer.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> anyhow::Result<Answer> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nAccept: application/json\r\n");
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || method == "POST" || method == "PATCH" || method == "PUT" {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> anyhow::Result<Answer> {
    let text = String::from_utf8_lossy(raw);
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no HTTP head in {text:?}"))?;
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("bad status line in {head:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        let mut out = String::new();
        let mut rest = rest;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 || after.len() < n {
                break;
            }
            out.push_str(&after[..n]);
            rest = after[n..].trim_start_matches("\r\n");
        }
        out
    } else {
        rest.to_string()
    };
    Ok(Answer {
        status,
        headers,
        body,
    })
}
