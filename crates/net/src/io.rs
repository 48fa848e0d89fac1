//! One connection, plain or TLS, with the addresses tonic reports to handlers.

use crate::ConnSlot;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

enum Inner {
    Plain(TcpStream),
    ServerTls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    ClientTls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// A connection: TCP, or TLS over TCP. Holds its [`ConnSlot`] while it lives.
pub struct Io {
    inner: Inner,
    peer: SocketAddr,
    local: SocketAddr,
    _slot: ConnSlot,
}

impl Io {
    pub(crate) fn plain(
        stream: TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
        slot: ConnSlot,
    ) -> Io {
        Io {
            inner: Inner::Plain(stream),
            peer,
            local,
            _slot: slot,
        }
    }

    pub(crate) fn server_tls(
        stream: tokio_rustls::server::TlsStream<TcpStream>,
        peer: SocketAddr,
        local: SocketAddr,
        slot: ConnSlot,
    ) -> Io {
        Io {
            inner: Inner::ServerTls(Box::new(stream)),
            peer,
            local,
            _slot: slot,
        }
    }

    pub(crate) fn client_tls(
        stream: tokio_rustls::client::TlsStream<TcpStream>,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Io {
        Io {
            inner: Inner::ClientTls(Box::new(stream)),
            peer,
            local,
            _slot: ConnSlot::untracked(),
        }
    }

    /// The remote end.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        !matches!(self.inner, Inner::Plain(_))
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().inner {
            Inner::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Inner::ServerTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Inner::ClientTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.get_mut().inner {
            Inner::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Inner::ServerTls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Inner::ClientTls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().inner {
            Inner::Plain(s) => Pin::new(s).poll_flush(cx),
            Inner::ServerTls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Inner::ClientTls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().inner {
            Inner::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Inner::ServerTls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Inner::ClientTls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.get_mut().inner {
            Inner::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Inner::ServerTls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Inner::ClientTls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.inner {
            Inner::Plain(s) => s.is_write_vectored(),
            Inner::ServerTls(s) => s.is_write_vectored(),
            Inner::ClientTls(s) => s.is_write_vectored(),
        }
    }
}

impl tonic::transport::server::Connected for Io {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::TcpConnectInfo {
            local_addr: Some(self.local),
            remote_addr: Some(self.peer),
        }
    }
}
