//! Reading and writing whole packets on async streams.

use crate::VortexError;
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use vortex_protocol::{Header, Vortex, HEADER_SIZE};

/// The largest value accepted for a packet that is not followed by raw content; piece
/// metadata and error messages are far smaller. Guards against a peer announcing 4 GiB.
pub const MAX_CONTROL_VALUE_LEN: u32 = 1024 * 1024;

/// Reads one packet (header and value). Returns `Ok(None)` on a clean EOF before the header.
pub async fn read_packet<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Vortex>, VortexError> {
    let mut header = [0u8; HEADER_SIZE];
    match r.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let parsed = Header::decode(&header).map_err(|e| VortexError::Protocol(e.to_string()))?;
    if parsed.length() > MAX_CONTROL_VALUE_LEN {
        return Err(VortexError::Protocol(format!(
            "packet value of {} bytes exceeds the {MAX_CONTROL_VALUE_LEN} byte limit",
            parsed.length()
        )));
    }
    let mut buf = BytesMut::with_capacity(HEADER_SIZE + parsed.length() as usize);
    buf.extend_from_slice(&header);
    buf.resize(HEADER_SIZE + parsed.length() as usize, 0);
    r.read_exact(&mut buf[HEADER_SIZE..]).await?;
    Vortex::decode(&buf)
        .map(Some)
        .map_err(|e| VortexError::Protocol(e.to_string()))
}

/// Encodes a message as a packet.
pub(crate) fn encode<M: vortex_protocol::Message>(message: &M) -> BytesMut {
    let mut buf = BytesMut::with_capacity(HEADER_SIZE + message.encoded_len());
    message.encode_packet(&mut buf);
    buf
}
