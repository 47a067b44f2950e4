//! Server-sent events: one chunk per text delta, a last chunk with the finish reason and usage,
//! then `[DONE]`. A task turns engine events into SSE events; when the client leaves, the SSE
//! stream is dropped, the task's sends fail, it drops the engine receiver, and the row is cancelled.

use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use tokio::sync::mpsc::UnboundedReceiver;

use super::engine::JobEvent;
use super::handlers::{created, cut_at_stop, finish_reason};
use super::openai::{Completion, Endpoint, Usage};
use super::state::AppState;
use crate::generate::FinishReason;
use crate::text::StreamDecoder;

/// The largest char boundary of `text` at or below `at`.
fn floor_boundary(text: &str, mut at: usize) -> usize {
    while at > 0 && !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// The SSE response of a streamed request.
pub(crate) fn stream(
    state: AppState,
    mut receiver: UnboundedReceiver<JobEvent>,
    stops: Vec<String>,
    endpoint: Endpoint,
    id: String,
    prompt_tokens: usize,
    seed: Option<u64>,
) -> impl IntoResponse {
    let created = created();
    let model = state.model_name.clone();
    let chunk = move |delta: &str, finish: Option<FinishReason>, usage: Option<Usage>| {
        let body = Completion {
            id: &id,
            object: endpoint.object(true),
            created,
            model: &model,
            choices: vec![endpoint.choice(delta.to_string(), true, finish)],
            usage,
            seed: usage.and(seed),
            steering: None,
        };
        match serde_json::to_string(&body) {
            Ok(json) => Event::default().data(json),
            Err(e) => Event::default().event("error").data(e.to_string()),
        }
    };
    let codec = state.codec.clone();
    let metrics = state.metrics.clone();
    let deadline = tokio::time::Instant::now() + state.limits.timeout;
    // Text that could still grow into a stop string is held back until it cannot.
    let hold = stops
        .iter()
        .map(|s| s.len().saturating_sub(1))
        .max()
        .unwrap_or(0);
    let (events, sse) = tokio::sync::mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let mut decoder = StreamDecoder::default();
        let mut text = String::new();
        let mut sent = 0usize;
        let mut tokens = 0usize;
        let last = loop {
            let event = match tokio::time::timeout_at(deadline, receiver.recv()).await {
                Ok(Some(event)) => event,
                Ok(None) => break None,
                Err(_) => break Some(chunk("", Some(FinishReason::Length), None)),
            };
            match event {
                JobEvent::Token(token) => {
                    tokens += 1;
                    text.push_str(&decoder.push(&codec, token).unwrap_or_default());
                    if cut_at_stop(&mut text, &stops) {
                        metrics.tokens(tokens);
                        let tail = chunk(&text[sent.min(text.len())..], None, None);
                        if events.send(tail).await.is_err() {
                            return;
                        }
                        let usage = Usage::new(prompt_tokens, tokens);
                        break Some(chunk("", Some(FinishReason::Stop), Some(usage)));
                    }
                    let safe = floor_boundary(&text, text.len().saturating_sub(hold));
                    if safe > sent {
                        if events
                            .send(chunk(&text[sent..safe], None, None))
                            .await
                            .is_err()
                        {
                            return;
                        }
                        sent = safe;
                    }
                }
                JobEvent::Done(generated) => {
                    metrics.tokens(generated.token_ids.len());
                    if events.send(chunk(&text[sent..], None, None)).await.is_err() {
                        return;
                    }
                    let finish = finish_reason(&generated, false);
                    let usage = Usage::new(generated.prompt_tokens, generated.token_ids.len());
                    break Some(chunk("", Some(finish), Some(usage)));
                }
                JobEvent::Failed(message) => {
                    break Some(Event::default().event("error").data(message));
                }
            }
        };
        if let Some(last) = last {
            let _ = events.send(last).await;
        }
        let _ = events.send(Event::default().data("[DONE]")).await;
    });
    let stream = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::ReceiverStream::new(sse),
        Ok::<_, Infallible>,
    );
    Sse::new(stream).keep_alive(KeepAlive::default())
}
