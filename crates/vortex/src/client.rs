//! A Vortex client holding one connection to one parent.

use crate::frame::{encode, read_packet};
use crate::VortexError;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use vortex_protocol::tlv::download_piece::DownloadPiece;
use vortex_protocol::tlv::piece_metadata::PieceMetadata;
use vortex_protocol::Vortex;

/// The bytes of a `DownloadPiece` request.
pub fn encode_request(task_id: &str, number: u32) -> bytes::BytesMut {
    encode(&DownloadPiece::new(task_id.to_string(), number))
}

/// One connection to a parent's Vortex server.
pub struct Client {
    stream: BufReader<d7y_net::Io>,
    addr: SocketAddr,
}

impl Client {
    /// Connects with a timeout.
    pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Client, VortexError> {
        Client::connect_with(addr, None, timeout, None).await
    }

    /// Connects from a chosen local address (`None`: the system's choice).
    pub async fn connect_from(
        addr: SocketAddr,
        local: Option<std::net::IpAddr>,
        timeout: Duration,
    ) -> Result<Client, VortexError> {
        Client::connect_with(addr, local, timeout, None).await
    }

    /// Connects from `local`, over (mutual) TLS when `tls` is set.
    pub async fn connect_with(
        addr: SocketAddr,
        local: Option<std::net::IpAddr>,
        timeout: Duration,
        tls: Option<&d7y_net::ClientTls>,
    ) -> Result<Client, VortexError> {
        let stream = d7y_net::connect(addr, local, timeout, tls, &[]).await?;
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
        let request = encode_request(task_id, number);
        let stream = self.stream.get_mut();
        stream.write_all(&request).await?;
        // Over TLS the request sits in the session until flushed.
        stream.flush().await?;
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
