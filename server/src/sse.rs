//! The one server-sent-events loop behind every streaming endpoint (`/v1/completions`,
//! `/v1/chat/completions`, `/v1/responses`): each endpoint says how the engine's [`Event`]s
//! become its SSE events ([`EventStream`]); [`response`] drains them in order and ends the
//! stream when the endpoint says it is over or the engine hangs up.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;

use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use performer_engine::Event;
use serde_json::Value;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::error::ApiError;

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

/// The queue of an OpenAI-style stream of data-only events (completions, chat completions):
/// JSON chunks, then `[DONE]`, which ends it.
#[derive(Default)]
pub(crate) struct DataEvents {
    out: VecDeque<String>,
    ended: bool,
}

impl DataEvents {
    /// Queues one chunk.
    pub(crate) fn send(&mut self, chunk: &Value) {
        self.out.push_back(chunk.to_string());
    }

    /// Queues `[DONE]` and ends the stream.
    pub(crate) fn finish(&mut self) {
        self.out.push_back("[DONE]".into());
        self.ended = true;
    }

    /// Queues the error's body, then `[DONE]`.
    pub(crate) fn fail(&mut self, e: performer_engine::Error) {
        self.out.push_back(ApiError::from(e).body().to_string());
        self.finish();
    }
}

/// An endpoint's translation of the engine's events into [`DataEvents`].
pub(crate) trait DataStream: Send + 'static {
    /// Queues what `event` means to the client.
    fn take(&mut self, event: Event, out: &mut DataEvents);
}

/// The SSE response of a [`DataStream`] fed by `rx`.
pub(crate) fn data_response<T: DataStream>(stream: T, rx: UnboundedReceiver<Event>) -> Response {
    response(
        Data {
            stream,
            out: DataEvents::default(),
        },
        rx,
    )
}

/// A [`DataStream`] with its queue: an [`EventStream`] whose engine hang-up ends the stream.
struct Data<T> {
    stream: T,
    out: DataEvents,
}

impl<T: DataStream> EventStream for Data<T> {
    async fn push(&mut self, event: Option<Event>) {
        match event {
            Some(e) => self.stream.take(e, &mut self.out),
            None => self.out.ended = true,
        }
    }

    fn pop(&mut self) -> Option<SseEvent> {
        self.out
            .out
            .pop_front()
            .map(|data| SseEvent::default().data(data))
    }

    fn ended(&self) -> bool {
        self.out.ended
    }
}
