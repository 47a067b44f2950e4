//! Text in and out: the bundle's HF tokenizer and its Jinja chat template.

use minijinja::{context, Environment};
use tokenizers::Tokenizer;

use crate::bundle::Bundle;

/// Why text could not be turned into tokens or back.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// The tokenizer or the chat template file could not be read or parsed.
    #[error("could not load tokenizer {path}: {message}")]
    Load {
        /// The file.
        path: String,
        /// Why it failed.
        message: String,
    },
    /// The tokenizer failed to encode or decode.
    #[error("tokenizer failed: {0}")]
    Tokenizer(String),
    /// A chat prompt was asked for, but the bundle has no chat template.
    #[error("--chat needs a chat template, but this bundle has none")]
    NoChatTemplate,
    /// The chat template failed to compile or render.
    #[error("chat template failed to render: {0}")]
    Template(#[from] minijinja::Error),
    /// A turn has images, but the bundle is text-only.
    #[error("this bundle is text-only: images need a vision-language bundle")]
    ImagesWithoutVision,
}

/// One chat turn: its role, its text and how many images come with it.
#[derive(Debug, Clone, Copy)]
pub struct Turn<'a> {
    /// Who speaks: `system`, `user` or `assistant`.
    pub role: &'a str,
    /// What the turn says.
    pub text: &'a str,
    /// Images that come with the turn; each becomes an image part before the text.
    pub images: usize,
}

impl<'a> Turn<'a> {
    /// A turn of text only.
    pub fn text(role: &'a str, text: &'a str) -> Self {
        Self {
            role,
            text,
            images: 0,
        }
    }
}

/// Tokenizer plus chat template, loaded from a bundle.
///
/// [`TextCodec::encode_prompt`] is the one way prompts become token ids, so chat and plain
/// prompts are tokenized exactly as HF `apply_chat_template` / `tokenizer(text)` do.
pub struct TextCodec {
    tokenizer: Tokenizer,
    chat: Option<Environment<'static>>,
    bos_token: String,
    eos_token: String,
    /// Vision-language templates read `content` as a list of `{"type": "image"|"text"}` parts.
    content_parts: bool,
}

const CHAT_TEMPLATE: &str = "chat";

impl TextCodec {
    /// Load `tokenizer.json` and the chat template named in the manifest.
    pub fn load(bundle: &Bundle) -> Result<Self, TextError> {
        let files = &bundle.manifest().tokenizer;
        // Both come through the manifest's sha256 check, like every segment.
        let load_error = |file: &str, message: String| TextError::Load {
            path: bundle.path(file).display().to_string(),
            message,
        };
        let bytes = bundle
            .read_verified(&files.file)
            .map_err(|e| load_error(&files.file, e.to_string()))?;
        let tokenizer =
            Tokenizer::from_bytes(&bytes).map_err(|e| load_error(&files.file, e.to_string()))?;
        let chat = match &files.chat_template {
            Some(file) => {
                let bytes = bundle
                    .read_verified(file)
                    .map_err(|e| load_error(file, e.to_string()))?;
                let source = String::from_utf8(bytes)
                    .map_err(|_| load_error(file, "is not UTF-8 text".into()))?;
                Some(chat_environment(source)?)
            }
            None => None,
        };
        Ok(Self {
            tokenizer,
            chat,
            bos_token: files.bos_token.clone().unwrap_or_default(),
            eos_token: files.eos_token.clone().unwrap_or_default(),
            content_parts: bundle.manifest().vision.is_some(),
        })
    }

    /// Render a conversation, ending with the assistant prompt. In a vision-language bundle each
    /// turn's content is its image parts then its text part, as HF processors' templates expect.
    pub fn render_messages(&self, turns: &[Turn<'_>]) -> Result<String, TextError> {
        let env = self.chat.as_ref().ok_or(TextError::NoChatTemplate)?;
        let template = env.get_template(CHAT_TEMPLATE)?;
        let messages = turns
            .iter()
            .map(|turn| {
                if !self.content_parts {
                    return match turn.images {
                        0 => Ok(context! { role => turn.role, content => turn.text }),
                        _ => Err(TextError::ImagesWithoutVision),
                    };
                }
                let mut parts = vec![context! { type => "image" }; turn.images];
                parts.push(context! { type => "text", text => turn.text });
                Ok(context! { role => turn.role, content => parts })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(template.render(context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })?)
    }

    /// Token ids for a prompt: through the chat template as one user turn with `images` images
    /// (no extra special tokens, as `apply_chat_template` does) or as plain text with the
    /// tokenizer's own special tokens (a raw prompt writes its own image placeholders).
    pub fn encode_prompt(
        &self,
        prompt: &str,
        chat: bool,
        images: usize,
    ) -> Result<Vec<u32>, TextError> {
        if chat {
            let turn = Turn {
                role: "user",
                text: prompt,
                images,
            };
            self.encode(&self.render_messages(&[turn])?, false)
        } else {
            self.encode(prompt, true)
        }
    }

    /// Token ids of `prompt` (as [`TextCodec::encode_prompt`] makes them) and of `continuation`
    /// after it, for scoring. The two are encoded together and split where the prompt's own
    /// tokens end (lm-evaluation-harness's rule), so a continuation gets the tokens it has in
    /// context; if the tokenizer merges across the boundary, the continuation is encoded alone.
    pub fn encode_scored(
        &self,
        prompt: &str,
        chat: bool,
        continuation: &str,
    ) -> Result<(Vec<u32>, Vec<u32>), TextError> {
        let (text, special) = match chat {
            true => (self.render_messages(&[Turn::text("user", prompt)])?, false),
            false => (prompt.to_string(), true),
        };
        let prompt_ids = self.encode(&text, special)?;
        let whole = self.encode(&format!("{text}{continuation}"), special)?;
        let continuation_ids = match whole.strip_prefix(prompt_ids.as_slice()) {
            Some(rest) => rest.to_vec(),
            None => self.encode(continuation, false)?,
        };
        Ok((prompt_ids, continuation_ids))
    }

    /// One token's text as the tokenizer decodes it alone (special tokens included), for
    /// reporting log-probabilities per token.
    pub fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id], false).unwrap_or_default()
    }

    /// Raw tokenizer encode.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TextError> {
        self.tokenizer
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TextError::Tokenizer(e.to_string()))
    }

    /// Decode ids to text, dropping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TextError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| TextError::Tokenizer(e.to_string()))
    }
}

fn chat_environment(source: String) -> Result<Environment<'static>, TextError> {
    let mut env = Environment::new();
    // HF templates call Python string methods (.strip(), .startswith()) and raise_exception().
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                message,
            ))
        },
    );
    env.add_template_owned(CHAT_TEMPLATE, source)?;
    Ok(env)
}

/// Turns a growing list of token ids into text deltas for streaming, never splitting a
/// multi-byte character.
///
/// Incremental, as in HF's `TextStreamer` and vLLM: each push decodes only the ids since the last
/// emitted chunk (plus that chunk, so that tokenizers which drop a leading space on a fresh decode
/// see their context), so a long generation costs O(n) decode work, not O(n²).
#[derive(Debug, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    /// Start of the window that is decoded again on each push.
    prefix: usize,
    /// End of the text already emitted, in ids.
    read: usize,
}

impl StreamDecoder {
    /// Add a token and return the new text it completes (possibly empty).
    pub fn push(&mut self, codec: &TextCodec, id: u32) -> Result<String, TextError> {
        self.ids.push(id);
        let emitted = codec.decode(&self.ids[self.prefix..self.read])?;
        let text = codec.decode(&self.ids[self.prefix..])?;
        // An incomplete UTF-8 sequence decodes to U+FFFD: wait for the bytes that complete it.
        if text.ends_with('\u{FFFD}') || text.len() <= emitted.len() {
            return Ok(String::new());
        }
        let Some(delta) = text.get(emitted.len()..) else {
            return Ok(String::new());
        };
        let delta = delta.to_string();
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(delta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_template_with_python_methods_renders() {
        let env = chat_environment(
            "{% for m in messages %}<{{ m.role }}>{{ m.content.strip() }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
                .to_string(),
        )
        .unwrap();
        let out = env
            .get_template(CHAT_TEMPLATE)
            .unwrap()
            .render(context! {
                messages => vec![context! { role => "user", content => "  hi  " }],
                add_generation_prompt => true,
            })
            .unwrap();
        assert_eq!(out, "<user>hi<assistant>");
    }

    #[test]
    fn raise_exception_surfaces_as_error() {
        let env = chat_environment("{{ raise_exception('roles must alternate') }}".into()).unwrap();
        let err = env
            .get_template(CHAT_TEMPLATE)
            .unwrap()
            .render(context! {})
            .unwrap_err();
        assert!(err.to_string().contains("roles must alternate"));
    }
}
