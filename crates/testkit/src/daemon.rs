//! Runs the real `dfdaemon` binary with a private directory and ports.

use anyhow::{bail, Context};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of a workspace binary next to the running test (target/<profile>/<name>).
pub fn bin_path(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("D7Y_BIN_DIR") {
        return Path::new(&dir).join(name);
    }
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} not found: run `cargo build --workspace --bins` before the tests",
        path.display()
    );
    path
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running dfdaemon; killed when dropped.
pub struct Daemon {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub piece_port: u16,
    pub upload_port: u16,
    pub metrics_port: u16,
    pub health_port: u16,
    child: Option<Child>,
}

impl Daemon {
    /// Writes a config under `dir` (extra YAML is appended verbatim) and starts the daemon.
    pub fn start(dir: &Path, extra_yaml: &str) -> anyhow::Result<Daemon> {
        Daemon::start_with(dir, "", extra_yaml)
    }

    /// Like [`Daemon::start`], with `download_yaml` (lines indented by two spaces) placed
    /// under the `download:` section.
    pub fn start_with(dir: &Path, download_yaml: &str, extra_yaml: &str) -> anyhow::Result<Daemon> {
        std::fs::create_dir_all(dir)?;
        let socket = dir.join("dfdaemon.sock");
        let (piece_port, upload_port, metrics_port, health_port) =
            (free_port(), free_port(), free_port(), free_port());
        let config = dir.join("dfdaemon.yaml");
        std::fs::write(
            &config,
            format!(
                "host:\n  ip: 127.0.0.1\n  hostname: test\n\
                 download:\n  server:\n    socketPath: {socket}\n{download_yaml}\
                 upload:\n  server:\n    ip: 127.0.0.1\n    port: {upload_port}\n\
                 storage:\n  dir: {data}\n  server:\n    ip: 127.0.0.1\n    tcpPort: {piece_port}\n\
                 metrics:\n  server:\n    ip: 127.0.0.1\n    port: {metrics_port}\n\
                 health:\n  server:\n    ip: 127.0.0.1\n    port: {health_port}\n{extra_yaml}",
                socket = socket.display(),
                data = dir.join("data").display(),
            ),
        )?;
        let mut daemon = Daemon {
            dir: dir.to_path_buf(),
            socket,
            config,
            piece_port,
            upload_port,
            metrics_port,
            health_port,
            child: None,
        };
        daemon.restart()?;
        Ok(daemon)
    }

    /// (Re)starts the process with the same config and waits until its socket answers.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("dfdaemon.log"))?;
        let child = Command::new(bin_path("dfdaemon"))
            .arg("--config")
            .arg(&self.config)
            .arg("--log-level")
            .arg("debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawn dfdaemon")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok()
                && std::net::TcpStream::connect(("127.0.0.1", self.piece_port)).is_ok()
            {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait()? {
                bail!("dfdaemon exited with {status}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("dfdaemon did not become ready; log:\n{}", self.log())
    }

    /// SIGKILLs the process (a crash, no cleanup).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dfdaemon.log")).unwrap_or_default()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// A dfget command aimed at this daemon, without progress output.
    pub fn dfget(&self, url: &str, output: &Path) -> Command {
        let mut cmd = Command::new(bin_path("dfget"));
        cmd.arg(url)
            .arg("-O")
            .arg(output)
            .arg("-e")
            .arg(&self.socket)
            .arg("--no-progress");
        cmd
    }

    /// Runs dfget to completion.
    pub fn dfget_output(&self, url: &str, output: &Path, extra: &[&str]) -> Output {
        self.dfget(url, output)
            .args(extra)
            .output()
            .expect("run dfget")
    }

    /// GETs a path from the metrics or health server (HTTP/1.0, whole body).
    pub fn http_get(port: u16, path: &str) -> anyhow::Result<String> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}
