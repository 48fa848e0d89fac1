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

/// Ports handed out by [`free_port`]: below Linux's ephemeral range (32768-60999), so an
/// outgoing connection of a concurrently running test cannot take one between the moment
/// it is chosen and the moment a server binds it.
const PORT_RANGE: std::ops::Range<u32> = 20_000..32_000;

/// A port that was free a moment ago and that no other call in this process returned.
/// Each test process starts at its own offset in [`PORT_RANGE`], so concurrent test
/// processes rarely meet; [`Daemon::start_opts`] retries with new ports when they do.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let span = PORT_RANGE.end - PORT_RANGE.start;
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % span,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..span {
        let port = (PORT_RANGE.start + NEXT.fetch_add(1, Ordering::SeqCst) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {PORT_RANGE:?}")
}

/// How to start a dfdaemon beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct DaemonOptions {
    /// `host.hostname`; defaults to `test`. Daemons of one swarm need distinct names (the
    /// host ID is `<ip>-<hostname>`, and a parent is never on the child's own host).
    pub hostname: Option<String>,
    /// Lines (indented by two spaces) placed under the `download:` section.
    pub download_yaml: String,
    /// YAML appended verbatim.
    pub extra_yaml: String,
    /// Lines (indented by four spaces) placed under `storage.server` (the piece server).
    pub piece_server_yaml: String,
    /// Lines (indented by two spaces) placed under `proxy:` (its `server` section is the
    /// harness's: loopback and a free port).
    pub proxy_yaml: String,
    /// Lines (indented by four spaces) placed under `proxy.server`.
    pub proxy_server_yaml: String,
    /// Lines (indented by two spaces) placed under the `upload:` section.
    pub upload_yaml: String,
    /// Mutual TLS: the identity this daemon serves with (`upload.server`) and the one it
    /// presents to peers and schedulers (`upload.client`, `scheduler`).
    pub tls: Option<DaemonTls>,
    /// Scheduler addresses written to a dynconfig file passed with `--dynconfig`.
    pub schedulers: Vec<String>,
    /// Run as a seed peer.
    pub seed: bool,
    /// The address to listen on and announce; 127.0.0.1 by default.
    pub ip: Option<String>,
    /// Run inside this network namespace (`ip netns exec`).
    pub netns: Option<String>,
    /// The manager's gRPC address (`manager.addr`): schedulers come from it (refreshed
    /// every second), and a seed peer registers and keeps alive every second.
    pub manager: Option<String>,
    /// Environment variables of the process (e.g. cloud credentials).
    pub env: Vec<(String, String)>,
}

/// PEM files of a daemon's TLS identities.
#[derive(Debug, Clone)]
pub struct DaemonTls {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl DaemonTls {
    fn yaml(ca: &Path, cert: &Path, key: &Path, indent: &str) -> String {
        format!(
            "{indent}caCert: {}\n{indent}cert: {}\n{indent}key: {}\n",
            ca.display(),
            cert.display(),
            key.display()
        )
    }
}

/// A running dfdaemon; killed when dropped.
pub struct Daemon {
    pub dir: PathBuf,
    pub dynconfig: Option<PathBuf>,
    pub ip: String,
    pub netns: Option<String>,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub piece_port: u16,
    pub upload_port: u16,
    pub metrics_port: u16,
    pub health_port: u16,
    /// The proxy and registry mirror, on 127.0.0.1 (in the daemon's namespace).
    pub proxy_port: u16,
    env: Vec<(String, String)>,
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
        Daemon::start_opts(
            dir,
            &DaemonOptions {
                download_yaml: download_yaml.to_string(),
                extra_yaml: extra_yaml.to_string(),
                ..Default::default()
            },
        )
    }

    /// Starts a daemon with every option. When a chosen port was taken meanwhile (another
    /// test process), tries again with new ports.
    pub fn start_opts(dir: &Path, options: &DaemonOptions) -> anyhow::Result<Daemon> {
        let mut attempt = 0;
        loop {
            match Daemon::start_once(dir, options) {
                Err(e) if attempt < 3 && e.to_string().contains("Address already in use") => {
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    fn start_once(dir: &Path, options: &DaemonOptions) -> anyhow::Result<Daemon> {
        let download_yaml = options.download_yaml.as_str();
        let mut extra = options.extra_yaml.clone();
        if options.seed {
            extra.push_str("seedPeer:\n  enable: true\n  type: super\n  keepaliveInterval: 1s\n");
        }
        if let Some(manager) = &options.manager {
            // With TLS, the daemon presents its client identity to the manager too.
            let tls = options
                .tls
                .as_ref()
                .map(|t| DaemonTls::yaml(&t.ca_cert, &t.client_cert, &t.client_key, "  "))
                .unwrap_or_default();
            extra.push_str(&format!(
                "manager:\n  addr: {manager}\n{tls}dynconfig:\n  refreshInterval: 1s\n"
            ));
        }
        let extra_yaml = extra.as_str();
        let hostname = options.hostname.as_deref().unwrap_or("test");
        let ip = options
            .ip
            .clone()
            .unwrap_or_else(|| "127.0.0.1".to_string());
        std::fs::create_dir_all(dir)?;
        let dynconfig = if options.schedulers.is_empty() {
            None
        } else {
            let path = dir.join("dynconfig.yaml");
            let addrs: Vec<String> = options
                .schedulers
                .iter()
                .map(|a| format!("    - {a}\n"))
                .collect();
            std::fs::write(&path, format!("scheduler:\n  addrs:\n{}", addrs.concat()))?;
            Some(path)
        };
        let socket = dir.join("dfdaemon.sock");
        let (piece_port, upload_port, metrics_port, health_port, proxy_port) = (
            free_port(),
            free_port(),
            free_port(),
            free_port(),
            free_port(),
        );
        let config = dir.join("dfdaemon.yaml");
        let (upload_tls, client_tls, scheduler_tls) = match &options.tls {
            None => (String::new(), String::new(), String::new()),
            Some(t) => (
                DaemonTls::yaml(&t.ca_cert, &t.server_cert, &t.server_key, "    "),
                format!(
                    "  client:\n{}",
                    DaemonTls::yaml(&t.ca_cert, &t.client_cert, &t.client_key, "    ")
                ),
                format!(
                    "scheduler:\n{}",
                    DaemonTls::yaml(&t.ca_cert, &t.client_cert, &t.client_key, "  ")
                ),
            ),
        };
        std::fs::write(
            &config,
            format!(
                "host:\n  ip: {ip}\n  hostname: {hostname}\n\
                 server:\n  cacheDir: {cache}\n\
                 download:\n  server:\n    socketPath: {socket}\n{download_yaml}\
                 upload:\n  server:\n    ip: {ip}\n    port: {upload_port}\n{upload_tls}{client_tls}{upload_yaml}\
                 storage:\n  dir: {data}\n  server:\n    ip: {ip}\n    tcpPort: {piece_port}\n{piece_server_yaml}\
                 metrics:\n  server:\n    ip: {ip}\n    port: {metrics_port}\n\
                 health:\n  server:\n    ip: {ip}\n    port: {health_port}\n\
                 proxy:\n  server:\n    ip: 127.0.0.1\n    port: {proxy_port}\n{proxy_server_yaml}{proxy_yaml}\
                 {scheduler_tls}{extra_yaml}",
                socket = socket.display(),
                data = dir.join("data").display(),
                cache = dir.join("cache").display(),
                piece_server_yaml = options.piece_server_yaml,
                proxy_yaml = options.proxy_yaml,
                proxy_server_yaml = options.proxy_server_yaml,
                upload_yaml = options.upload_yaml,
            ),
        )?;
        let mut daemon = Daemon {
            dir: dir.to_path_buf(),
            dynconfig,
            ip,
            netns: options.netns.clone(),
            socket,
            config,
            piece_port,
            upload_port,
            metrics_port,
            health_port,
            proxy_port,
            env: options.env.clone(),
            child: None,
        };
        daemon.restart()?;
        Ok(daemon)
    }

    /// (Re)starts the process with the same config and waits until its socket answers.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let mut command = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin_path("dfdaemon"));
                c
            }
            None => Command::new(bin_path("dfdaemon")),
        };
        if let Some(dynconfig) = &self.dynconfig {
            command.arg("--dynconfig").arg(dynconfig);
        }
        command.arg("--config").arg(&self.config);
        command.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let child = spawn_until_ready("dfdaemon", command, &self.dir.join("dfdaemon.log"), || {
            std::os::unix::net::UnixStream::connect(&self.socket).is_ok()
                && std::net::TcpStream::connect((self.ip.as_str(), self.piece_port)).is_ok()
        })?;
        self.child = Some(child);
        Ok(())
    }

    /// The process ID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal` (e.g. `-STOP`, `-CONT`) to the process.
    pub fn signal(&self, signal: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .arg(signal)
                .arg(pid.to_string())
                .status();
        }
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

    /// Where the daemon stores its tasks' content files (upstream's layout).
    pub fn tasks_dir(&self) -> PathBuf {
        self.data_dir().join("content").join("tasks")
    }

    /// The content file of one task.
    pub fn content_path(&self, task_id: &str) -> PathBuf {
        self.tasks_dir().join(&task_id[..3]).join(task_id)
    }

    /// A `DfdaemonDownload` client on the daemon's unix socket, as dfget and dfcache use.
    pub async fn download_client(
        &self,
    ) -> anyhow::Result<
        dragonfly_api::dfdaemon::v2::dfdaemon_download_client::DfdaemonDownloadClient<
            tonic::transport::Channel,
        >,
    > {
        let path = self.socket.clone();
        let channel = tonic::transport::Endpoint::try_from("http://local")?
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    tokio::net::UnixStream::connect(path)
                        .await
                        .map(hyper_util::rt::TokioIo::new)
                }
            }))
            .await?;
        Ok(
            dragonfly_api::dfdaemon::v2::dfdaemon_download_client::DfdaemonDownloadClient::new(
                channel,
            ),
        )
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

    /// This daemon's metrics page.
    pub fn metrics(&self) -> String {
        Daemon::http_get_at(&self.ip, self.metrics_port, "/metrics").unwrap_or_default()
    }

    /// GETs a path from the metrics or health server (HTTP/1.0, whole body).
    pub fn http_get(port: u16, path: &str) -> anyhow::Result<String> {
        Daemon::http_get_at("127.0.0.1", port, path)
    }

    /// [`Daemon::http_get`] on another address.
    pub fn http_get_at(ip: &str, port: u16, path: &str) -> anyhow::Result<String> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect((ip, port))?;
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

/// A running scheduler; killed when dropped.
pub struct Scheduler {
    pub ip: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub port: u16,
    pub metrics_port: u16,
    child: Option<Child>,
}

impl Scheduler {
    /// Starts a scheduler whose seed peers are the upload ports given.
    pub fn start(
        dir: &Path,
        seed_upload_ports: &[u16],
        extra_yaml: &str,
    ) -> anyhow::Result<Scheduler> {
        Scheduler::start_at(dir, free_port(), seed_upload_ports, extra_yaml)
    }

    /// Like [`Scheduler::start`], on a chosen port.
    pub fn start_at(
        dir: &Path,
        port: u16,
        seed_upload_ports: &[u16],
        extra_yaml: &str,
    ) -> anyhow::Result<Scheduler> {
        let seeds: Vec<(String, u16)> = seed_upload_ports
            .iter()
            .map(|p| ("127.0.0.1".to_string(), *p))
            .collect();
        Scheduler::start_on(dir, "127.0.0.1", port, &seeds, extra_yaml)
    }

    /// A scheduler listening on `ip:port` with seed peers at `(ip, upload port)`.
    pub fn start_on(
        dir: &Path,
        ip: &str,
        port: u16,
        seed_peers: &[(String, u16)],
        extra_yaml: &str,
    ) -> anyhow::Result<Scheduler> {
        Scheduler::start_full(dir, ip, port, seed_peers, "", extra_yaml)
    }

    /// [`Scheduler::start_on`], with `server_yaml` (lines indented by two spaces) under
    /// `server:` (e.g. `tls:`).
    pub fn start_full(
        dir: &Path,
        ip: &str,
        port: u16,
        seed_peers: &[(String, u16)],
        server_yaml: &str,
        extra_yaml: &str,
    ) -> anyhow::Result<Scheduler> {
        std::fs::create_dir_all(dir)?;
        let metrics_port = free_port();
        let seeds: String = seed_peers
            .iter()
            .map(|(ip, p)| format!("  - ip: {ip}\n    port: {p}\n"))
            .collect();
        let config = dir.join("scheduler.yaml");
        std::fs::write(
            &config,
            format!(
                "server:\n  listenIP: {ip}\n  port: {port}\n  cacheDir: {cache}\n{server_yaml}\
                 metrics:\n  addr: 127.0.0.1:{metrics_port}\n\
                 seedPeers:\n{seeds}{extra_yaml}",
                seeds = if seeds.is_empty() {
                    "  []\n".to_string()
                } else {
                    seeds
                },
                cache = dir.join("cache").display(),
            ),
        )?;
        let mut s = Scheduler {
            ip: ip.to_string(),
            dir: dir.to_path_buf(),
            config,
            port,
            metrics_port,
            child: None,
        };
        s.restart()?;
        Ok(s)
    }

    /// A scheduler on 127.0.0.1 in the manager's cluster 1, keeping alive and refreshing
    /// its config every second; its seed peers come from the manager. Its hostname is the
    /// directory's name (the manager tells schedulers apart by hostname and address).
    pub fn start_with_manager(
        dir: &Path,
        manager: &str,
        extra_yaml: &str,
    ) -> anyhow::Result<Scheduler> {
        let yaml = format!(
            "manager:\n  addr: {manager}\n  schedulerClusterID: 1\n  keepAlive:\n    interval: 1s\n\
             dynconfig:\n  refreshInterval: 1s\n{extra_yaml}"
        );
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "scheduler".into());
        Scheduler::start_full(
            dir,
            "127.0.0.1",
            free_port(),
            &[],
            &format!("  host: {name}\n"),
            &yaml,
        )
    }

    pub fn addr(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    /// (Re)starts the process and waits until its port answers.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let mut command = Command::new(bin_path("scheduler"));
        command.arg("--config").arg(&self.config);
        let child = spawn_until_ready(
            "scheduler",
            command,
            &self.dir.join("scheduler.log"),
            || std::net::TcpStream::connect((self.ip.as_str(), self.port)).is_ok(),
        )?;
        self.child = Some(child);
        Ok(())
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("scheduler.log")).unwrap_or_default()
    }

    pub fn metrics(&self) -> String {
        Daemon::http_get(self.metrics_port, "/metrics").unwrap_or_default()
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Spawns `command` with debug logging appended to `log`, and waits up to 20 s until
/// `ready()`; fails with the log when the process exits first or never becomes ready.
pub(crate) fn spawn_until_ready(
    what: &str,
    mut command: Command,
    log: &Path,
    ready: impl Fn() -> bool,
) -> anyhow::Result<Child> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut child = command
        .arg("--log-level")
        .arg("debug")
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .with_context(|| format!("spawn {what}"))?;
    let read_log = || std::fs::read_to_string(log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if ready() {
            return Ok(child);
        }
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited with {status}; log:\n{}", read_log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    bail!("{what} did not become ready; log:\n{}", read_log())
}
