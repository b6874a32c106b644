//! A TCP listener that can be closed while the server keeps running: on shutdown the port stops
//! accepting at once, while the connections already open finish their streams.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Accepts until the watched flag turns true, then drops the socket (new connections are
/// refused) and never yields another connection.
pub(crate) struct Closable {
    inner: Option<TcpListener>,
    addr: SocketAddr,
    closed: watch::Receiver<bool>,
}

impl Closable {
    pub(crate) fn new(inner: TcpListener, closed: watch::Receiver<bool>) -> std::io::Result<Self> {
        Ok(Closable {
            addr: inner.local_addr()?,
            inner: Some(inner),
            closed,
        })
    }
}

impl axum::serve::Listener for Closable {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            if *self.closed.borrow() {
                self.inner = None;
            }
            let Some(listener) = &self.inner else {
                return std::future::pending().await;
            };
            tokio::select! {
                r = listener.accept() => match r {
                    Ok(conn) => {
                        let _ = conn.0.set_nodelay(true);
                        return conn;
                    }
                    // Out of file descriptors and the like: wait a moment and retry.
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
                },
                _ = self.closed.changed() => {}
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.addr)
    }
}
