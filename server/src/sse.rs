//! The one server-sent-events loop behind every streaming endpoint (`/v1/completions`,
//! `/v1/chat/completions`, `/v1/responses`): each endpoint says how the engine's [`Event`]s
//! become its SSE events ([`EventStream`]); [`response`] drains them in order and ends the
//! stream when the endpoint says it is over or the engine hangs up.

use std::convert::Infallible;
use std::future::Future;

use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use performer_engine::Event;
use tokio::sync::mpsc::UnboundedReceiver;

/// An endpoint's translation of a generation's events into SSE events.
pub(crate) trait EventStream: Send + 'static {
    /// Takes the next engine event, or `None` when the engine dropped the channel, and queues
    /// the SSE events it means (possibly none).
    fn push(&mut self, event: Option<Event>) -> impl Future<Output = ()> + Send;
    /// The oldest queued SSE event.
    fn pop(&mut self) -> Option<SseEvent>;
    /// Whether the stream is over once the queue is drained.
    fn ended(&self) -> bool;
}

/// The SSE response of `state` fed by `rx`: queued events first, then the next engine event.
pub(crate) fn response<S: EventStream>(state: S, rx: UnboundedReceiver<Event>) -> Response {
    let s = stream::unfold((state, rx), |(mut st, mut rx)| async move {
        loop {
            if let Some(ev) = st.pop() {
                return Some((Ok::<_, Infallible>(ev), (st, rx)));
            }
            if st.ended() {
                return None;
            }
            let event = rx.recv().await;
            st.push(event).await;
        }
    });
    Sse::new(s).into_response()
}
