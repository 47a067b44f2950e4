//! The HTTP server (`onnx-steer serve`): OpenAI-compatible completions with steering per request,
//! served by one engine thread that batches concurrent requests ([`engine`]).
//!
//! Data flow: request JSON → [`openai`] types → prompt ids (chat template) and a resolved steer
//! spec (a registered name, or inline with its paths confined to `--steer-dir`) → a
//! [`engine::Job`] in the bounded queue → the engine's events → a JSON body or server-sent events.

pub mod engine;
pub mod metrics;
pub mod openai;

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::bundle::ModelConfig;
use crate::chain::Prompt;
use crate::generate::batch::RowRequest;
use crate::generate::{FinishReason, Generated, Sampling};
use crate::runtime::Runtime;
use crate::steer::{ResolvedSteering, SteerSpec};
use crate::text::{StreamDecoder, TextCodec, Turn};
use crate::vision::{self, VisionEncoder};
use engine::{EngineHandle, Job, JobEvent};
use metrics::Metrics;
use openai::{ErrorBody, ErrorDetail, Settings, Steering, Usage};

/// Limits a request must stay within.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body, bytes.
    pub max_body_bytes: usize,
    /// Tokens generated when a request does not say.
    pub default_max_tokens: usize,
    /// Longest a request may take, start to end.
    pub timeout: Duration,
}

/// Everything a handler needs; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    engine: EngineHandle,
    codec: Arc<TextCodec>,
    config: Arc<ModelConfig>,
    runtime: Arc<Runtime>,
    model_name: String,
    registry: Arc<RwLock<HashMap<String, Arc<ResolvedSteering>>>>,
    steer_dir: Option<PathBuf>,
    limits: Limits,
    metrics: Metrics,
    vision: Option<Arc<Mutex<VisionEncoder>>>,
}

impl AppState {
    /// State for a server over `engine`; registered specs are the `*.json` files of `steer_dir`.
    pub fn new(
        engine: EngineHandle,
        codec: TextCodec,
        config: ModelConfig,
        runtime: Arc<Runtime>,
        model_name: String,
        steer_dir: Option<PathBuf>,
        limits: Limits,
    ) -> Result<Self, crate::steer::SteerError> {
        let mut registry = HashMap::new();
        if let Some(dir) = &steer_dir {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|_| crate::steer::SteerError::MissingFile { path: dir.clone() })?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|path| path.extension().is_some_and(|e| e == "json"))
                .collect();
            files.sort();
            for path in files {
                let Some(name) = path.file_stem().map(|s| s.to_string_lossy().into_owned()) else {
                    continue;
                };
                // Not every JSON file there is a spec (labels, reports): skip those, loudly.
                match SteerSpec::load(&path).and_then(|spec| spec.resolve(&config, &runtime)) {
                    Ok(resolved) => {
                        registry.insert(name, Arc::new(resolved));
                    }
                    Err(e) => tracing::warn!("not registering {}: {e}", path.display()),
                }
            }
        }
        Ok(Self {
            engine,
            codec: Arc::new(codec),
            config: Arc::new(config),
            runtime,
            model_name,
            registry: Arc::new(RwLock::new(registry)),
            steer_dir,
            limits,
            metrics: Metrics::new().map_err(|e| crate::steer::SteerError::Syntax {
                path: PathBuf::from("metrics"),
                message: e.to_string(),
            })?,
            vision: None,
        })
    }
}

/// The routes, with the body-size limit applied.
pub fn router(state: AppState) -> Router {
    let limit = state.limits.max_body_bytes;
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/metrics", get(render_metrics))
        .route("/v1/steering", get(list_steering).post(register_steering))
        .route("/v1/steering/{name}", delete(unregister_steering))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// A request that cannot be served, as an HTTP status and an OpenAI-style JSON error.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status {
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::NOT_FOUND => "not_found_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        };
        let body = Json(ErrorBody {
            error: ErrorDetail {
                message: self.message,
                kind,
                code: self.status.as_u16(),
            },
        });
        let mut response = (self.status, body).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        response
    }
}

async fn health(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "status": "ok",
        "queue_depth": state.engine.queue_depth(),
        "batch_size": state.engine.batch_size(),
    }))
}

async fn models(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "object": "list",
        "data": [{"id": state.model_name, "object": "model", "owned_by": "onnx-steer"}],
    }))
}

async fn render_metrics(State(state): State<AppState>) -> Response {
    let text = state
        .metrics
        .render(state.engine.queue_depth(), state.engine.batch_size());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

fn poisoned() -> ApiError {
    ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: "steering registry lock poisoned".into(),
    }
}

async fn list_steering(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let registry = state.registry.read().map_err(|_| poisoned())?;
    let mut names: Vec<&String> = registry.keys().collect();
    names.sort();
    Ok(Json(serde_json::json!({ "object": "list", "data": names })))
}

/// `POST /v1/steering` `{"name", "spec"}`: the spec is checked and resolved first, then swapped in;
/// requests in flight keep the version they started with.
async fn register_steering(
    State(state): State<AppState>,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body = read_body(body)?;
    #[derive(serde::Deserialize)]
    struct Registration {
        name: String,
        spec: serde_json::Value,
    }
    let registration: Registration = parse(&body)?;
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
    let resolved = state
        .steering(Some(Steering::Inline(registration.spec)))?
        .ok_or_else(|| ApiError::bad_request("no spec given"))?;
    let replaced = state
        .registry
        .write()
        .map_err(|_| poisoned())?
        .insert(registration.name.clone(), resolved)
        .is_some();
    Ok(Json(
        serde_json::json!({ "name": registration.name, "replaced": replaced }),
    ))
}

async fn unregister_steering(
    State(state): State<AppState>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    match state
        .registry
        .write()
        .map_err(|_| poisoned())?
        .remove(&name)
    {
        Some(_) => Ok(Json(serde_json::json!({ "name": name, "deleted": true }))),
        None => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("no steering spec named {name:?} is registered"),
        }),
    }
}

/// A request turned into what the engine runs, with what the response needs.
struct Prepared {
    request: RowRequest,
    stops: Vec<String>,
    stream: bool,
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not UTF-8: {e}")))?;
    serde_json::from_str(text).map_err(|e| ApiError::bad_request(format!("invalid request: {e}")))
}

/// Every path an inline spec names must lie inside the steering directory.
fn confine(spec: &serde_json::Value, dir: &Path) -> Result<(), ApiError> {
    let root = dir
        .canonicalize()
        .map_err(|_| ApiError::bad_request("the server's steering directory is unreadable"))?;
    let entries = spec
        .get("interventions")
        .and_then(|v| v.as_array())
        .ok_or_else(|| ApiError::bad_request("an inline steering spec needs \"interventions\""))?;
    for entry in entries {
        for key in ["path", "router", "bank", "prober", "head"] {
            let Some(path) = entry.get(key).and_then(|v| v.as_str()) else {
                continue;
            };
            let inside = root
                .join(path)
                .canonicalize()
                .map(|p| p.starts_with(&root))
                .unwrap_or(false);
            if !inside {
                return Err(ApiError::bad_request(format!(
                    "steering file {path:?} is not a file inside the server's steering directory"
                )));
            }
        }
    }
    Ok(())
}

impl AppState {
    /// Accept images (`image_url` content parts) with this bundle's vision encoder.
    pub fn with_vision(mut self, encoder: VisionEncoder) -> Self {
        self.vision = Some(Arc::new(Mutex::new(encoder)));
        self
    }

    /// Decode the data-URL images of a request and splice their embeddings into `ids`; the
    /// encoder runs on a blocking thread so the async workers keep serving.
    async fn with_images(&self, ids: Vec<u32>, urls: Vec<String>) -> Result<Prompt, ApiError> {
        let Some(encoder) = self.vision.clone() else {
            return match urls.is_empty() {
                true => Ok(ids.into()),
                false => Err(ApiError::bad_request(
                    vision::VisionError::TextOnlyBundle.to_string(),
                )),
            };
        };
        let images = urls
            .iter()
            .enumerate()
            .map(|(index, url)| decode_data_url(url, index))
            .collect::<Result<Vec<_>, _>>()?;
        let spliced = tokio::task::spawn_blocking(move || {
            let mut encoder = encoder
                .lock()
                .map_err(|_| "vision encoder lock poisoned".to_string())?;
            let embeds = encoder.embed(&images).map_err(|e| e.to_string())?;
            encoder.prompt(&ids, embeds).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: format!("vision encoder task failed: {e}"),
        })?;
        spliced.map_err(ApiError::bad_request)
    }

    fn steering(
        &self,
        steering: Option<Steering>,
    ) -> Result<Option<Arc<ResolvedSteering>>, ApiError> {
        match steering {
            None => Ok(None),
            Some(Steering::Named(name)) => {
                let registry = self.registry.read().map_err(|_| ApiError {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    message: "steering registry lock poisoned".into(),
                })?;
                registry.get(&name).cloned().map(Some).ok_or_else(|| ApiError {
                    status: StatusCode::NOT_FOUND,
                    message: format!("no steering spec named {name:?} is registered (GET /v1/steering lists them)"),
                })
            }
            Some(Steering::Inline(spec)) => {
                let dir = self.steer_dir.as_deref().ok_or_else(|| {
                    ApiError::bad_request(
                        "inline steering specs need the server to run with --steer-dir",
                    )
                })?;
                confine(&spec, dir)?;
                let parsed = SteerSpec::parse(&spec.to_string(), dir, "request steering")
                    .map_err(|e| ApiError::bad_request(e.to_string()))?;
                let resolved = parsed
                    .resolve(&self.config, &self.runtime)
                    .map_err(|e| ApiError::bad_request(e.to_string()))?;
                Ok(Some(Arc::new(resolved)))
            }
        }
    }

    fn prepare(&self, full_prompt: Prompt, settings: Settings) -> Result<Prepared, ApiError> {
        let prompt = &full_prompt.ids;
        let label = match &settings.steering {
            None => "none".to_string(),
            Some(Steering::Named(name)) => name.clone(),
            Some(Steering::Inline(_)) => "inline".to_string(),
        };
        let context = self.config.max_position_embeddings;
        if prompt.is_empty() {
            return Err(ApiError::bad_request("the prompt is empty"));
        }
        if prompt.len() >= context {
            return Err(ApiError::bad_request(format!(
                "the prompt has {} tokens; the model's context is {context}",
                prompt.len()
            )));
        }
        let room = context - prompt.len();
        let max_tokens = match settings.max_completion_tokens.or(settings.max_tokens) {
            None => self.limits.default_max_tokens.min(room),
            Some(n) if n < 0 => {
                return Err(ApiError::bad_request(format!("max_tokens must not be negative, got {n}")))
            }
            Some(n) if n as u64 > room as u64 => {
                return Err(ApiError::bad_request(format!(
                    "max_tokens {n} does not fit: the prompt has {} tokens and the context is {context}",
                    prompt.len()
                )))
            }
            Some(n) => n as usize,
        };
        if let Some(top_p) = settings.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
            return Err(ApiError::bad_request(format!(
                "top_p must be in (0, 1], got {top_p}"
            )));
        }
        let sampling = match settings.temperature {
            None | Some(0.0) => Sampling::Greedy,
            Some(t) => Sampling::Random {
                temperature: t,
                top_p: settings.top_p.unwrap_or(1.0),
                top_k: 0,
                seed: settings.seed.unwrap_or(0),
            },
        };
        sampling
            .validate()
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let stops = settings
            .stop
            .map(openai::Stop::into_vec)
            .unwrap_or_default();
        if stops.iter().any(String::is_empty) {
            return Err(ApiError::bad_request("stop strings must not be empty"));
        }
        let steering = self.steering(settings.steering)?;
        self.metrics.steering(&label);
        Ok(Prepared {
            request: RowRequest {
                prompt: full_prompt,
                sampling,
                max_new_tokens: max_tokens,
                stop_ids: self.config.eos_token_ids.clone(),
                steering,
            },
            stops,
            stream: settings.stream,
        })
    }

    fn submit(&self, request: RowRequest) -> Result<UnboundedReceiver<JobEvent>, ApiError> {
        let (events, receiver) = unbounded_channel();
        self.engine
            .submit(Job { request, events })
            .map_err(|e| ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: e.to_string(),
            })?;
        Ok(receiver)
    }
}

/// Which endpoint a response is for.
#[derive(Clone, Copy)]
enum Endpoint {
    Chat,
    Completion,
}

/// Count a request and its latency under `endpoint`.
async fn measured(
    state: &AppState,
    endpoint: &str,
    handler: impl std::future::Future<Output = Result<Response, ApiError>>,
) -> Response {
    let started = Instant::now();
    let response = handler.await.into_response();
    state.metrics.request(
        endpoint,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

/// A request body, or why it could not be read (too large, for one) as an API error.
type Body = Result<Bytes, axum::extract::rejection::BytesRejection>;

fn read_body(body: Body) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| ApiError {
        status: rejection.status(),
        message: rejection.body_text(),
    })
}

async fn chat_completions(State(state): State<AppState>, body: Body) -> Response {
    let handler = async { chat(state.clone(), read_body(body)?).await };
    measured(&state, "chat", handler).await
}

async fn completions(State(state): State<AppState>, body: Body) -> Response {
    let handler = async { completion(state.clone(), read_body(body)?).await };
    measured(&state, "completions", handler).await
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
    let prompt = state.with_images(ids, urls).await?;
    respond(state, prompt, request.settings, Endpoint::Chat).await
}

async fn completion(state: AppState, body: Bytes) -> Result<Response, ApiError> {
    let request: openai::CompletionRequest = parse(&body)?;
    let ids = state
        .codec
        .encode(&request.prompt, true)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let prompt = state.with_images(ids, Vec::new()).await?;
    respond(state, prompt, request.settings, Endpoint::Completion).await
}

/// Cut `text` at the first stop string; returns whether one was found.
fn cut_at_stop(text: &mut String, stops: &[String]) -> bool {
    let first = stops.iter().filter_map(|s| text.find(s.as_str())).min();
    if let Some(at) = first {
        text.truncate(at);
        true
    } else {
        false
    }
}

fn finish_name(reason: FinishReason, stopped_by_string: bool) -> &'static str {
    if stopped_by_string {
        return "stop";
    }
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn created() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The bytes of a `data:image/...;base64,...` URL, decoded to RGB.
fn decode_data_url(url: &str, index: usize) -> Result<image::RgbImage, ApiError> {
    use base64::Engine;
    let name = format!("image_url[{index}]");
    let payload = url
        .strip_prefix("data:")
        .and_then(|rest| rest.split_once(";base64,"))
        .map(|(_, payload)| payload)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "{name}: only data:image/...;base64, URLs are accepted (the server fetches nothing)"
            ))
        })?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(payload.trim())
        .map_err(|e| ApiError::bad_request(format!("{name}: invalid base64: {e}")))?;
    vision::decode(&bytes, &name).map_err(|e| ApiError::bad_request(e.to_string()))
}

async fn respond(
    state: AppState,
    prompt: Prompt,
    settings: Settings,
    endpoint: Endpoint,
) -> Result<Response, ApiError> {
    let prepared = state.prepare(prompt, settings)?;
    let prompt_tokens = prepared.request.prompt.ids.len();
    let mut receiver = state.submit(prepared.request)?;
    let id = format!("cmpl-{}", rand::random::<u64>());
    if prepared.stream {
        return Ok(
            stream(state, receiver, prepared.stops, endpoint, id, prompt_tokens).into_response(),
        );
    }
    let generated = tokio::time::timeout(state.limits.timeout, async {
        loop {
            match receiver.recv().await {
                Some(JobEvent::Done(generated)) => return Ok(generated),
                Some(JobEvent::Failed(message)) => {
                    return Err(ApiError {
                        status: StatusCode::INTERNAL_SERVER_ERROR,
                        message,
                    })
                }
                Some(JobEvent::Token(_)) => {}
                None => {
                    return Err(ApiError {
                        status: StatusCode::SERVICE_UNAVAILABLE,
                        message: "the engine stopped".into(),
                    })
                }
            }
        }
    })
    .await
    .map_err(|_| ApiError {
        status: StatusCode::GATEWAY_TIMEOUT,
        message: format!("the request took longer than {:?}", state.limits.timeout),
    })??;
    state.metrics.tokens(generated.token_ids.len());
    Ok(Json(body(&state, &generated, &prepared.stops, endpoint, &id)).into_response())
}

/// The non-streaming response body.
fn body(
    state: &AppState,
    generated: &Generated,
    stops: &[String],
    endpoint: Endpoint,
    id: &str,
) -> serde_json::Value {
    let mut text = state.codec.decode(&generated.token_ids).unwrap_or_default();
    let stopped = cut_at_stop(&mut text, stops);
    let finish = finish_name(generated.finish_reason, stopped);
    let usage = Usage::new(generated.prompt_tokens, generated.token_ids.len());
    let choice = match endpoint {
        Endpoint::Chat => serde_json::json!({
            "index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
        }),
        Endpoint::Completion => {
            serde_json::json!({"index": 0, "text": text, "finish_reason": finish})
        }
    };
    serde_json::json!({
        "id": id,
        "object": match endpoint { Endpoint::Chat => "chat.completion", Endpoint::Completion => "text_completion" },
        "created": created(),
        "model": state.model_name,
        "choices": [choice],
        "usage": usage,
        "steering": generated.steering,
    })
}

/// The largest char boundary of `text` at or below `at`.
fn floor_boundary(text: &str, mut at: usize) -> usize {
    while at > 0 && !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// Server-sent events: one chunk per text delta, a last chunk with the finish reason and usage,
/// then `[DONE]`. A task turns engine events into SSE events; when the client leaves, the SSE
/// stream is dropped, the task's sends fail, it drops the engine receiver, and the row is cancelled.
fn stream(
    state: AppState,
    mut receiver: UnboundedReceiver<JobEvent>,
    stops: Vec<String>,
    endpoint: Endpoint,
    id: String,
    prompt_tokens: usize,
) -> impl IntoResponse {
    let object = match endpoint {
        Endpoint::Chat => "chat.completion.chunk",
        Endpoint::Completion => "text_completion",
    };
    let created = created();
    let model = state.model_name.clone();
    let chunk = move |delta: &str, finish: Option<&str>, usage: Option<Usage>| {
        let choice = match endpoint {
            Endpoint::Chat => serde_json::json!({
                "index": 0, "delta": {"content": delta}, "finish_reason": finish,
            }),
            Endpoint::Completion => {
                serde_json::json!({"index": 0, "text": delta, "finish_reason": finish})
            }
        };
        let mut value = serde_json::json!({
            "id": id, "object": object, "created": created, "model": model, "choices": [choice],
        });
        if let Some(usage) = usage {
            value["usage"] = serde_json::json!(usage);
        }
        Event::default().data(value.to_string())
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
                Err(_) => break Some(chunk("", Some("length"), None)),
            };
            match event {
                JobEvent::Token(token) => {
                    tokens += 1;
                    text.push_str(&decoder.push(&codec, token).unwrap_or_default());
                    if cut_at_stop(&mut text, &stops) {
                        let tail = chunk(&text[sent.min(text.len())..], None, None);
                        if events.send(tail).await.is_err() {
                            return;
                        }
                        break Some(chunk(
                            "",
                            Some("stop"),
                            Some(Usage::new(prompt_tokens, tokens)),
                        ));
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
                    let finish = finish_name(generated.finish_reason, false);
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
