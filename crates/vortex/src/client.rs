//! A Vortex client holding one connection to one parent.

use crate::frame::{encode, read_packet};
use crate::VortexError;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use vortex_protocol::tlv::download_piece::DownloadPiece;
use vortex_protocol::tlv::piece_metadata::PieceMetadata;
use vortex_protocol::Vortex;

/// One connection to a parent's Vortex server.
pub struct Client {
    stream: BufReader<TcpStream>,
    addr: SocketAddr,
}

impl Client {
    /// Connects with a timeout.
    pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Client, VortexError> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                VortexError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connect to {addr} timed out"),
                ))
            })??;
        stream.set_nodelay(true)?;
        Ok(Client {
            stream: BufReader::with_capacity(256 * 1024, stream),
            addr,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests a piece. On success the caller must read exactly `metadata.length` bytes from
    /// [`Client::content`] before the next request.
    pub async fn request_piece(
        &mut self,
        task_id: &str,
        number: u32,
    ) -> Result<PieceMetadata, VortexError> {
        let request = encode(&DownloadPiece::new(task_id.to_string(), number));
        self.stream.get_mut().write_all(&request).await?;
        match read_packet(&mut self.stream).await? {
            Some(Vortex::PieceContent(_, content)) => Ok(content.metadata),
            Some(Vortex::Error(_, err)) => Err(VortexError::Remote {
                code: err.code,
                message: err.message,
            }),
            Some(Vortex::Close(_)) | None => Err(VortexError::Closed),
            Some(other) => Err(VortexError::Protocol(format!(
                "unexpected answer {:?}",
                other.header().tag()
            ))),
        }
    }

    /// The raw content of the piece just requested, `length` bytes long.
    pub fn content(&mut self, length: u64) -> impl AsyncRead + Unpin + '_ {
        (&mut self.stream).take(length)
    }

    /// Convenience: request a piece and read it whole into memory.
    pub async fn fetch_piece(
        &mut self,
        task_id: &str,
        number: u32,
    ) -> Result<(PieceMetadata, Vec<u8>), VortexError> {
        let metadata = self.request_piece(task_id, number).await?;
        let mut data = Vec::with_capacity(metadata.length as usize);
        self.content(metadata.length).read_to_end(&mut data).await?;
        if data.len() as u64 != metadata.length {
            return Err(VortexError::Closed);
        }
        Ok((metadata, data))
    }
}
