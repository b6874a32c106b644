//! The connection loop under the router: HTTP/1.1 connections served by hyper with a
//! header-read timeout, a body-read deadline on every request, a cap on open connections, and
//! a shutdown that stops accepting at once, lets the connections finish, then closes those
//! still open (a client that never completes its request cannot hold the process).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::Router;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt;

/// Limits of the connection loop.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Longest wait for a request's complete header (also for the next request on an idle
    /// keep-alive connection); then the connection is closed.
    pub(crate) header_timeout: Duration,
    /// Longest time from a request's header to the end of its body; then reading the body
    /// fails (the request gets an error and the connection is closed).
    pub(crate) body_timeout: Duration,
    /// Most connections open at once; past it a new connection gets a 503 and is closed.
    pub(crate) max_connections: usize,
    /// After the shutdown's drain began, how long connections may take to finish before they
    /// are closed.
    pub(crate) drain: Duration,
}

/// A request body that fails once its deadline has passed.
struct TimedBody {
    inner: Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
}

impl http_body::Body for TimedBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|r| r.map_err(Into::into)));
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            let secs = this.timeout.as_secs_f64();
            return Poll::Ready(Some(Err(format!(
                "the request body did not arrive within {secs} s"
            )
            .into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
connection: close\r\nretry-after: 1\r\ncontent-length: 114\r\n\r\n\
{\"error\":{\"message\":\"too many open connections, retry later\",\"type\":\"server_error\",\"code\":\"too_many_connections\"}}";

/// Serves `router` on `listener` until `stop` turns true; then the port closes at once and
/// `drain` turns true once the caller (the engine's shutdown) is done: from then on the
/// connections finish their current request (idle ones close), and after
/// [`Limits::drain`] those still open are closed.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
    mut drain: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let (force_tx, force_rx) = watch::channel(false);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.wait_for(|s| *s) => break,
        };
        let (stream, _) = match accepted {
            Ok(conn) => conn,
            // Out of file descriptors and the like: wait a moment and retry.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tokio::spawn(async move {
                let mut stream = stream;
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(BUSY)).await;
            });
            continue;
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let body_timeout = limits.body_timeout;
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let req = req.map(|inner| {
                Body::new(TimedBody {
                    inner,
                    deadline: Box::pin(tokio::time::sleep(body_timeout)),
                    timeout: body_timeout,
                })
            });
            let router = router.clone();
            async move { Ok::<_, Infallible>(router.oneshot(req).await.unwrap_or_else(|e| match e {})) }
        });
        let conn = http.serve_connection(TokioIo::new(stream), service);
        let mut drain = drain.clone();
        let mut force = force_rx.clone();
        tokio::spawn(async move {
            let _slot = slot;
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = drain.wait_for(|d| *d) => conn.as_mut().graceful_shutdown(),
            }
            tokio::select! {
                _ = conn.as_mut() => {}
                // Dropping the connection closes its socket.
                _ = force.wait_for(|f| *f) => {}
            }
        });
    }
    drop(listener);
    let _ = drain.wait_for(|d| *d).await;
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let finished = tokio::time::timeout(limits.drain, slots.acquire_many(all)).await;
    if finished.is_err() {
        let _ = force_tx.send(true);
        // Every connection task ends at once now; wait for their sockets to close.
        let _ = slots.acquire_many(all).await;
    }
}
