//! Real third-party software for the registry-mirror tests: CNCF distribution
//! (`docker-registry`) as the origin registry, `skopeo` to push and pull, `containerd` with
//! its own root, state and socket, and OCI test images written without Docker.
//!
//! The tools come from Debian's packages (`scripts/setup.sh` installs them); a test that
//! finds one missing fails with the package to install.

use crate::{content, free_port};
use anyhow::{bail, Context};
use sha2::Digest as _;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Fails with the Debian package that provides `tool` when it is not on PATH.
pub fn require(tool: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{tool} not found: install the Debian package {package} (scripts/setup.sh does)"
    );
}

/// Makes `name` resolve to 127.0.0.1 through /etc/hosts (Go clients send loopback
/// addresses around a proxy, so forward-proxy tests need a name).
pub fn ensure_host_alias(name: &str) -> anyhow::Result<()> {
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    let present = hosts.lines().any(|l| {
        let mut words = l.split_whitespace();
        words.next() == Some("127.0.0.1") && words.any(|w| w == name)
    });
    if !present {
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open("/etc/hosts")
            .and_then(|mut f| writeln!(f, "127.0.0.1 {name}"))
            .with_context(|| format!("adding {name} to /etc/hosts (needs root)"))?;
    }
    Ok(())
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(data))
}

/// A tar archive holding one regular file.
fn tar_one(name: &str, data: &[u8]) -> Vec<u8> {
    let mut header = [0u8; 512];
    header[..name.len()].copy_from_slice(name.as_bytes());
    let octal = |field: &mut [u8], value: u64| {
        let text = format!("{:0width$o}\0", value, width = field.len() - 1);
        field.copy_from_slice(text.as_bytes());
    };
    octal(&mut header[100..108], 0o644);
    octal(&mut header[108..116], 0);
    octal(&mut header[116..124], 0);
    octal(&mut header[124..136], data.len() as u64);
    octal(&mut header[136..148], 0);
    header[156] = b'0';
    header[257..263].copy_from_slice(b"ustar\0");
    header[263..265].copy_from_slice(b"00");
    header[148..156].copy_from_slice(b"        ");
    let sum: u64 = header.iter().map(|&b| b as u64).sum();
    header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut out = header.to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512 + 1024, 0);
    out
}

/// An OCI image written as an image layout.
#[derive(Debug, Clone)]
pub struct TestImage {
    pub layout: PathBuf,
    pub tag: String,
    /// Layer digests (`sha256:<hex>`) and sizes.
    pub layers: Vec<(String, u64)>,
    pub config: String,
    pub manifest: String,
}

impl TestImage {
    /// `layer_sizes.len()` layers, each a tar with one file of random bytes of that size
    /// (uncompressed, so digests stay as written), deterministic per `seed`.
    pub fn write(layout: &Path, tag: &str, layer_sizes: &[usize], seed: u64) -> TestImage {
        let blobs = layout.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        let put = |data: &[u8]| {
            let hex = sha256_hex(data);
            std::fs::write(blobs.join(&hex), data).unwrap();
            format!("sha256:{hex}")
        };
        let mut layers = Vec::new();
        for (i, size) in layer_sizes.iter().enumerate() {
            let tar = tar_one(
                &format!("layer{i}.bin"),
                &content(*size, seed * 1000 + i as u64),
            );
            layers.push((put(&tar), tar.len() as u64));
        }
        let diff_ids: Vec<String> = layers.iter().map(|(d, _)| format!("\"{d}\"")).collect();
        let config = format!(
            "{{\"architecture\":\"amd64\",\"os\":\"linux\",\"config\":{{}},\"rootfs\":{{\"type\":\"layers\",\"diff_ids\":[{}]}}}}",
            diff_ids.join(",")
        );
        let config_digest = put(config.as_bytes());
        let layer_json: Vec<String> = layers
            .iter()
            .map(|(d, s)| {
                format!("{{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar\",\"digest\":\"{d}\",\"size\":{s}}}")
            })
            .collect();
        let manifest = format!(
            "{{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":{{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"{config_digest}\",\"size\":{}}},\"layers\":[{}]}}",
            config.len(),
            layer_json.join(",")
        );
        let manifest_digest = put(manifest.as_bytes());
        std::fs::write(
            layout.join("index.json"),
            format!(
                "{{\"schemaVersion\":2,\"manifests\":[{{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"{manifest_digest}\",\"size\":{},\"platform\":{{\"architecture\":\"amd64\",\"os\":\"linux\"}},\"annotations\":{{\"org.opencontainers.image.ref.name\":\"{tag}\"}}}}]}}",
                manifest.len()
            ),
        )
        .unwrap();
        std::fs::write(
            layout.join("oci-layout"),
            "{\"imageLayoutVersion\":\"1.0.0\"}",
        )
        .unwrap();
        TestImage {
            layout: layout.to_path_buf(),
            tag: tag.to_string(),
            layers,
            config: config_digest,
            manifest: manifest_digest,
        }
    }

    /// Every blob of the image: layers and config.
    pub fn blobs(&self) -> Vec<String> {
        let mut all: Vec<String> = self.layers.iter().map(|(d, _)| d.clone()).collect();
        all.push(self.config.clone());
        all
    }

    /// Whether `other` (an image layout skopeo wrote) holds the same blobs byte for byte.
    pub fn same_blobs_as(&self, other: &Path) -> bool {
        self.blobs().iter().all(|d| {
            let hex = d.trim_start_matches("sha256:");
            std::fs::read(other.join("blobs/sha256").join(hex)).ok()
                == std::fs::read(self.layout.join("blobs/sha256").join(hex)).ok()
        })
    }
}

/// How to run a registry.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Basic auth (htpasswd with bcrypt) for this user and password.
    pub htpasswd: Option<(String, String)>,
    /// TLS certificate and key (PEM).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Address to listen on (127.0.0.1 by default) and port (a free one by default).
    pub ip: Option<String>,
    pub port: Option<u16>,
    /// Run inside this network namespace.
    pub netns: Option<String>,
    /// Serve this storage directory (another registry's) instead of `<dir>/data`.
    pub storage: Option<PathBuf>,
    /// A pull-through cache of this registry URL.
    pub proxy_remote: Option<String>,
}

/// CNCF distribution on 127.0.0.1; stopped when dropped.
pub struct Registry {
    pub port: u16,
    pub dir: PathBuf,
    options: RegistryOptions,
    child: Child,
}

impl Registry {
    pub fn start(dir: &Path, options: RegistryOptions) -> anyhow::Result<Registry> {
        require("docker-registry", "docker-registry");
        std::fs::create_dir_all(dir)?;
        let port = options.port.unwrap_or_else(free_port);
        let ip = options.ip.clone().unwrap_or_else(|| "127.0.0.1".into());
        let storage = options.storage.clone().unwrap_or_else(|| dir.join("data"));
        let proxy = match &options.proxy_remote {
            Some(remote) => format!("proxy: {{remoteurl: {remote}}}\n"),
            None => String::new(),
        };
        let mut auth = String::new();
        if let Some((user, pass)) = &options.htpasswd {
            require("htpasswd", "apache2-utils");
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, pass])
                .output()?;
            std::fs::write(dir.join("htpasswd"), out.stdout)?;
            auth = format!(
                "auth: {{htpasswd: {{realm: test, path: {}}}}}\n",
                dir.join("htpasswd").display()
            );
        }
        let tls = match &options.tls {
            Some((cert, key)) => format!(
                ", tls: {{certificate: {}, key: {}}}",
                cert.display(),
                key.display()
            ),
            None => String::new(),
        };
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog: {{level: info, formatter: text}}\n\
                 storage: {{filesystem: {{rootdirectory: {}}}, delete: {{enabled: true}}}}\n\
                 http: {{addr: {ip}:{port}{tls}}}\n{auth}{proxy}",
                storage.display()
            ),
        )?;
        let log = std::fs::File::create(dir.join("registry.log"))?;
        let mut command = match &options.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "docker-registry"]);
                c
            }
            None => Command::new("docker-registry"),
        };
        let child = command
            .arg("serve")
            .arg(&config)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting docker-registry")?;
        let registry = Registry {
            port,
            dir: dir.to_path_buf(),
            options,
            child,
        };
        wait_for(Duration::from_secs(20), "docker-registry", || {
            std::net::TcpStream::connect((ip.as_str(), port)).is_ok()
        })?;
        Ok(registry)
    }

    /// `host:port` of the registry as clients name it.
    pub fn host(&self, name: &str) -> String {
        format!("{name}:{}", self.port)
    }

    /// Pushes an image layout as `<repo>:<tag>` with skopeo, digests preserved.
    pub fn push(&self, image: &TestImage, host: &str, repo: &str, cert_dir: Option<&Path>) {
        require("skopeo", "skopeo");
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--preserve-digests"]);
        match cert_dir {
            Some(dir) => {
                cmd.arg("--dest-cert-dir").arg(dir);
            }
            None => {
                cmd.arg("--dest-tls-verify=false");
            }
        }
        if let Some((user, pass)) = &self.options.htpasswd {
            cmd.arg("--dest-creds").arg(format!("{user}:{pass}"));
        }
        let out = cmd
            .arg(format!("oci:{}:{}", image.layout.display(), image.tag))
            .arg(format!("docker://{}/{repo}:{}", self.host(host), image.tag))
            .env_remove("HTTPS_PROXY")
            .env_remove("HTTP_PROXY")
            .output()
            .expect("skopeo runs");
        assert!(
            out.status.success(),
            "skopeo push failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Body bytes the registry sent per blob digest (`sha256:<hex>`), from its access log.
    pub fn blob_egress(&self) -> HashMap<String, u64> {
        let log = std::fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default();
        let mut out = HashMap::new();
        for line in log.lines() {
            // 127.0.0.1 - - [date] "GET /v2/<repo>/blobs/sha256:<hex> HTTP/1.1" 200 1234 "" "ua"
            let Some((_, request)) = line.split_once("\"GET ") else {
                continue;
            };
            let Some((path, rest)) = request.split_once(' ') else {
                continue;
            };
            let Some(digest) = path.split("/blobs/").nth(1) else {
                continue;
            };
            let digest = digest.split('?').next().unwrap_or(digest);
            let Some(after) = rest.split_once("\" ") else {
                continue;
            };
            let mut fields = after.1.split_whitespace();
            let status = fields.next().unwrap_or("");
            if !matches!(status, "200" | "206") {
                continue; // error bodies are not the blob
            }
            let bytes: u64 = fields.next().and_then(|b| b.parse().ok()).unwrap_or(0);
            *out.entry(digest.to_string()).or_default() += bytes;
        }
        out
    }

    /// Flips a byte in the middle of a stored blob: the registry then serves wrong bytes
    /// under the blob's digest.
    pub fn corrupt_blob(&self, digest: &str) {
        let hex = digest.trim_start_matches("sha256:");
        let path = self
            .dir
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data");
        let mut data = std::fs::read(&path).expect("stored blob");
        let middle = data.len() / 2;
        data[middle] ^= 0xff;
        std::fs::write(&path, data).unwrap();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// containerd with its own root, state and socket; its CRI registry `config_path` is
/// `<dir>/certs.d`, where dfinit finds it. Stopped when dropped.
pub struct Containerd {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub hosts_dir: PathBuf,
    child: Child,
}

impl Containerd {
    pub fn start(dir: &Path) -> anyhow::Result<Containerd> {
        require("containerd", "containerd");
        std::fs::create_dir_all(dir)?;
        let socket = dir.join("containerd.sock");
        let hosts_dir = dir.join("certs.d");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\n[grpc]\n  address = \"{sock}\"\n\n\
                 [plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"{hosts}\"\n",
                root = dir.join("root").display(),
                state = dir.join("state").display(),
                sock = socket.display(),
                hosts = hosts_dir.display(),
            ),
        )?;
        let log = std::fs::File::create(dir.join("containerd.log"))?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting containerd")?;
        let ctd = Containerd {
            dir: dir.to_path_buf(),
            socket,
            config,
            hosts_dir,
            child,
        };
        wait_for(Duration::from_secs(30), "containerd", || {
            Command::new("ctr")
                .arg("-a")
                .arg(&ctd.socket)
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })?;
        Ok(ctd)
    }

    /// `ctr images pull --hosts-dir <config_path>` (the hosts.toml files dfinit wrote).
    pub fn pull(&self, reference: &str, user: Option<&str>) -> Output {
        let mut cmd = Command::new("ctr");
        cmd.arg("-a")
            .arg(&self.socket)
            .args(["images", "pull", "--hosts-dir"])
            .arg(&self.hosts_dir);
        if let Some(user) = user {
            cmd.arg("--user").arg(user);
        }
        cmd.arg(reference).output().expect("ctr runs")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs dfinit with `yaml` as its config; returns its output.
pub fn dfinit(dir: &Path, yaml: &str, extra: &[&str]) -> anyhow::Result<Output> {
    std::fs::create_dir_all(dir)?;
    let config = dir.join("dfinit.yaml");
    std::fs::write(&config, yaml)?;
    let out = Command::new(crate::bin_path("dfinit"))
        .arg("--config")
        .arg(&config)
        .args(extra)
        .output()?;
    if !out.status.success() {
        bail!(
            "dfinit failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// `skopeo [global] copy [copy] <source> oci:<dest>:pulled`, with `env` set.
pub fn skopeo_copy(
    source: &str,
    dest: &Path,
    global: &[&str],
    copy: &[&str],
    env: &[(&str, &str)],
) -> Output {
    require("skopeo", "skopeo");
    let mut cmd = Command::new("skopeo");
    cmd.env_remove("HTTPS_PROXY").env_remove("HTTP_PROXY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.args(global)
        .args(["copy", "--preserve-digests"])
        .args(copy)
        .arg(source)
        .arg(format!("oci:{}:pulled", dest.display()));
    cmd.output().expect("skopeo runs")
}

fn wait_for(limit: Duration, what: &str, mut ready: impl FnMut() -> bool) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} not ready after {limit:?}")
}
