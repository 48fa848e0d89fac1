//! Object stores and hubs for the origin tests: moto's S3 server (PyPI; auth not enforced,
//! objects in memory, filled with boto3), s3s-fs (crates.io; auth enforced, objects are
//! plain files), and a TCP front that counts the bytes a store sends, so a test can tell
//! how many copies of an object left it. `scripts/setup.sh` installs the tools.

use crate::free_port;
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Records the ETag of an object placed as a plain file under an s3s-fs root
/// (`root/bucket/key`), as s3s-fs does for an object PUT through it. Without the record
/// s3s-fs hashes the whole file on every GET, ranged ones included: a 4 MiB range of a
/// 1 GiB file costs a 1 GiB read, and the store, not the network, is what a test measures.
pub fn s3s_fs_index(root: &Path, bucket: &str, key: &str) -> anyhow::Result<()> {
    use base64::Engine as _;
    use md5::Digest as _;
    let path = root.join(bucket).join(key);
    let mut file = std::fs::File::open(&path).with_context(|| format!("{}", path.display()))?;
    let mut md5 = md5::Md5::new();
    std::io::copy(&mut file, &mut md5)?;
    let encode = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let info = root.join(format!(
        ".bucket-{}.object-{}.internal.json",
        encode(bucket),
        encode(key)
    ));
    let e_tag = hex::encode(md5.finalize());
    std::fs::write(info, serde_json::json!({ "e_tag": e_tag }).to_string())?;
    Ok(())
}

/// Which server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum S3Kind {
    Moto,
    S3sFs,
}

/// An S3 server on 127.0.0.1, behind a byte-counting front; stopped when dropped.
pub struct S3Server {
    pub kind: S3Kind,
    /// `http://127.0.0.1:<front port>`: what clients use as the endpoint.
    pub endpoint: String,
    /// The server itself (not counted).
    pub direct: String,
    pub access_key: String,
    pub secret_key: String,
    /// s3s-fs: objects live at `<root>/<bucket>/<key>`.
    pub root: Option<PathBuf>,
    front: CountingFront,
    child: Child,
}

fn wait_port(port: u16, what: &str, child: &mut Child, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "{what} exited with {status}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "{what} did not listen on {port}: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    )
}

impl S3Server {
    /// moto's server (`pip install 'moto[server]' boto3`).
    pub fn moto(dir: &Path) -> anyhow::Result<S3Server> {
        std::fs::create_dir_all(dir)?;
        let port = free_port();
        let log = dir.join("moto.log");
        let mut child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::options().append(true).open(&log)?)
            .spawn()
            .context("starting moto (pip install 'moto[server]' boto3; scripts/setup.sh does)")?;
        wait_port(port, "moto", &mut child, &log)?;
        S3Server::fronted(S3Kind::Moto, port, "test", "test", None, child)
    }

    /// s3s-fs (`cargo install s3s-fs@0.14.1 --features binary`), with these keys enforced.
    pub fn s3s_fs(dir: &Path, access_key: &str, secret_key: &str) -> anyhow::Result<S3Server> {
        let root = dir.join("root");
        std::fs::create_dir_all(&root)?;
        let port = free_port();
        let log = dir.join("s3s-fs.log");
        let bin = which("s3s-fs").context("s3s-fs not found: cargo install s3s-fs@0.14.1 --features binary (scripts/setup.sh does)")?;
        let mut child = Command::new(bin)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--access-key",
                access_key,
                "--secret-key",
                secret_key,
            ])
            .arg(&root)
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::options().append(true).open(&log)?)
            .spawn()
            .context("starting s3s-fs")?;
        wait_port(port, "s3s-fs", &mut child, &log)?;
        S3Server::fronted(
            S3Kind::S3sFs,
            port,
            access_key,
            secret_key,
            Some(root),
            child,
        )
    }

    fn fronted(
        kind: S3Kind,
        port: u16,
        access_key: &str,
        secret_key: &str,
        root: Option<PathBuf>,
        child: Child,
    ) -> anyhow::Result<S3Server> {
        let front = CountingFront::start(std::net::SocketAddr::from(([127, 0, 0, 1], port)))?;
        Ok(S3Server {
            kind,
            endpoint: format!("http://127.0.0.1:{}", front.port),
            direct: format!("http://127.0.0.1:{port}"),
            access_key: access_key.to_string(),
            secret_key: secret_key.to_string(),
            root,
            front,
            child,
        })
    }

    /// Bytes the store sent through the front so far (headers included).
    pub fn bytes_served(&self) -> u64 {
        self.front.served()
    }

    /// Creates a bucket and puts objects `(key, bytes)` in it.
    pub fn put_objects(&self, bucket: &str, objects: &[(String, Vec<u8>)]) -> anyhow::Result<()> {
        match (self.kind, &self.root) {
            (S3Kind::S3sFs, Some(root)) => {
                for (key, data) in objects {
                    let path = root.join(bucket).join(key);
                    std::fs::create_dir_all(path.parent().expect("parent"))?;
                    std::fs::write(path, data)?;
                    s3s_fs_index(root, bucket, key)?;
                }
                std::fs::create_dir_all(root.join(bucket))?;
                Ok(())
            }
            _ => {
                // One boto3 process for all objects, fed the files' paths.
                let tmp = tempfile::tempdir()?;
                let mut list = String::new();
                for (i, (key, data)) in objects.iter().enumerate() {
                    let path = tmp.path().join(i.to_string());
                    std::fs::write(&path, data)?;
                    list.push_str(&format!("{}\t{key}\n", path.display()));
                }
                let script = format!(
                    "import boto3,sys\n\
                     s3=boto3.client('s3',endpoint_url='{}',aws_access_key_id='{}',aws_secret_access_key='{}',region_name='us-east-1')\n\
                     s3.create_bucket(Bucket='{bucket}')\n\
                     for line in sys.stdin.read().splitlines():\n    p,k=line.split('\\t',1)\n    s3.upload_file(p,'{bucket}',k)\n",
                    self.direct, self.access_key, self.secret_key
                );
                let mut child = Command::new("python3")
                    .args(["-c", &script])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()?;
                use std::io::Write;
                child
                    .stdin
                    .take()
                    .expect("stdin")
                    .write_all(list.as_bytes())?;
                let out = child.wait_with_output()?;
                if !out.status.success() {
                    bail!(
                        "boto3 upload failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                Ok(())
            }
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// A TCP front for a server on loopback that counts the bytes the server sends.
pub struct CountingFront {
    pub port: u16,
    served: Arc<AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl CountingFront {
    pub fn start(upstream: std::net::SocketAddr) -> anyhow::Result<CountingFront> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let served = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, st) = (served.clone(), stop.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if st.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = std::net::TcpStream::connect(upstream) else {
                    continue;
                };
                let s = s.clone();
                let (mut c_read, mut s_write) = (
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                );
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_read, &mut s_write);
                    let _ = s_write.shutdown(std::net::Shutdown::Write);
                });
                let (mut s_read, mut c_write) = (server, client);
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    use std::io::{Read, Write};
                    loop {
                        match s_read.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                s.fetch_add(n as u64, Ordering::Relaxed);
                                if c_write.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = c_write.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Ok(CountingFront { port, served, stop })
    }

    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for CountingFront {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}
