//! OpenAI request and response shapes (chat and text completions), plus the `steering` field.
//!
//! Unknown request fields are ignored, as OpenAI-compatible servers do, so that clients that send
//! `n`, `user` or `logprobs` still work; fields that are present must have the right type.

use serde::{Deserialize, Serialize};

/// `stop`: one string or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
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
    Named(String),
    Inline(serde_json::Value),
}

/// Sampling and length settings shared by both endpoints.
#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    #[serde(default)]
    pub max_tokens: Option<i64>,
    /// The newer name of `max_tokens` in the chat API.
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub steering: Option<Steering>,
}

/// One chat turn.
#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Content,
}

/// A turn's content: a string, or OpenAI content parts (text and `image_url`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One content part.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

/// An image given inline as a `data:image/...;base64,` URL (the server fetches nothing).
#[derive(Debug, Clone, Deserialize)]
pub struct ImageUrl {
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
    pub messages: Vec<Message>,
    #[serde(flatten)]
    pub settings: Settings,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: String,
    #[serde(flatten)]
    pub settings: Settings,
}

/// Token counts of a response.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// An error body: `{"error": {"message", "type", "code"}}`.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub code: u16,
}
