//! Server-sent events: per choice, one chunk per text delta and a last chunk with the finish
//! reason and usage; `[DONE]` once every choice has finished. One task per choice turns engine
//! events into SSE events; when the client leaves, the SSE stream is dropped, the tasks' sends
//! fail, they drop the engine receivers, and the rows are cancelled.

use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use tokio::sync::mpsc::{Sender, UnboundedReceiver};

use super::choices::choice_logprobs;
use super::engine::{expired_message, JobEvent};
use super::handlers::{created, cut_at_stop, finish_reason};
use super::openai::{Completion, Endpoint, Usage};
use super::state::AppState;
use crate::generate::{FinishReason, PositionLogprobs};
use crate::text::StreamDecoder;

/// The largest char boundary of `text` at or below `at`.
fn floor_boundary(text: &str, mut at: usize) -> usize {
    while at > 0 && !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// What a streamed response needs besides the engine's events.
pub(crate) struct StreamOptions {
    /// Stop strings (the text is cut before the first).
    pub(crate) stops: Vec<String>,
    /// Which endpoint the chunks are for.
    pub(crate) endpoint: Endpoint,
    /// The response id every chunk carries.
    pub(crate) id: String,
    /// Tokens in the prompt, for usage.
    pub(crate) prompt_tokens: usize,
    /// The first choice's sampler seed, when sampling.
    pub(crate) seed: Option<u64>,
    /// Whether chunks carry their tokens' log-probabilities.
    pub(crate) logprobs: bool,
    /// Completions with `echo`: the prompt text, sent first.
    pub(crate) echoed: Option<String>,
    /// How long the response may take from now (the request's deadline, or the server's timeout).
    pub(crate) timeout: std::time::Duration,
}

/// Builds the SSE chunks of one response.
#[derive(Clone)]
struct Chunks {
    state: AppState,
    endpoint: Endpoint,
    id: String,
    created: u64,
    seed: Option<u64>,
}

impl Chunks {
    fn chunk(
        &self,
        index: usize,
        delta: &str,
        finish: Option<FinishReason>,
        usage: Option<Usage>,
        logprobs: &mut Vec<PositionLogprobs>,
        with_logprobs: bool,
    ) -> Event {
        let logprobs = (with_logprobs && !logprobs.is_empty()).then(|| {
            let taken = std::mem::take(logprobs);
            choice_logprobs(self.endpoint, &self.state.codec, None, &taken, 0)
        });
        let body = Completion {
            id: &self.id,
            object: self.endpoint.object(true),
            created: self.created,
            model: &self.state.model_name,
            choices: vec![self
                .endpoint
                .choice(index, delta.to_string(), true, finish, logprobs)],
            usage,
            seed: usage.and(self.seed.map(|seed| seed.wrapping_add(index as u64))),
            steering: None,
        };
        match serde_json::to_string(&body) {
            Ok(json) => Event::default().data(json),
            Err(e) => Event::default().event("error").data(e.to_string()),
        }
    }
}

/// The SSE response of a streamed request with one receiver per choice.
pub(crate) fn stream(
    state: AppState,
    receivers: Vec<UnboundedReceiver<JobEvent>>,
    options: StreamOptions,
) -> impl IntoResponse {
    let deadline = tokio::time::Instant::now() + options.timeout;
    let chunks = Chunks {
        endpoint: options.endpoint,
        id: options.id.clone(),
        created: created(),
        seed: options.seed,
        state,
    };
    let (events, sse) = tokio::sync::mpsc::channel::<Event>(64);
    let options = std::sync::Arc::new(options);
    let tasks: Vec<_> = receivers
        .into_iter()
        .enumerate()
        .map(|(index, receiver)| {
            let (chunks, events, options) = (chunks.clone(), events.clone(), options.clone());
            tokio::spawn(stream_choice(
                index, receiver, chunks, events, options, deadline,
            ))
        })
        .collect();
    tokio::spawn(async move {
        for task in tasks {
            let _ = task.await;
        }
        let _ = events.send(Event::default().data("[DONE]")).await;
    });
    let stream = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::ReceiverStream::new(sse),
        Ok::<_, Infallible>,
    );
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// Stream choice `index` until its row ends, the deadline passes or the client leaves.
async fn stream_choice(
    index: usize,
    mut receiver: UnboundedReceiver<JobEvent>,
    chunks: Chunks,
    events: Sender<Event>,
    options: std::sync::Arc<StreamOptions>,
    deadline: tokio::time::Instant,
) {
    let (stops, with_logprobs) = (&options.stops, options.logprobs);
    let codec = chunks.state.codec.clone();
    let metrics = chunks.state.metrics.clone();
    // Text that could still grow into a stop string is held back until it cannot.
    let hold = stops
        .iter()
        .map(|s| s.len().saturating_sub(1))
        .max()
        .unwrap_or(0);
    let mut pending = Vec::new();
    let chunk = |delta: &str, finish, usage, pending: &mut Vec<PositionLogprobs>| {
        chunks.chunk(index, delta, finish, usage, pending, with_logprobs)
    };
    if let Some(prompt) = &options.echoed {
        if events
            .send(chunk(prompt, None, None, &mut pending))
            .await
            .is_err()
        {
            return;
        }
    }
    let mut decoder = StreamDecoder::default();
    let mut text = String::new();
    let mut sent = 0usize;
    let mut tokens = 0usize;
    let last = loop {
        let event = match tokio::time::timeout_at(deadline, receiver.recv()).await {
            Ok(Some(event)) => event,
            Ok(None) => break None,
            Err(_) => break Some(chunk("", Some(FinishReason::Length), None, &mut pending)),
        };
        match event {
            JobEvent::Token(token, logprobs) => {
                tokens += 1;
                pending.extend(logprobs);
                text.push_str(&decoder.push(&codec, token).unwrap_or_default());
                if cut_at_stop(&mut text, stops) {
                    metrics.tokens(tokens);
                    let tail = chunk(&text[sent.min(text.len())..], None, None, &mut pending);
                    if events.send(tail).await.is_err() {
                        return;
                    }
                    let usage = Usage::new(options.prompt_tokens, tokens);
                    break Some(chunk(
                        "",
                        Some(FinishReason::Stop),
                        Some(usage),
                        &mut pending,
                    ));
                }
                let safe = floor_boundary(&text, text.len().saturating_sub(hold));
                if safe > sent {
                    let delta = chunk(&text[sent..safe], None, None, &mut pending);
                    if events.send(delta).await.is_err() {
                        return;
                    }
                    sent = safe;
                }
            }
            JobEvent::Done(generated) => {
                metrics.tokens(generated.token_ids.len());
                let rest = chunk(&text[sent..], None, None, &mut pending);
                if events.send(rest).await.is_err() {
                    return;
                }
                let finish = finish_reason(&generated, false);
                let usage = Usage::new(generated.prompt_tokens, generated.token_ids.len());
                break Some(chunk("", Some(finish), Some(usage), &mut pending));
            }
            JobEvent::Failed(message) => {
                break Some(Event::default().event("error").data(message));
            }
            JobEvent::Expired(waited) => {
                break Some(
                    Event::default()
                        .event("error")
                        .data(expired_message(waited)),
                );
            }
        }
    };
    if let Some(last) = last {
        let _ = events.send(last).await;
    }
}
