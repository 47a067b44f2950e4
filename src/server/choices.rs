//! What a choice reports about its tokens: the endpoint's `logprobs` shape, built from the
//! engine's [`PositionLogprobs`], for whole responses and for streamed chunks alike.

use std::collections::BTreeMap;

use super::openai::{ChatLogprob, ChatTokenLogprob, ChoiceLogprobs, Endpoint};
use crate::generate::{PositionLogprobs, TokenLogprob};
use crate::text::TextCodec;

/// The echoed prompt of a completion, for its `logprobs`: its first token (which has no
/// log-probability) and the scored rest.
pub(crate) struct EchoedPrompt<'a> {
    /// The prompt's first token id.
    pub(crate) first: u32,
    /// Prompt tokens 1.. with their log-probabilities.
    pub(crate) rest: &'a [PositionLogprobs],
}

/// `positions` (and, for completions, the echoed prompt before them) in `endpoint`'s shape;
/// `offset` is where the first listed token starts in the choice's text, in bytes.
pub(crate) fn choice_logprobs(
    endpoint: Endpoint,
    codec: &TextCodec,
    echoed: Option<EchoedPrompt<'_>>,
    positions: &[PositionLogprobs],
    offset: usize,
) -> ChoiceLogprobs {
    match endpoint {
        Endpoint::Chat => ChoiceLogprobs::Chat {
            content: positions
                .iter()
                .map(|p| ChatLogprob {
                    token: chat_token(codec, p.token),
                    top_logprobs: p.top.iter().map(|t| chat_token(codec, *t)).collect(),
                })
                .collect(),
        },
        Endpoint::Completion => {
            let mut tokens = Vec::new();
            let mut token_logprobs = Vec::new();
            let mut top_logprobs = Vec::new();
            if let Some(echoed) = &echoed {
                tokens.push(codec.token_text(echoed.first));
                token_logprobs.push(None);
                top_logprobs.push(None);
            }
            let scored = echoed.iter().flat_map(|e| e.rest.iter()).chain(positions);
            for position in scored {
                tokens.push(codec.token_text(position.token.id));
                token_logprobs.push(Some(position.token.logprob));
                let top: BTreeMap<String, f32> = position
                    .top
                    .iter()
                    .map(|t| (codec.token_text(t.id), t.logprob))
                    .collect();
                top_logprobs.push(Some(top));
            }
            let text_offset = tokens
                .iter()
                .scan(offset, |at, token| {
                    let start = *at;
                    *at += token.len();
                    Some(start)
                })
                .collect();
            ChoiceLogprobs::Completion {
                tokens,
                token_logprobs,
                top_logprobs,
                text_offset,
            }
        }
    }
}

fn chat_token(codec: &TextCodec, token: TokenLogprob) -> ChatTokenLogprob {
    let text = codec.token_text(token.id);
    ChatTokenLogprob {
        bytes: text.as_bytes().to_vec(),
        token: text,
        logprob: token.logprob,
    }
}
