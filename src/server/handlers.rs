//! The HTTP handlers. A completion request goes: body → [`openai`](super::openai) request →
//! prompt ids (chat template) and images → [`prepare`] (limits, sampling, steering) → a
//! [`Job`] for the engine → its events → a JSON body, or server-sent events ([`super::stream`]).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::choices::{choice_logprobs, EchoedPrompt};
use super::engine::{expired_message, Job, JobEvent, SubmitError};
use super::error::ApiError;
use super::images::with_images;
use super::openai::{
    self, Completion, Endpoint, LogprobsField, PromptInput, Settings, Steering, Usage,
};
use super::state::AppState;
use super::stream::{stream, StreamOptions};
use crate::chain::Prompt;
use crate::generate::{
    check_prompt_length, FinishReason, GenerateError, Generated, Penalties, RowRequest, Sampling,
};
use crate::steer::ResolvedSteering;
use crate::text::Turn;

/// `GET /health`: 200 while the engine runs, 503 once it has stopped.
pub(crate) async fn health(State(state): State<AppState>) -> Response {
    let alive = state.engine.is_alive();
    let kv = state.engine.kv_usage();
    let body = Json(serde_json::json!({
        "status": if alive { "ok" } else { "engine stopped" },
        "queue_depth": state.engine.queue_depth(),
        "batch_size": state.engine.batch_size(),
        "kv_slots": kv.slots,
        "kv_slots_used": kv.used_slots,
        "kv_positions_per_slot": kv.positions_per_slot,
        "kv_positions_filled": kv.filled_positions,
    }));
    let status = match alive {
        true => StatusCode::OK,
        false => StatusCode::SERVICE_UNAVAILABLE,
    };
    (status, body).into_response()
}

/// `GET /ready`: 200 while the server takes new requests; 503 once it drains (SIGTERM, so that a
/// load balancer stops sending it any before it stops listening) or its engine has stopped.
pub(crate) async fn ready(State(state): State<AppState>) -> Response {
    let draining = state.draining.load(std::sync::atomic::Ordering::Relaxed);
    let (status, word) = match (state.engine.is_alive(), draining) {
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "engine stopped"),
        (true, true) => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
        (true, false) => (StatusCode::OK, "ready"),
    };
    (status, Json(serde_json::json!({ "status": word }))).into_response()
}

/// `GET /v1/models`: the one bundle.
pub(crate) async fn models(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "object": "list",
        "data": [{"id": state.model_name, "object": "model", "owned_by": "onnx-steer"}],
    }))
}

/// `GET /metrics`: Prometheus text.
pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    let text = state.metrics.render(
        state.engine.queue_depth(),
        state.engine.batch_size(),
        state.engine.kv_usage(),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// `GET /v1/steering`: the registered specs, each with its digest (equal on replicas that serve
/// the same spec) and its source (`steer_dir`, shared; `api`, this replica's own).
pub(crate) async fn list_steering(
    State(state): State<AppState>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let specs: Vec<serde_json::Value> = state
        .registry
        .list()?
        .into_iter()
        .map(|listing| {
            serde_json::json!({"id": listing.id, "object": "steering_spec",
                               "sha256": listing.sha256, "source": listing.source})
        })
        .collect();
    Ok(Json(serde_json::json!({ "object": "list", "data": specs })))
}

/// `POST /v1/steering` `{"name", "spec"}`: the spec is checked and resolved first (on a blocking
/// thread), then swapped in; requests in flight keep the version they started with.
pub(crate) async fn register_steering(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    require_admin(&state, &headers)?;
    #[derive(serde::Deserialize)]
    struct Registration {
        name: String,
        spec: serde_json::Value,
    }
    let registration: Registration = parse(&read_body(body)?)?;
    let valid_name = !registration.name.is_empty()
        && registration.name.len() <= 64
        && registration
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !valid_name {
        return Err(ApiError::bad_request(
            "a steering name is 1 to 64 letters, digits, '_' or '-'",
        ));
    }
    let replaced = state
        .registry
        .register_posted(registration.name.clone(), registration.spec)
        .await?;
    Ok(Json(
        serde_json::json!({ "name": registration.name, "replaced": replaced }),
    ))
}

/// `DELETE /v1/steering/{name}`.
pub(crate) async fn unregister_steering(
    State(state): State<AppState>,
    headers: HeaderMap,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    require_admin(&state, &headers)?;
    match state.registry.unregister(&name)? {
        true => {
            state.metrics.forget_steering(&name);
            Ok(Json(serde_json::json!({ "name": name, "deleted": true })))
        }
        false => Err(ApiError::not_found(format!(
            "no steering spec named {name:?} is registered"
        ))),
    }
}

/// 401 unless the request carries the admin token (`serve --admin-token-file`).
fn require_admin(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    if state.is_admin(headers) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "changing the registered steering specs needs the admin token: \
             send \"Authorization: Bearer TOKEN\"",
        ))
    }
}

/// A request body, or why it could not be read (too large, for one) as an API error.
pub(crate) type Body = Result<Bytes, axum::extract::rejection::BytesRejection>;

fn read_body(body: Body) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| ApiError::new(rejection.status(), rejection.body_text()))
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not UTF-8: {e}")))?;
    serde_json::from_str(text).map_err(|e| ApiError::bad_request(format!("invalid request: {e}")))
}

/// `POST /v1/chat/completions`.
pub(crate) async fn chat_completions(State(state): State<AppState>, body: Body) -> Response {
    let handler = async { chat(state.clone(), read_body(body)?).await };
    measured(&state, Endpoint::Chat, handler).await
}

/// `POST /v1/completions`.
pub(crate) async fn completions(State(state): State<AppState>, body: Body) -> Response {
    let handler = async { completion(state.clone(), read_body(body)?).await };
    measured(&state, Endpoint::Completion, handler).await
}

/// Count a request and its latency under its endpoint.
async fn measured(
    state: &AppState,
    endpoint: Endpoint,
    handler: impl std::future::Future<Output = Result<Response, ApiError>>,
) -> Response {
    let started = Instant::now();
    let response = handler.await.into_response();
    state.metrics.request(
        endpoint.label(),
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

async fn chat(state: AppState, body: Bytes) -> Result<Response, ApiError> {
    let request: openai::ChatRequest = parse(&body)?;
    if request.messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty"));
    }
    let contents: Vec<(String, Vec<&str>)> =
        request.messages.iter().map(|m| m.content.split()).collect();
    let turns: Vec<Turn<'_>> = request
        .messages
        .iter()
        .zip(&contents)
        .map(|(m, (text, images))| Turn {
            role: m.role.as_str(),
            text,
            images: images.len(),
        })
        .collect();
    let urls: Vec<String> = contents
        .iter()
        .flat_map(|(_, images)| images.iter().map(|url| url.to_string()))
        .collect();
    let text = state
        .codec
        .render_messages(&turns)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let ids = state
        .codec
        .encode(&text, false)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let prompt = with_images(state.vision.clone(), ids, urls).await?;
    let entry = PromptEntry {
        prompt,
        text: String::new(),
    };
    respond(state, vec![entry], request.settings, Endpoint::Chat).await
}

async fn completion(state: AppState, body: Bytes) -> Result<Response, ApiError> {
    let request: openai::CompletionRequest = parse(&body)?;
    let encode = |text: &str| {
        state
            .codec
            .encode(text, true)
            .map_err(|e| ApiError::bad_request(e.to_string()))
    };
    let vocab = state.config.vocab_size;
    let given = |ids: Vec<u32>| match ids.iter().find(|&&id| id as usize >= vocab) {
        Some(bad) => Err(ApiError::bad_request(format!(
            "token id {bad} is outside the model's vocabulary of {vocab}"
        ))),
        None => Ok((state.codec.decode(&ids).unwrap_or_default(), ids)),
    };
    let from_text = |text: String| -> Result<(String, Vec<u32>), ApiError> {
        let ids = encode(&text)?;
        Ok((text, ids))
    };
    let prompts: Vec<(String, Vec<u32>)> = match request.prompt {
        PromptInput::Text(text) => vec![from_text(text)?],
        PromptInput::Tokens(ids) => vec![given(ids)?],
        PromptInput::Texts(texts) => texts.into_iter().map(from_text).collect::<Result<_, _>>()?,
        PromptInput::TokenLists(lists) => lists.into_iter().map(given).collect::<Result<_, _>>()?,
    };
    if prompts.is_empty() || prompts.len() > MAX_CHOICES {
        return Err(ApiError::bad_request(format!(
            "a request has 1 to {MAX_CHOICES} prompts, got {}",
            prompts.len()
        )));
    }
    let mut entries = Vec::with_capacity(prompts.len());
    for (text, ids) in prompts {
        let prompt = with_images(state.vision.clone(), ids, Vec::new()).await?;
        entries.push(PromptEntry { prompt, text });
    }
    respond(state, entries, request.settings, Endpoint::Completion).await
}

/// A request turned into what the engine runs, with what the response needs.
pub(crate) struct Prepared {
    pub(crate) request: RowRequest,
    pub(crate) stops: Vec<String>,
    pub(crate) stream: bool,
    /// The sampler seed of the first choice, when sampling (given, or drawn for this request);
    /// choice `i` samples with `seed + i`.
    pub(crate) seed: Option<u64>,
    /// How many choices to generate.
    pub(crate) choices: usize,
    /// Completions: the prompt comes back before the completion.
    pub(crate) echo: bool,
    /// How long the request may take from when it is queued: its `deadline_s`, at most the
    /// server's timeout.
    pub(crate) timeout: Duration,
}

/// Most choices one request may ask for (`n`).
pub const MAX_CHOICES: usize = 16;
/// Most alternatives per token (`top_logprobs`, or `logprobs` in the completions API), as OpenAI.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// 404 unless `model` is absent or the served bundle's name.
fn check_model(state: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(model) if model != state.model_name => Err(ApiError::not_found(format!(
            "the model `{model}` does not exist; this server serves `{}` (GET /v1/models)",
            state.model_name
        ))),
        _ => Ok(()),
    }
}

/// The alternatives per token a request asks for (`None`: no log-probabilities), by its
/// endpoint's rules: chat takes `logprobs: true` and `top_logprobs`, completions an integer.
fn requested_logprobs(settings: &Settings, endpoint: Endpoint) -> Result<Option<usize>, ApiError> {
    let in_range = |name: &str, k: i64| match usize::try_from(k) {
        Ok(k) if k <= MAX_TOP_LOGPROBS => Ok(k),
        _ => Err(ApiError::bad_request(format!(
            "{name} must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {k}"
        ))),
    };
    match (endpoint, settings.logprobs, settings.top_logprobs) {
        (Endpoint::Chat, Some(LogprobsField::Flag(true)), top) => {
            Ok(Some(top.map_or(Ok(0), |k| in_range("top_logprobs", k))?))
        }
        (Endpoint::Chat, Some(LogprobsField::Count(_)), _) => Err(ApiError::bad_request(
            "in the chat API logprobs is true or false; ask for alternatives with top_logprobs",
        )),
        (Endpoint::Chat, _, Some(_)) => Err(ApiError::bad_request(
            "top_logprobs needs logprobs: true",
        )),
        (Endpoint::Completion, Some(LogprobsField::Count(k)), _) => Ok(Some(in_range("logprobs", k)?)),
        (Endpoint::Completion, Some(LogprobsField::Flag(_)), _) => Err(ApiError::bad_request(
            format!("in the completions API logprobs is the number of alternatives, 0 to {MAX_TOP_LOGPROBS}"),
        )),
        (Endpoint::Completion, _, Some(_)) => Err(ApiError::bad_request(
            "top_logprobs is a chat field; the completions API takes logprobs: K",
        )),
        _ => Ok(None),
    }
}

/// Check a request against the limits and turn it into a row: length, sampling (a fresh seed when
/// the request gives none), penalties, log-probabilities, stop strings and steering (resolved off
/// the async workers).
async fn prepare(
    state: &AppState,
    prompt: Prompt,
    settings: Settings,
    endpoint: Endpoint,
) -> Result<Prepared, ApiError> {
    check_model(state, settings.model.as_deref())?;
    let label = match &settings.steering {
        None => "none".to_string(),
        Some(Steering::Named(name)) => name.clone(),
        Some(Steering::Inline(_)) => "inline".to_string(),
    };
    if settings.echo && endpoint == Endpoint::Chat {
        return Err(ApiError::bad_request(
            "echo is a completions field; the chat API does not echo the prompt",
        ));
    }
    let choices = match settings.n {
        None => 1,
        Some(n) if (1..=MAX_CHOICES as i64).contains(&n) => n as usize,
        Some(n) => {
            return Err(ApiError::bad_request(format!(
                "n must be from 1 to {MAX_CHOICES}, got {n}"
            )))
        }
    };
    let context = state.config.max_position_embeddings;
    let tokens = prompt.ids.len();
    check_prompt_length(0, tokens, context).map_err(|e| match e {
        GenerateError::EmptyPrompt { .. } => ApiError::bad_request("the prompt is empty"),
        _ => ApiError::bad_request(format!(
            "the prompt has {tokens} tokens; the server's context is {context} (the model's, or serve --max-context) and must leave room for at least one new token"
        )),
    })?;
    let room = context - tokens;
    let max_tokens = match settings.max_completion_tokens.or(settings.max_tokens) {
        None => state.limits.default_max_tokens.min(room),
        Some(n) if n < 0 => {
            return Err(ApiError::bad_request(format!(
                "max_tokens must not be negative, got {n}"
            )))
        }
        Some(0) if !settings.echo => {
            return Err(ApiError::bad_request(
                "max_tokens must be at least 1 (0 is allowed only with echo, to score the prompt)",
            ))
        }
        Some(n) if n as u64 > room as u64 => {
            return Err(ApiError::bad_request(format!(
                "max_tokens {n} does not fit: the prompt has {tokens} tokens and the server's context is {context}"
            )))
        }
        Some(n) => n as usize,
    };
    if let Some(top_p) = settings.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
        return Err(ApiError::bad_request(format!(
            "top_p must be in (0, 1], got {top_p}"
        )));
    }
    let seed = settings.seed.unwrap_or_else(rand::random);
    let sampling = match settings.temperature {
        None => Sampling::Greedy,
        // Negative and non-finite temperatures stay `Random` and fail `validate` below.
        Some(t) => Sampling::with_temperature(t, settings.top_p.unwrap_or(1.0), 0, seed),
    };
    sampling
        .validate()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let penalties = Penalties {
        presence: settings.presence_penalty.unwrap_or(0.0),
        frequency: settings.frequency_penalty.unwrap_or(0.0),
    };
    penalties
        .validate()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let logprobs = requested_logprobs(&settings, endpoint)?;
    let prompt_logprobs = settings.echo && logprobs.is_some();
    if prompt_logprobs && settings.stream {
        return Err(ApiError::bad_request(
            "echo with logprobs is answered whole; set stream to false",
        ));
    }
    let stops = settings
        .stop
        .map(openai::Stop::into_vec)
        .unwrap_or_default();
    if stops.iter().any(String::is_empty) {
        return Err(ApiError::bad_request("stop strings must not be empty"));
    }
    let timeout = request_timeout(settings.deadline_s, state.limits.timeout)?;
    let steering = steering(state, settings.steering).await?;
    state.metrics.steering(&label);
    Ok(Prepared {
        request: RowRequest {
            prompt,
            sampling,
            max_new_tokens: max_tokens,
            stop_ids: state.config.eos_token_ids.clone(),
            stop_strings: stops.clone(),
            steering,
            penalties,
            logprobs,
            prompt_logprobs,
        },
        stops,
        stream: settings.stream,
        seed: matches!(sampling, Sampling::Random { .. }).then_some(seed),
        choices,
        echo: settings.echo,
        timeout,
    })
}

/// A request's own deadline (`deadline_s`), capped by the server's `limit`.
fn request_timeout(deadline_s: Option<f64>, limit: Duration) -> Result<Duration, ApiError> {
    match deadline_s {
        None => Ok(limit),
        Some(seconds) if seconds.is_finite() && seconds > 0.0 => {
            Ok(Duration::try_from_secs_f64(seconds).map_or(limit, |own| own.min(limit)))
        }
        Some(seconds) => Err(ApiError::bad_request(format!(
            "deadline_s must be a positive number of seconds, got {seconds}"
        ))),
    }
}

/// The request of choice `index`: the same row, its sampler seeded `seed + index`.
pub(crate) fn choice_request(request: &RowRequest, index: usize) -> RowRequest {
    let mut request = request.clone();
    if let Sampling::Random { seed, .. } = &mut request.sampling {
        *seed = seed.wrapping_add(index as u64);
    }
    request
}

async fn steering(
    state: &AppState,
    steering: Option<Steering>,
) -> Result<Option<Arc<ResolvedSteering>>, ApiError> {
    match steering {
        None => Ok(None),
        Some(Steering::Named(name)) => state.registry.named(&name).map(Some),
        Some(Steering::Inline(spec)) => state.registry.inline(spec).await.map(Some),
    }
}

/// Queue `requests` to join the batch together; one receiver of row events per request, in order.
fn submit(
    state: &AppState,
    requests: Vec<RowRequest>,
) -> Result<Vec<UnboundedReceiver<JobEvent>>, ApiError> {
    let (jobs, receivers) = requests
        .into_iter()
        .map(|request| {
            let (events, receiver) = unbounded_channel();
            (Job { request, events }, receiver)
        })
        .unzip();
    state.engine.submit(jobs).map_err(|e| match e {
        SubmitError::QueueFull(_) => ApiError::new(StatusCode::TOO_MANY_REQUESTS, e.to_string())
            .with_retry_after(state.engine.retry_after_s()),
        SubmitError::EngineStopped => ApiError::unavailable(e.to_string()),
    })?;
    Ok(receivers)
}

/// Unix seconds, for `created`.
pub(crate) fn created() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Cut `text` at the first stop string; returns whether one was found.
pub(crate) fn cut_at_stop(text: &mut String, stops: &[String]) -> bool {
    let first = stops.iter().filter_map(|s| text.find(s.as_str())).min();
    if let Some(at) = first {
        text.truncate(at);
        true
    } else {
        false
    }
}

/// One prompt of a request: its tokens (and images) and its text, which `echo` returns.
pub(crate) struct PromptEntry {
    pub(crate) prompt: Prompt,
    pub(crate) text: String,
}

async fn respond(
    state: AppState,
    prompts: Vec<PromptEntry>,
    settings: Settings,
    endpoint: Endpoint,
) -> Result<Response, ApiError> {
    // One seed for the request (given, or drawn here), so that every prompt samples from it and
    // the seed reported back is the one each prompt used.
    let mut settings = settings;
    settings.seed.get_or_insert_with(rand::random);
    let mut prepared = Vec::with_capacity(prompts.len());
    for entry in prompts {
        prepared.push((
            prepare(&state, entry.prompt, settings.clone(), endpoint).await?,
            entry.text,
        ));
    }
    let choices_per_prompt = prepared.first().map_or(1, |(p, _)| p.choices);
    if prepared.len() * choices_per_prompt > MAX_CHOICES {
        return Err(ApiError::bad_request(format!(
            "{} prompts x n = {choices_per_prompt} asks for more than {MAX_CHOICES} choices",
            prepared.len()
        )));
    }
    // Every choice is queued at once, as one group that joins the batch together (or is refused
    // whole). Choice `prompt * n + i` is choice i of that prompt, as OpenAI numbers them.
    let requests = prepared
        .iter()
        .flat_map(|(request, _)| {
            (0..request.choices).map(|index| choice_request(&request.request, index))
        })
        .collect();
    let receivers = submit(&state, requests)?;
    let id = format!("cmpl-{}", rand::random::<u64>());
    let (first, first_text) = &prepared[0];
    let (stops, seed, timeout) = (first.stops.clone(), first.seed, first.timeout);
    let prompt_tokens: usize = prepared
        .iter()
        .map(|(p, _)| p.request.prompt.ids.len())
        .sum();
    if first.stream {
        if prepared.len() > 1 {
            return Err(ApiError::bad_request(
                "several prompts are answered whole; set stream to false or send one prompt",
            ));
        }
        let response = stream(
            state,
            receivers,
            StreamOptions {
                stops,
                endpoint,
                id,
                prompt_tokens,
                seed,
                logprobs: first.request.logprobs.is_some(),
                echoed: first.echo.then(|| first_text.clone()),
                timeout,
            },
        );
        return Ok(response.into_response());
    }
    let generated = tokio::time::timeout(timeout, async {
        let mut done = Vec::with_capacity(receivers.len());
        for mut receiver in receivers {
            done.push(loop {
                match receiver.recv().await {
                    Some(JobEvent::Done(generated)) => break generated,
                    Some(JobEvent::Failed(message)) => return Err(ApiError::internal(message)),
                    Some(JobEvent::Expired(waited)) => {
                        return Err(ApiError::unavailable(expired_message(waited))
                            .with_retry_after(state.engine.retry_after_s()))
                    }
                    Some(JobEvent::Token(..)) => {}
                    None => return Err(ApiError::unavailable("the engine stopped")),
                }
            });
        }
        Ok(done)
    })
    .await
    .map_err(|_| {
        ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!("the request took longer than {timeout:?}"),
        )
    })??;
    let completion_tokens: usize = generated.iter().map(|g| g.token_ids.len()).sum();
    state.metrics.tokens(completion_tokens);
    let choices = generated
        .iter()
        .enumerate()
        .map(|(index, generated)| {
            let (request, prompt_text) = &prepared[index / choices_per_prompt];
            let mut text = state.codec.decode(&generated.token_ids).unwrap_or_default();
            let finish = finish_reason(generated, cut_at_stop(&mut text, &stops));
            let prefix = if request.echo {
                prompt_text.as_str()
            } else {
                ""
            };
            let logprobs = request.request.logprobs.map(|_| {
                let echoed_prompt = request.echo.then(|| EchoedPrompt {
                    first: request.request.prompt.ids[0],
                    rest: &generated.prompt_logprobs,
                });
                choice_logprobs(
                    endpoint,
                    &state.codec,
                    echoed_prompt,
                    &generated.logprobs,
                    0,
                )
            });
            endpoint.choice(
                index,
                format!("{prefix}{text}"),
                false,
                Some(finish),
                logprobs,
            )
        })
        .collect();
    let decisions = generated
        .first()
        .map(|g| g.steering.clone())
        .unwrap_or_default();
    let body = Completion {
        id: &id,
        object: endpoint.object(false),
        created: created(),
        model: &state.model_name,
        choices,
        usage: Some(Usage::new(prompt_tokens, completion_tokens)),
        seed,
        steering: Some(&decisions),
    };
    Ok(Json(body).into_response())
}

/// The OpenAI finish reason: `stop` for an EOS or a stop string, `length` otherwise.
pub(crate) fn finish_reason(generated: &Generated, stopped_by_string: bool) -> FinishReason {
    match stopped_by_string {
        true => FinishReason::Stop,
        false => generated.finish_reason,
    }
}
