//! The Vortex server loop: one task per connection, pieces streamed from a provider.

use crate::frame::{encode, read_packet};
use crate::VortexError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
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
    /// Opens a finished piece of a task.
    fn open(
        &self,
        task_id: &str,
        number: u32,
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

/// Accepts connections until the listener fails; each connection runs in its own task.
pub async fn serve<P: PieceProvider>(listener: TcpListener, provider: Arc<P>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let provider = provider.clone();
                tokio::spawn(async move {
                    if let Err(err) = handle_connection(stream, provider).await {
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

async fn send_error(stream: &mut TcpStream, err: ServeError) -> Result<(), VortexError> {
    let packet = encode(&ErrorPacket::new(err.code, err.message));
    stream.write_all(&packet).await?;
    Ok(())
}

async fn handle_connection<P: PieceProvider>(
    mut stream: TcpStream,
    provider: Arc<P>,
) -> Result<(), VortexError> {
    stream.set_nodelay(true)?;
    let mut buf = vec![0u8; provider.buffer_size()];
    loop {
        let packet = match read_packet(&mut stream).await {
            Ok(Some(packet)) => packet,
            Ok(None) => return Ok(()),
            Err(VortexError::Protocol(message)) => {
                // Tell the peer what was wrong, then drop the connection: framing is lost.
                let _ = send_error(
                    &mut stream,
                    ServeError {
                        code: Code::InvalidArgument,
                        message: message.clone(),
                    },
                )
                .await;
                return Err(VortexError::Protocol(message));
            }
            Err(err) => return Err(err),
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
                )
                .await?;
                continue;
            }
        };
        let opened = match provider.open(&request.task_id, request.piece_number).await {
            Ok(opened) => opened,
            Err(err) => {
                send_error(&mut stream, err).await?;
                continue;
            }
        };
        let OpenedPiece {
            metadata,
            mut reader,
            guard,
        } = opened;
        let length = metadata.length;
        stream
            .write_all(&encode(&PieceContent { metadata }))
            .await?;
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
            stream.write_all(&buf[..n]).await?;
            provider.sent(n as u64);
            remaining -= n as u64;
        }
        drop(guard);
    }
}
