//! OpenAI request and response shapes (chat and text completions), plus the `steering` field.
//!
//! Unknown request fields are ignored, as OpenAI-compatible servers do, so that clients that send
//! `user` or `logit_bias` still work; fields that are present must have the right type. The fields
//! clients send on every request (`model`, `n`, the penalties, `logprobs`, `echo`, `seed`,
//! `stop`) behave as OpenAI's do.

use serde::{Deserialize, Serialize};

use crate::generate::FinishReason;
use crate::steer::Decision;

/// `stop`: one string or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl Stop {
    /// The stop strings as a list.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// `steering`: the name of a spec registered on the server, or a spec given inline.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Steering {
    /// A spec registered on the server (`--steer-dir` or `POST /v1/steering`).
    Named(String),
    /// A spec in the request; its files must lie inside `--steer-dir`.
    Inline(serde_json::Value),
}

/// `logprobs`: a flag in the chat API, a count of alternatives in the completions API.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
pub enum LogprobsField {
    /// Chat: whether to return log-probabilities.
    Flag(bool),
    /// Completions: how many alternatives per token (0: the chosen token's only).
    Count(i64),
}

/// Sampling and length settings shared by both endpoints.
#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    /// The model: absent, or the served bundle's name (`GET /v1/models`); others are 404.
    #[serde(default)]
    pub model: Option<String>,
    /// Choices to generate, each with its own sampler seed (1 when absent).
    #[serde(default)]
    pub n: Option<i64>,
    /// In [-2, 2]: lowers tokens the choice already generated, once each.
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    /// In [-2, 2]: lowers tokens the choice already generated, per occurrence.
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    /// Log-probabilities of the generated tokens (see [`LogprobsField`]).
    #[serde(default)]
    pub logprobs: Option<LogprobsField>,
    /// Chat: alternatives per token, with `logprobs: true`.
    #[serde(default)]
    pub top_logprobs: Option<i64>,
    /// Completions: return the prompt before the completion (with `logprobs`, scored too); with
    /// `max_tokens: 0` nothing is generated.
    #[serde(default)]
    pub echo: bool,
    /// Most tokens to generate (the server's default when absent).
    #[serde(default)]
    pub max_tokens: Option<i64>,
    /// The newer name of `max_tokens` in the chat API.
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    /// Sampling temperature; absent or below 1e-5 is greedy.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass, in (0, 1].
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Sampler seed; without one the server draws a fresh seed and reports it.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Strings that end generation (the text is cut before them).
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Answer with server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// onnx-steer: the steering of this request.
    #[serde(default)]
    pub steering: Option<Steering>,
    /// onnx-steer: seconds, from when the request is queued, within which it must finish, the
    /// wait in the queue included (the server's `--timeout-s` when absent or longer). A request
    /// still queued at its deadline leaves the queue without running; it is answered 504.
    #[serde(default)]
    pub deadline_s: Option<f64>,
}

/// One chat turn.
#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// What the turn says.
    pub content: Content,
}

/// A turn's content: a string, or OpenAI content parts (text and `image_url`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Text and image parts.
    Parts(Vec<ContentPart>),
}

/// One content part.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    /// `{"type": "text", "text"}`.
    Text {
        /// The text.
        text: String,
    },
    /// `{"type": "image_url", "image_url": {"url"}}`.
    ImageUrl {
        /// The image.
        image_url: ImageUrl,
    },
}

/// An image given inline as a `data:image/...;base64,` URL (the server fetches nothing).
#[derive(Debug, Clone, Deserialize)]
pub struct ImageUrl {
    /// A `data:image/...;base64,` URL.
    pub url: String,
}

impl Content {
    /// The text parts joined by newlines, and the image URLs in order.
    pub fn split(&self) -> (String, Vec<&str>) {
        match self {
            Content::Text(text) => (text.clone(), Vec::new()),
            Content::Parts(parts) => {
                let mut texts = Vec::new();
                let mut images = Vec::new();
                for part in parts {
                    match part {
                        ContentPart::Text { text } => texts.push(text.as_str()),
                        ContentPart::ImageUrl { image_url } => images.push(image_url.url.as_str()),
                    }
                }
                (texts.join("\n"), images)
            }
        }
    }
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// The conversation, rendered with the bundle's chat template.
    pub messages: Vec<Message>,
    /// Sampling, length, stop and steering settings.
    #[serde(flatten)]
    pub settings: Settings,
}

/// A completion's `prompt`: text (encoded with the tokenizer's special tokens), token ids as they
/// are, or a batch of either; each prompt gets its own `n` choices.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    /// One text prompt.
    Text(String),
    /// One prompt as token ids.
    Tokens(Vec<u32>),
    /// Several text prompts.
    Texts(Vec<String>),
    /// Several prompts as token ids (what evaluation harnesses send).
    TokenLists(Vec<Vec<u32>>),
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// The prompt or prompts.
    pub prompt: PromptInput,
    /// Sampling, length, stop and steering settings.
    #[serde(flatten)]
    pub settings: Settings,
}

/// Token counts of a response.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated and kept (up to a stop string, not past it).
    pub completion_tokens: usize,
    /// Both.
    pub total_tokens: usize,
}

impl Usage {
    /// Counts with their total.
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// Which endpoint a response is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/completions`.
    Completion,
}

impl Endpoint {
    /// The label of this endpoint in metrics.
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat",
            Endpoint::Completion => "completions",
        }
    }

    /// The `object` of a response, or of one streamed chunk.
    pub fn object(self, chunk: bool) -> Object {
        match (self, chunk) {
            (Endpoint::Chat, false) => Object::ChatCompletion,
            (Endpoint::Chat, true) => Object::ChatCompletionChunk,
            (Endpoint::Completion, _) => Object::TextCompletion,
        }
    }

    /// Choice `index` carrying `text`: the whole message (or a delta, in a chunk) for chat, the
    /// text for completions, with its log-probabilities when asked.
    pub fn choice(
        self,
        index: usize,
        text: String,
        chunk: bool,
        finish_reason: Option<FinishReason>,
        logprobs: Option<ChoiceLogprobs>,
    ) -> Choice {
        let content = match (self, chunk) {
            (Endpoint::Chat, false) => ChoiceContent::Message {
                message: AssistantMessage {
                    role: "assistant",
                    content: text,
                },
            },
            (Endpoint::Chat, true) => ChoiceContent::Delta {
                delta: Delta { content: text },
            },
            (Endpoint::Completion, _) => ChoiceContent::Text { text },
        };
        Choice {
            index,
            content,
            logprobs,
            finish_reason,
        }
    }
}

/// One token with its log-probability, as the chat API reports it.
#[derive(Debug, Clone, Serialize)]
pub struct ChatTokenLogprob {
    /// The token's text.
    pub token: String,
    /// Its log-probability (natural log).
    pub logprob: f32,
    /// The token text's UTF-8 bytes.
    pub bytes: Vec<u8>,
}

/// A generated token in a chat choice's `logprobs.content`, with the most likely alternatives.
#[derive(Debug, Clone, Serialize)]
pub struct ChatLogprob {
    /// The token itself.
    #[serde(flatten)]
    pub token: ChatTokenLogprob,
    /// The `top_logprobs` most likely tokens at its position.
    pub top_logprobs: Vec<ChatTokenLogprob>,
}

/// A choice's `logprobs`, in the shape of its endpoint.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum ChoiceLogprobs {
    /// Chat: `{"content": [...]}`.
    Chat {
        /// One entry per generated token.
        content: Vec<ChatLogprob>,
    },
    /// Completions (the legacy shape): parallel lists, `null` for the echoed prompt's first token.
    Completion {
        /// Each token's text.
        tokens: Vec<String>,
        /// Each token's log-probability.
        token_logprobs: Vec<Option<f32>>,
        /// The alternatives at each token, text to log-probability.
        top_logprobs: Vec<Option<std::collections::BTreeMap<String, f32>>>,
        /// Where each token starts in the choice's text, in bytes.
        text_offset: Vec<usize>,
    },
}

/// The `object` field of a response.
#[derive(Debug, Clone, Copy, Serialize)]
pub enum Object {
    /// A whole chat completion.
    #[serde(rename = "chat.completion")]
    ChatCompletion,
    /// One streamed chat chunk.
    #[serde(rename = "chat.completion.chunk")]
    ChatCompletionChunk,
    /// A text completion, whole or streamed.
    #[serde(rename = "text_completion")]
    TextCompletion,
}

/// The assistant's reply in a chat choice.
#[derive(Debug, Clone, Serialize)]
pub struct AssistantMessage {
    /// Always `assistant`.
    pub role: &'static str,
    /// The reply text.
    pub content: String,
}

/// New text in a streamed chat chunk.
#[derive(Debug, Clone, Serialize)]
pub struct Delta {
    /// The text since the last chunk.
    pub content: String,
}

/// What a choice carries: a chat message, a chat delta, or completion text.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum ChoiceContent {
    /// A whole chat reply.
    Message {
        /// The reply.
        message: AssistantMessage,
    },
    /// Part of a streamed chat reply.
    Delta {
        /// The new text.
        delta: Delta,
    },
    /// Completion text (whole, or part of a stream).
    Text {
        /// The text.
        text: String,
    },
}

/// One choice of a response (`n` of them).
#[derive(Debug, Clone, Serialize)]
pub struct Choice {
    /// Its position among the choices.
    pub index: usize,
    /// The text it carries.
    #[serde(flatten)]
    pub content: ChoiceContent,
    /// Its tokens' log-probabilities, when the request asked for them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<ChoiceLogprobs>,
    /// Why generation ended (`null` in chunks before the last).
    pub finish_reason: Option<FinishReason>,
}

/// A chat or text completion response, or one streamed chunk of one.
#[derive(Debug, Clone, Serialize)]
pub struct Completion<'a> {
    /// The response id, shared by all chunks of a stream.
    pub id: &'a str,
    /// Which kind of response.
    pub object: Object,
    /// Unix seconds.
    pub created: u64,
    /// The bundle's name.
    pub model: &'a str,
    /// The choices.
    pub choices: Vec<Choice>,
    /// Token counts (on whole responses and the last chunk).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// onnx-steer: the sampler seed used (given, or drawn for the request), when sampling.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// onnx-steer: what the request's learned steering decided (L2S, W2S, AutoSteer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steering: Option<&'a [Decision]>,
}

/// An error body: `{"error": {"message", "type", "code"}}`.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong, as OpenAI reports it.
#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    /// For people.
    pub message: String,
    /// `invalid_request_error`, `not_found_error`, `rate_limit_error` or `server_error`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The HTTP status.
    pub code: u16,
}
