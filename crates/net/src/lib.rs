//! How the Dragonfly components listen and connect: every TCP listener admits connections
//! within caps (in total and per remote address), and every surface can run mutual TLS
//! (rustls) with a CA, a certificate and a key read from files and reloaded when the files
//! change. With TLS configured, a plaintext or unauthenticated peer never gets past the
//! handshake.
//!
//! Owns: [`ConnLimiter`], [`tls`] (configs, reload), [`Io`] (a plain or TLS stream that
//! tonic can serve), [`incoming`] (the accept loop for tonic servers) and [`channel`]
//! (tonic clients), [`Reconnect`] (the wait before a long-lived session reconnects). Knows
//! nothing about Dragonfly's protocols.

mod backoff;
mod io;
mod limit;
#[cfg(any(test, feature = "test-certs"))]
pub mod testing;
pub mod tls;

pub use backoff::Reconnect;
pub use io::Io;
pub use limit::{ConnLimiter, ConnLimits, ConnSlot};
pub use tls::{ClientTls, ServerTls, TlsError, TlsFiles};

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, warn};

/// How long a peer may take to complete a TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections on `listener` within `limiter`'s caps, completes the TLS handshake
/// when `tls` is set (a peer that fails it, or takes longer than [`HANDSHAKE_TIMEOUT`], is
/// dropped), and yields the connections for a tonic server's `serve_with_incoming`.
/// Handshakes run concurrently, so a slow peer does not hold up the others.
pub fn incoming(
    listener: TcpListener,
    limiter: ConnLimiter,
    tls: Option<Arc<ServerTls>>,
) -> impl futures_util::Stream<Item = Result<Io, std::io::Error>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let slot = match limiter.admit(peer.ip()) {
                Ok(slot) => slot,
                Err(why) => {
                    debug!(%peer, why, "connection refused");
                    continue;
                }
            };
            if tx.is_closed() {
                return; // the server is gone
            }
            let _ = stream.set_nodelay(true);
            let conn_tx = tx.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                match accept_one(stream, peer, slot, tls.as_deref(), &[b"h2".to_vec()]).await {
                    Ok(io) => {
                        let _ = conn_tx.send(Ok(io)).await;
                    }
                    Err(err) => debug!(%peer, %err, "handshake failed"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Wraps one accepted connection, with a TLS handshake when `tls` is set.
pub async fn accept_one(
    stream: TcpStream,
    peer: SocketAddr,
    slot: ConnSlot,
    tls: Option<&ServerTls>,
    alpn: &[Vec<u8>],
) -> std::io::Result<Io> {
    let local = stream.local_addr()?;
    match tls {
        None => Ok(Io::plain(stream, peer, local, slot)),
        Some(tls) => {
            let acceptor = tls.acceptor(alpn);
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream));
            let stream = handshake.await.map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
            })??;
            Ok(Io::server_tls(stream, peer, local, slot))
        }
    }
}

/// Opens a TCP connection to `addr`, from `local` when given, within `timeout`.
pub async fn connect_tcp(
    addr: SocketAddr,
    local: Option<IpAddr>,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let connect = async {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        if let Some(ip) = local.filter(|ip| ip.is_ipv4() == addr.is_ipv4()) {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        socket.connect(addr).await
    };
    let stream = tokio::time::timeout(timeout, connect).await.map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("connect to {addr} timed out after {timeout:?}"),
        )
    })??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Connects to `addr` (a TCP connection, then the TLS handshake when `tls` is set) and
/// returns the stream; the server is verified against the CA for the name `addr.ip()`.
pub async fn connect(
    addr: SocketAddr,
    local: Option<IpAddr>,
    timeout: Duration,
    tls: Option<&ClientTls>,
    alpn: &[Vec<u8>],
) -> std::io::Result<Io> {
    let stream = connect_tcp(addr, local, timeout).await?;
    let local_addr = stream.local_addr()?;
    match tls {
        None => Ok(Io::plain(stream, addr, local_addr, ConnSlot::untracked())),
        Some(tls) => {
            let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            let handshake = tokio::time::timeout(timeout.max(HANDSHAKE_TIMEOUT), async {
                tls.connector(alpn).connect(name, stream).await
            });
            let stream = handshake.await.map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
            })??;
            Ok(Io::client_tls(stream, addr, local_addr))
        }
    }
}

/// How a gRPC client connects.
#[derive(Clone, Default)]
pub struct ChannelOptions {
    /// Mutual TLS with the server; plaintext when `None`.
    pub tls: Option<Arc<ClientTls>>,
    /// The source address of the connection.
    pub local: Option<IpAddr>,
    pub connect_timeout: Option<Duration>,
    /// HTTP/2 keepalive pings: a server that stops answering is noticed within
    /// interval + timeout.
    pub keepalive: Option<(Duration, Duration)>,
}

/// A tonic channel to `addr` (`host:port`; a host name is resolved, the server is verified
/// for the address connected to). Connects eagerly.
pub async fn channel(
    addr: &str,
    options: &ChannelOptions,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let connect_timeout = options.connect_timeout.unwrap_or(Duration::from_secs(3));
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true);
    if let Some((interval, timeout)) = options.keepalive {
        endpoint = endpoint
            .http2_keep_alive_interval(interval)
            .keep_alive_timeout(timeout)
            .keep_alive_while_idle(true);
    }
    let Some(tls) = options.tls.clone() else {
        return endpoint.local_address(options.local).connect().await;
    };
    let local = options.local;
    endpoint
        .connect_with_connector(tower::service_fn(move |uri: tonic::transport::Uri| {
            let tls = tls.clone();
            async move {
                let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
                let port = uri.port_u16().unwrap_or(80);
                let addr = tokio::net::lookup_host((host, port))
                    .await?
                    .next()
                    .ok_or_else(|| std::io::Error::other(format!("{host} resolves to nothing")))?;
                let io =
                    connect(addr, local, connect_timeout, Some(&tls), &[b"h2".to_vec()]).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(io))
            }
        }))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestCa;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An echo server behind `tls`, on 127.0.0.1.
    async fn echo(tls: Option<Arc<ServerTls>>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limiter = ConnLimiter::new(ConnLimits::default());
        tokio::spawn(async move {
            loop {
                let (stream, peer) = listener.accept().await.unwrap();
                let slot = limiter.admit(peer.ip()).unwrap();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let Ok(mut io) = accept_one(stream, peer, slot, tls.as_deref(), &[]).await
                    else {
                        return;
                    };
                    let mut buf = [0u8; 5];
                    if io.read_exact(&mut buf).await.is_ok() {
                        let _ = io.write_all(&buf).await;
                        let _ = io.flush().await;
                    }
                });
            }
        });
        addr
    }

    async fn round_trip(addr: SocketAddr, tls: Option<&ClientTls>) -> std::io::Result<()> {
        let mut io = connect(addr, None, Duration::from_secs(3), tls, &[]).await?;
        io.write_all(b"hello").await?;
        io.flush().await?;
        let mut buf = [0u8; 5];
        io.read_exact(&mut buf).await?;
        if &buf != b"hello" {
            return Err(std::io::Error::other(format!("answered {buf:?}")));
        }
        Ok(())
    }

    #[tokio::test]
    async fn mutual_tls_admits_only_certificates_of_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new(dir.path(), "cluster");
        let other = TestCa::new(dir.path(), "other");
        let server = ServerTls::load(ca.leaf("server", &["127.0.0.1"]), None).unwrap();
        assert!(server.requires_client_certs());
        let addr = echo(Some(server)).await;

        let good = ClientTls::load(ca.leaf("client", &["127.0.0.1"]), None).unwrap();
        round_trip(addr, Some(&good)).await.unwrap();

        // No client certificate.
        let anonymous = ClientTls::load(
            TlsFiles {
                ca_cert: Some(ca.cert_path()),
                cert: None,
                key: None,
            },
            None,
        )
        .unwrap();
        assert!(round_trip(addr, Some(&anonymous)).await.is_err());
        // A certificate from another CA.
        let mut stranger = other.leaf("client", &["127.0.0.1"]);
        stranger.ca_cert = Some(ca.cert_path());
        let stranger = ClientTls::load(stranger, None).unwrap();
        assert!(round_trip(addr, Some(&stranger)).await.is_err());
        // Plaintext.
        assert!(round_trip(addr, None).await.is_err());
        // A server the client's CA did not sign.
        let impostor = ServerTls::load(other.leaf("server", &["127.0.0.1"]), None).unwrap();
        let impostor_addr = echo(Some(impostor)).await;
        assert!(round_trip(impostor_addr, Some(&good)).await.is_err());
    }

    #[tokio::test]
    async fn certificates_are_reloaded_when_the_files_change() {
        let dir = tempfile::tempdir().unwrap();
        let first = TestCa::new(&dir.path().join("a"), "first");
        let second = TestCa::new(&dir.path().join("b"), "second");
        let files = first.leaf("server", &["127.0.0.1"]);
        let server = ServerTls::load(files.clone(), Some(Duration::from_millis(50))).unwrap();
        let addr = echo(Some(server.clone())).await;
        let old_client = ClientTls::load(first.leaf("client", &[]), None).unwrap();
        let new_client = ClientTls::load(second.leaf("client", &[]), None).unwrap();
        round_trip(addr, Some(&old_client)).await.unwrap();
        assert!(round_trip(addr, Some(&new_client)).await.is_err());

        // Rotate: the same paths now hold the second CA's files.
        let rotated = second.leaf("server", &["127.0.0.1"]);
        std::thread::sleep(Duration::from_millis(20)); // a distinct modification time
        for (from, to) in [
            (&rotated.ca_cert, &files.ca_cert),
            (&rotated.cert, &files.cert),
            (&rotated.key, &files.key),
        ] {
            std::fs::copy(from.as_ref().unwrap(), to.as_ref().unwrap()).unwrap();
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while round_trip(addr, Some(&new_client)).await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "not reloaded");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(round_trip(addr, Some(&old_client)).await.is_err());

        // A broken file keeps the last good certificates.
        std::fs::write(files.key.as_ref().unwrap(), "not a key").unwrap();
        assert!(!server.reload_if_changed());
        round_trip(addr, Some(&new_client)).await.unwrap();
    }

    #[tokio::test]
    async fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = TlsFiles {
            ca_cert: Some(dir.path().join("nope.pem")),
            cert: Some(dir.path().join("cert.pem")),
            key: Some(dir.path().join("key.pem")),
        };
        let err = ServerTls::load(missing, None).err().unwrap().to_string();
        assert!(err.contains("nope.pem"), "{err}");
        std::fs::write(dir.path().join("empty.pem"), "").unwrap();
        let err = ClientTls::load(
            TlsFiles {
                ca_cert: Some(dir.path().join("empty.pem")),
                cert: None,
                key: None,
            },
            None,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            err.contains("empty.pem") && err.contains("no PEM certificate"),
            "{err}"
        );
    }
}
