//! The Vortex server loop: one task per connection, pieces streamed from a provider.

use crate::frame::{encode, read_packet};
use crate::VortexError;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{debug, warn};
use vortex_protocol::tlv::error::{Code, Error as ErrorPacket};
use vortex_protocol::tlv::piece_content::PieceContent;
use vortex_protocol::tlv::piece_metadata::PieceMetadata;
use vortex_protocol::Vortex;

/// A piece ready to be sent.
pub struct OpenedPiece {
    pub metadata: PieceMetadata,
    /// Yields at least `metadata.length` bytes.
    pub reader: Pin<Box<dyn AsyncRead + Send>>,
    /// Held while the piece is sent (e.g. an upload-slot permit or a storage lease).
    pub guard: Box<dyn Send>,
}

/// Why a piece cannot be served; sent to the child as a Vortex error packet.
#[derive(Debug, Clone)]
pub struct ServeError {
    pub code: Code,
    pub message: String,
}

impl ServeError {
    pub fn not_found(message: impl Into<String>) -> Self {
        ServeError {
            code: Code::NotFound,
            message: message.into(),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ServeError {
            code: Code::Internal,
            message: message.into(),
        }
    }
}

/// Where the server gets pieces from.
pub trait PieceProvider: Send + Sync + 'static {
    /// Opens a finished piece of a task for a child connecting from `from`.
    fn open(
        &self,
        task_id: &str,
        number: u32,
        from: IpAddr,
    ) -> impl Future<Output = Result<OpenedPiece, ServeError>> + Send;

    /// Waits until `bytes` more may be sent (upload bandwidth limit).
    fn throttle(&self, bytes: usize) -> impl Future<Output = ()> + Send;

    /// Records bytes sent.
    fn sent(&self, bytes: u64);

    /// Size of the copy buffer per connection.
    fn buffer_size(&self) -> usize {
        512 * 1024
    }
}

/// What one server accepts. A child that connects and never reads, or never asks, holds a
/// connection (and, mid-piece, an upload slot) only until these run out.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Connections at once, from everyone.
    pub max_connections: usize,
    /// Connections at once from one address.
    pub max_connections_per_ip: usize,
    /// How long a connection may wait for its next request (a request started must also
    /// arrive whole within it).
    pub idle_timeout: Duration,
    /// How long one write to the child may take (a child that stops reading is cut off).
    pub write_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_connections: 2048,
            max_connections_per_ip: 128,
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// Accepts connections until the listener fails; each connection runs in its own task,
/// within `limits`. Connections beyond a cap get an error packet and are closed. With
/// `tls`, every connection must complete a (mutual) TLS handshake first.
pub async fn serve<P: PieceProvider>(
    listener: TcpListener,
    provider: Arc<P>,
    limits: ServerLimits,
    tls: Option<Arc<d7y_net::ServerTls>>,
) {
    let limiter = d7y_net::ConnLimiter::new(d7y_net::ConnLimits {
        max_connections: limits.max_connections,
        max_per_ip: limits.max_connections_per_ip,
    });
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let slot = match limiter.admit(peer.ip()) {
                    Ok(slot) => slot,
                    Err(message) => {
                        debug!(%peer, message, "vortex connection refused");
                        // Best effort, without waiting on a peer that does not read (and
                        // in plaintext only: a TLS peer would not understand it).
                        if tls.is_none() {
                            let packet = encode(&ErrorPacket::new(Code::Internal, message));
                            let _ = stream.try_write(&packet);
                        }
                        drop(stream);
                        continue;
                    }
                };
                let provider = provider.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    let accepted = tokio::time::timeout(
                        limits.idle_timeout,
                        d7y_net::accept_one(stream, peer, slot, tls.as_deref(), &[]),
                    )
                    .await;
                    let stream = match accepted {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(err)) => {
                            debug!(%peer, %err, "vortex handshake failed");
                            return;
                        }
                        Err(_) => {
                            debug!(%peer, "vortex handshake timed out");
                            return;
                        }
                    };
                    let from = peer.ip().to_canonical();
                    if let Err(err) = handle_connection(stream, provider, limits, from).await {
                        debug!(%peer, %err, "vortex connection ended with error");
                    }
                });
            }
            Err(err) => {
                warn!(%err, "vortex accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Writes all of `data` within the write timeout.
async fn write_within<S: AsyncWrite + Unpin>(
    stream: &mut S,
    data: &[u8],
    limits: &ServerLimits,
) -> Result<(), VortexError> {
    write_timed(stream, limits, Op::Write(data)).await
}

/// Flushes what is buffered (a TLS session holds the tail of a record until flushed).
async fn flush_within<S: AsyncWrite + Unpin>(
    stream: &mut S,
    limits: &ServerLimits,
) -> Result<(), VortexError> {
    write_timed(stream, limits, Op::Flush).await
}

enum Op<'a> {
    Write(&'a [u8]),
    Flush,
}

async fn write_timed<S: AsyncWrite + Unpin>(
    stream: &mut S,
    limits: &ServerLimits,
    op: Op<'_>,
) -> Result<(), VortexError> {
    let io = async {
        match op {
            Op::Write(data) => stream.write_all(data).await,
            Op::Flush => stream.flush().await,
        }
    };
    match tokio::time::timeout(limits.write_timeout, io).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(VortexError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "the child read nothing for {:?}; connection closed",
                limits.write_timeout
            ),
        ))),
    }
}

async fn send_error<S: AsyncWrite + Unpin>(
    stream: &mut S,
    err: ServeError,
    limits: &ServerLimits,
) -> Result<(), VortexError> {
    let packet = encode(&ErrorPacket::new(err.code, err.message));
    write_within(stream, &packet, limits).await?;
    flush_within(stream, limits).await
}

async fn handle_connection<P: PieceProvider, S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    provider: Arc<P>,
    limits: ServerLimits,
    from: IpAddr,
) -> Result<(), VortexError> {
    let mut buf = vec![0u8; provider.buffer_size()];
    loop {
        let packet = match tokio::time::timeout(limits.idle_timeout, read_packet(&mut stream)).await
        {
            Err(_) => return Ok(()), // idle: closed
            Ok(Ok(Some(packet))) => packet,
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(VortexError::Protocol(message))) => {
                // Tell the peer what was wrong, then drop the connection: framing is lost.
                let _ = send_error(
                    &mut stream,
                    ServeError {
                        code: Code::InvalidArgument,
                        message: message.clone(),
                    },
                    &limits,
                )
                .await;
                return Err(VortexError::Protocol(message));
            }
            Ok(Err(err)) => return Err(err),
        };
        let request = match packet {
            Vortex::DownloadPiece(_, request) => request,
            Vortex::Close(_) => return Ok(()),
            other => {
                send_error(
                    &mut stream,
                    ServeError {
                        code: Code::InvalidArgument,
                        message: format!("unsupported request {:?}", other.header().tag()),
                    },
                    &limits,
                )
                .await?;
                continue;
            }
        };
        let opened = match provider
            .open(&request.task_id, request.piece_number, from)
            .await
        {
            Ok(opened) => opened,
            Err(err) => {
                send_error(&mut stream, err, &limits).await?;
                continue;
            }
        };
        let OpenedPiece {
            metadata,
            mut reader,
            guard,
        } = opened;
        let length = metadata.length;
        write_within(&mut stream, &encode(&PieceContent { metadata }), &limits).await?;
        let mut remaining = length;
        while remaining > 0 {
            let want = remaining.min(buf.len() as u64) as usize;
            let n = reader.read(&mut buf[..want]).await?;
            if n == 0 {
                // The content file is shorter than its metadata: the stream cannot be
                // resynchronised, so drop the connection and let the child retry elsewhere.
                return Err(VortexError::Protocol(format!(
                    "piece {} of task {} ended {remaining} bytes early",
                    request.piece_number, request.task_id
                )));
            }
            provider.throttle(n).await;
            write_within(&mut stream, &buf[..n], &limits).await?;
            provider.sent(n as u64);
            remaining -= n as u64;
        }
        flush_within(&mut stream, &limits).await?;
        drop(guard);
    }
}
