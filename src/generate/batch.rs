//! A running batch (continuous batching): its rows decode together, one forward step per token;
//! a group of new rows joins after its own prefill, and finished or cancelled rows leave, without
//! stalling the others. [`crate::generate::generate`] is one group that joins once; the server
//! admits requests between steps.
//!
//! Each row keeps its own positions, sampling, stop rules and steering, so it produces exactly
//! what it produces alone. Each row owns a slot of the KV cache ([`KvCache`]) and its own length:
//! a joining group is prefilled straight into free slots (left-padded within the group, the
//! padding masked out), and a row that leaves frees its slot; the other rows' caches are never
//! re-padded or copied. Joining and leaving are all or nothing: a failure leaves the running rows
//! as they were.

use std::sync::Arc;
use std::time::Instant;

use ndarray::{Array2, Axis};
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::logprobs::{LogSoftmax, PositionLogprobs};
use super::prefix_cache::{block_keys, prompt_fingerprint, BlockKey, PrefixCache, BLOCK};
use super::score::prefill_logits;
use super::{validate_prompts, FinishReason, GenerateError, Generated, Penalties, Sampling};
use crate::chain::{CausalLm, KvCache, LayerHook, Prompt, Step};
use crate::steer::{BatchSteering, Decision, DecodeSteering, ResolvedSteering};
use crate::text::{StreamDecoder, TextCodec};

/// One row to generate.
#[derive(Debug, Clone)]
pub struct RowRequest {
    /// The tokenized prompt, with its images.
    pub prompt: Prompt,
    /// How each next token is chosen.
    pub sampling: Sampling,
    /// Most tokens to generate.
    pub max_new_tokens: usize,
    /// Token ids that end the row (not included in the output).
    pub stop_ids: Vec<u32>,
    /// Strings that end the row once the generated text contains one (needs
    /// [`RunningBatch::with_text`]); the token that completes one is kept.
    pub stop_strings: Vec<String>,
    /// The row's steering, if any.
    pub steering: Option<Arc<ResolvedSteering>>,
    /// Presence and frequency penalties applied before each pick.
    pub penalties: Penalties,
    /// Report each kept token's log-probability with this many alternatives (`None`: no
    /// log-probabilities).
    pub logprobs: Option<usize>,
    /// Also report the prompt tokens' log-probabilities (after the first), with `logprobs`
    /// alternatives: OpenAI's `echo` with `logprobs`.
    pub prompt_logprobs: bool,
}

/// Identifies a row for its whole life in a [`RunningBatch`].
pub type RowId = u64;

/// What a row that left the batch produced, or why it failed.
pub type RowResult = Result<Generated, GenerateError>;

/// The generated text of a row with stop strings, decoded as it grows.
struct StopText {
    decoder: StreamDecoder,
    text: String,
}

struct ActiveRow {
    id: RowId,
    request: RowRequest,
    next_position: i64,
    /// The most positions the row may reach: the model's context, or less when its KV slot
    /// (less the row's padding in it) is shorter.
    limit: usize,
    /// The token chosen last, fed at the next step.
    pending: u32,
    tokens: Vec<u32>,
    logprobs: Vec<PositionLogprobs>,
    prompt_logprobs: Vec<PositionLogprobs>,
    finish: Option<FinishReason>,
    failure: Option<GenerateError>,
    rng: Option<StdRng>,
    stop_text: Option<StopText>,
    prefill_ms: f64,
    decode_ms: f64,
    decisions: Vec<Decision>,
}

impl ActiveRow {
    fn done(&self) -> bool {
        self.finish.is_some() || self.failure.is_some()
    }

    /// Choose this row's next token from its logits; `on_token` sees every kept token, with its
    /// log-probabilities when the request asked for them.
    fn pick(
        &mut self,
        logits: &[f32],
        codec: Option<&TextCodec>,
        on_token: &mut dyn FnMut(RowId, u32, Option<&PositionLogprobs>),
    ) {
        if self.done() {
            return;
        }
        if logits.is_empty() || logits.iter().any(|x| !x.is_finite()) {
            self.failure = Some(GenerateError::NonFiniteLogits {
                row: self.id,
                token: self.tokens.len(),
            });
            return;
        }
        let penalties = self.request.penalties;
        let id = match penalties.is_zero() {
            true => self.request.sampling.pick(logits, self.rng.as_mut()),
            false => {
                let penalised = penalties.apply(logits, &self.tokens);
                self.request.sampling.pick(&penalised, self.rng.as_mut())
            }
        };
        let scored = self
            .request
            .logprobs
            .and_then(|top| LogSoftmax::new(logits).and_then(|softmax| softmax.position(id, top)));
        if self.request.stop_ids.contains(&id) {
            // The end-of-sequence token is not kept, but its log-probability is reported last (as
            // vLLM does): harnesses that ask for one token after an echoed prompt count on it.
            self.logprobs.extend(scored);
            self.finish = Some(FinishReason::Stop);
            return;
        }
        on_token(self.id, id, scored.as_ref());
        self.logprobs.extend(scored);
        self.tokens.push(id);
        self.pending = id;
        if let (Some(stop), Some(codec)) = (self.stop_text.as_mut(), codec) {
            match stop.decoder.push(codec, id) {
                Ok(delta) => stop.text.push_str(&delta),
                Err(e) => self.failure = Some(GenerateError::Sampling(e.to_string())),
            }
            let strings = &self.request.stop_strings;
            if strings.iter().any(|s| stop.text.contains(s.as_str())) {
                self.finish = Some(FinishReason::Stop);
                return;
            }
        }
        let full = self.next_position as usize + 1 > self.limit;
        if self.tokens.len() >= self.request.max_new_tokens || full {
            self.finish = Some(FinishReason::Length);
        }
    }

    fn into_result(self) -> RowResult {
        if let Some(failure) = self.failure {
            return Err(failure);
        }
        Ok(Generated {
            prompt_tokens: self.request.prompt.ids.len(),
            token_ids: self.tokens,
            logprobs: self.logprobs,
            prompt_logprobs: self.prompt_logprobs,
            finish_reason: self.finish.unwrap_or(FinishReason::Length),
            prefill_ms: self.prefill_ms,
            decode_ms: self.decode_ms,
            steering: self.decisions,
        })
    }
}

/// The KV cache a running batch allocates once, at its first join: slots for `rows` rows of
/// `positions` positions each (the server's `--max-batch` and `--max-context`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvSlots {
    /// Rows that can run at once.
    pub rows: usize,
    /// Positions each row can hold: prompt (and its padding in a group) plus generated tokens.
    pub positions: usize,
}

/// How much of a running batch's KV cache is in use, for `/health` and `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvUsage {
    /// Slots in all.
    pub slots: usize,
    /// Slots running rows hold.
    pub used_slots: usize,
    /// Positions each slot holds.
    pub positions_per_slot: usize,
    /// Positions the running rows have filled.
    pub filled_positions: usize,
    /// Bytes of the key and value buffers.
    pub bytes: usize,
    /// The prompt prefix cache's lookups, hits and memory (zero without one).
    pub prefix: super::prefix_cache::PrefixStats,
}

/// A group whose KV slots are claimed and whose prefill step is laid out.
struct Group {
    requests: Vec<RowRequest>,
    steering: BatchSteering,
    /// The left-padded prefill step of the group's prompts.
    step: Step,
    /// The keys of the prompt's blocks when its prefix may be shared (one prompt for every row,
    /// steering that does the same to it); empty otherwise.
    blocks: Vec<BlockKey>,
    /// Leading prompt positions whose KV came from the prefix cache.
    reused: usize,
}

impl Group {
    /// Each row's prompt length.
    fn prompt_lengths(&self) -> Vec<usize> {
        self.requests.iter().map(|r| r.prompt.ids.len()).collect()
    }

    /// True if the group's steering reads a layer at prefill (a learned net): it then needs the
    /// whole prompt in one pass.
    fn observes(&self, config: &crate::bundle::ModelConfig) -> bool {
        let prefill = self.steering.prefill(config, &self.prompt_lengths());
        (0..config.num_layers).any(|layer| prefill.observes(layer))
    }

    /// Columns `start..end` of the prefill step, the mask through `end`.
    fn part(&self, start: usize, end: usize) -> Step {
        let step = &self.step;
        Step {
            input_ids: step.input_ids.slice(ndarray::s![.., start..end]).to_owned(),
            position_ids: step
                .position_ids
                .slice(ndarray::s![.., start..end])
                .to_owned(),
            attention_mask: step.attention_mask.slice(ndarray::s![.., ..end]).to_owned(),
            images: match start {
                0 => step.images.clone(),
                _ => Vec::new(),
            },
        }
    }
}

/// What a group's prefill produced.
struct Prefilled {
    /// The last prompt position's logits `[rows, vocab]`.
    logits: Array2<f32>,
    /// Each row's prompt log-probabilities (empty unless asked).
    echoed: Vec<Vec<PositionLogprobs>>,
    steering: DecodeSteering,
    decisions: Vec<Vec<Decision>>,
    prefill_ms: f64,
}

/// A group prefilled chunk by chunk between decode steps.
struct PendingJoin {
    group: Group,
    /// Prompt positions prefilled so far.
    done: usize,
    prefill_ms: f64,
}

/// What [`RunningBatch::begin_join`] did with a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Joining {
    /// It joined at once; its row ids, in order.
    Joined(Vec<RowId>),
    /// Its prefill goes on in chunks ([`RunningBatch::advance_join`]).
    Pending,
}

/// Rows decoding together; see the module docs.
pub struct RunningBatch {
    rows: Vec<ActiveRow>,
    /// Allocated at the first join, kept when every row has left.
    cache: Option<KvCache>,
    /// `[rows, W]`: 1 where a row attends (its own tokens), 0 on padding and past its length; W is
    /// the longest row's cached length.
    mask: Array2<i64>,
    steering: DecodeSteering,
    slots: Option<KvSlots>,
    /// The group being prefilled chunk by chunk, if any.
    pending: Option<PendingJoin>,
    prefix: Option<PrefixCache>,
    pad_id: u32,
    next_id: RowId,
    codec: Option<Arc<TextCodec>>,
}

impl RunningBatch {
    /// An empty batch; `pad_id` fills left padding and the input of finished rows.
    pub fn new(pad_id: u32) -> Self {
        Self {
            rows: Vec::new(),
            cache: None,
            mask: Array2::zeros((0, 0)),
            steering: DecodeSteering::default(),
            slots: None,
            pending: None,
            prefix: None,
            pad_id,
            next_id: 0,
            codec: None,
        }
    }

    /// Let rows end on stop strings: the batch decodes their text with `codec` as it grows.
    #[must_use]
    pub fn with_text(mut self, codec: Arc<TextCodec>) -> Self {
        self.codec = Some(codec);
        self
    }

    /// Allocate the KV cache once, as `slots`, at the first join: rows beyond `slots.rows`, or a
    /// prompt longer than `slots.positions`, cannot join (an error); a row stops with
    /// [`FinishReason::Length`] when its slot is full. Without it, the cache grows to each group.
    #[must_use]
    pub fn with_slots(mut self, slots: KvSlots) -> Self {
        self.slots = Some(slots);
        self
    }

    /// Keep prompt prefixes' KV, up to `budget` bytes, and reuse it for prompts that start the
    /// same under the same prompt steering ([`super::prefix_cache`]).
    #[must_use]
    pub fn with_prefix_cache(mut self, budget: usize) -> Self {
        self.prefix = Some(PrefixCache::new(budget));
        self
    }

    /// Rows in the batch, finished ones included until [`RunningBatch::take_finished`].
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True when no row is in the batch and none is being prefilled.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.pending.is_none()
    }

    /// Use of the KV cache (all zero before the first join).
    pub fn kv_usage(&self) -> KvUsage {
        let prefix = self
            .prefix
            .as_ref()
            .map(PrefixCache::stats)
            .unwrap_or_default();
        self.cache
            .as_ref()
            .map_or(KvUsage::default(), |cache| KvUsage {
                slots: cache.slots(),
                used_slots: cache.rows(),
                positions_per_slot: cache.capacity(),
                filled_positions: cache.filled_positions(),
                bytes: cache.bytes(),
                prefix,
            })
    }

    /// Allocate the KV cache now rather than at the first join (a server reserves its slots at
    /// start, so that `/health` reports them and a budget that cannot be met fails early).
    pub fn allocate(&mut self, model: &dyn CausalLm) -> Result<(), GenerateError> {
        self.cache_for(model).map(|_| ())
    }

    /// The cache, allocated at the first join (`model` gives its shape).
    fn cache_for(&mut self, model: &dyn CausalLm) -> Result<&mut KvCache, GenerateError> {
        if self.cache.is_none() {
            if !self.rows.is_empty() {
                return Err(GenerateError::LostState);
            }
            let (config, dtype) = (model.config(), model.dtype());
            let cache = match self.slots {
                Some(slots) => KvCache::with_slots(config, dtype, slots.rows, slots.positions)?,
                None => KvCache::empty(config, dtype, 0)?,
            };
            self.cache = Some(cache);
        }
        self.cache.as_mut().ok_or(GenerateError::LostState)
    }

    /// True while some row still generates.
    pub fn has_unfinished(&self) -> bool {
        self.rows.iter().any(|row| !row.done())
    }

    /// Prefill `requests` as one group, choose each one's first token, and add them to the batch.
    /// Returns their ids, in order. All or nothing: on error no row joins and the running rows
    /// are as they were.
    pub fn join(
        &mut self,
        model: &mut dyn CausalLm,
        requests: Vec<RowRequest>,
        on_token: &mut dyn FnMut(RowId, u32, Option<&PositionLogprobs>),
    ) -> Result<Vec<RowId>, GenerateError> {
        let group = self.admit(model, requests)?;
        self.prefill_whole(model, group, on_token)
    }

    /// Prefill the admitted `group`'s prompt (past any reused prefix) in one step and join it.
    fn prefill_whole(
        &mut self,
        model: &mut dyn CausalLm,
        group: Group,
        on_token: &mut dyn FnMut(RowId, u32, Option<&PositionLogprobs>),
    ) -> Result<Vec<RowId>, GenerateError> {
        let ids: Vec<&[u32]> = group
            .requests
            .iter()
            .map(|r| r.prompt.ids.as_slice())
            .collect();
        let mut prefill = group
            .steering
            .prefill(model.config(), &group.prompt_lengths());
        let echo: Vec<Option<usize>> = group
            .requests
            .iter()
            .map(|r| r.prompt_logprobs.then_some(r.logprobs.unwrap_or(0)))
            .collect();
        let cache = self.cache.as_mut().ok_or(GenerateError::LostState)?;
        let started = Instant::now();
        let step = group.part(group.reused, group.step.input_ids.ncols());
        let prefilled = prefill_logits(model, &step, cache, &mut prefill, &ids, &echo);
        let prefill_ms = started.elapsed().as_secs_f64() * 1e3;
        let (logits, echoed) = match prefilled {
            Ok(prefilled) => prefilled,
            Err(e) => {
                cache.abandon();
                return Err(e.into());
            }
        };
        let prefilled = Prefilled {
            logits,
            echoed,
            steering: prefill.decode(),
            decisions: prefill.decisions().to_vec(),
            prefill_ms,
        };
        self.complete(model, group, prefilled, on_token)
    }

    /// Start prefilling `requests` in chunks, one chunk per [`RunningBatch::advance_join`], so
    /// that the running rows keep decoding between chunks. A group that cannot be split (learned
    /// steering reads its whole prompt at once, prompt log-probabilities, images) or whose
    /// prompts fit in `chunk` tokens (0: always) joins at once, as with [`RunningBatch::join`].
    /// One group is prefilled at a time.
    pub fn begin_join(
        &mut self,
        model: &mut dyn CausalLm,
        requests: Vec<RowRequest>,
        chunk: usize,
        on_token: &mut dyn FnMut(RowId, u32, Option<&PositionLogprobs>),
    ) -> Result<Joining, GenerateError> {
        if self.pending.is_some() {
            return Err(GenerateError::JoinPending);
        }
        let whole = chunk == 0
            || requests
                .iter()
                .any(|r| r.prompt_logprobs || !r.prompt.images.is_empty());
        let group = self.admit(model, requests)?;
        if whole || group.step.input_ids.ncols() <= chunk || group.observes(model.config()) {
            return self
                .prefill_whole(model, group, on_token)
                .map(Joining::Joined);
        }
        self.pending = Some(PendingJoin {
            done: group.reused,
            group,
            prefill_ms: 0.0,
        });
        Ok(Joining::Pending)
    }

    /// True while a group is being prefilled chunk by chunk.
    pub fn joining(&self) -> bool {
        self.pending.is_some()
    }

    /// Prompt positions the group being prefilled chunk by chunk has still to go (0: none).
    pub fn join_remaining(&self) -> usize {
        self.pending.as_ref().map_or(0, |pending| {
            pending.group.step.input_ids.ncols() - pending.done
        })
    }

    /// Prefill the next `chunk` prompt tokens (at least one) of the group begun with
    /// [`RunningBatch::begin_join`]; after its last chunk the group joins (each row's first token
    /// goes to `on_token`) and its ids are returned. On error the group is dropped and its slots
    /// freed; the running rows go on.
    pub fn advance_join(
        &mut self,
        model: &mut dyn CausalLm,
        chunk: usize,
        on_token: &mut dyn FnMut(RowId, u32, Option<&PositionLogprobs>),
    ) -> Result<Option<Vec<RowId>>, GenerateError> {
        let Some(mut pending) = self.pending.take() else {
            return Ok(None);
        };
        let cache = self.cache.as_mut().ok_or(GenerateError::LostState)?;
        let width = pending.group.step.input_ids.ncols();
        let (start, end) = (pending.done, (pending.done + chunk.max(1)).min(width));
        let part = pending.group.part(start, end);
        let lengths = pending.group.prompt_lengths();
        let mut prefill = pending.group.steering.prefill(model.config(), &lengths);
        cache.focus_admitted();
        let started = Instant::now();
        // Only the last chunk's last position needs logits.
        let ran = match end < width {
            true => model.extend(&part, cache, &mut prefill).map(|()| None),
            false => model.forward(&part, cache, &mut prefill).map(Some),
        };
        pending.prefill_ms += started.elapsed().as_secs_f64() * 1e3;
        cache.focus_running();
        let logits = match ran {
            Ok(Some(logits)) => logits,
            Ok(None) => {
                pending.done = end;
                self.pending = Some(pending);
                return Ok(None);
            }
            Err(e) => {
                cache.abandon();
                return Err(e.into());
            }
        };
        let prefilled = Prefilled {
            logits,
            echoed: vec![Vec::new(); lengths.len()],
            steering: prefill.decode(),
            decisions: prefill.decisions().to_vec(),
            prefill_ms: pending.prefill_ms,
        };
        self.complete(model, pending.group, prefilled, on_token)
            .map(Some)
    }

    /// Drop the group being prefilled chunk by chunk (its requests went away) and free its slots.
    pub fn abandon_join(&mut self) {
        if self.pending.take().is_some() {
            if let Some(cache) = self.cache.as_mut() {
                cache.abandon();
            }
        }
    }

    /// Check `requests`, claim KV slots for them and lay out their prefill step.
    fn admit(
        &mut self,
        model: &dyn CausalLm,
        requests: Vec<RowRequest>,
    ) -> Result<Group, GenerateError> {
        let context = model.config().max_position_embeddings;
        let prompts: Vec<Prompt> = requests.iter().map(|r| r.prompt.clone()).collect();
        validate_prompts(&prompts, context)?;
        for request in &requests {
            request.sampling.validate()?;
            request.penalties.validate()?;
            if !request.stop_strings.is_empty() && self.codec.is_none() {
                return Err(GenerateError::StopStringsWithoutText);
            }
        }
        let steering = BatchSteering::new(requests.iter().map(|r| r.steering.clone()).collect());
        let step = Step::for_prompts(&prompts, self.pad_id);
        let width = step.input_ids.ncols();
        // A fixed cache needs room for the prompt and one token (rows stop when their slot is
        // full); a growable one is sized for the longest the group can grow, so that no decode
        // step reallocates it.
        let longest = requests.iter().map(|r| r.max_new_tokens).max().unwrap_or(0);
        let room = match self.slots {
            Some(_) => width + 1,
            None => width + longest,
        };
        let rows = requests.len();
        let blocks = self.prefix_blocks(&requests);
        let cache = self.cache_for(model)?;
        cache.admit(rows, room)?;
        let matched = match self.prefix.as_mut() {
            Some(prefix) if !blocks.is_empty() => prefix.matched(&blocks, width),
            _ => 0,
        };
        if let (Some(prefix), Some(cache)) = (&self.prefix, self.cache.as_mut()) {
            let written = (0..rows).try_for_each(|row| {
                for (index, key) in blocks.iter().take(matched).enumerate() {
                    let kv = prefix.block(key).unwrap_or_default();
                    cache.write_positions(row, index * BLOCK, BLOCK, kv)?;
                }
                Ok::<_, crate::chain::ModelError>(())
            });
            if let Err(e) = written {
                cache.abandon();
                return Err(e.into());
            }
            cache.advance(matched * BLOCK);
        }
        Ok(Group {
            requests,
            steering,
            step,
            blocks,
            reused: matched * BLOCK,
        })
    }

    /// The keys of the prompt blocks of `requests` if their prefix may be shared: a prefix cache,
    /// one prompt for every row (no padding), no images or prompt log-probabilities, and steering
    /// that does the same to every row's prompt.
    fn prefix_blocks(&self, requests: &[RowRequest]) -> Vec<BlockKey> {
        let Some(first) = requests.first().filter(|_| self.prefix.is_some()) else {
            return Vec::new();
        };
        let plain = requests.iter().all(|r| {
            r.prompt.ids == first.prompt.ids && r.prompt.images.is_empty() && !r.prompt_logprobs
        });
        let fingerprints: Option<Vec<[u8; 32]>> = requests
            .iter()
            .map(|r| prompt_fingerprint(&r.steering))
            .collect();
        match fingerprints {
            Some(f) if plain && f.iter().all(|x| *x == f[0]) => {
                block_keys(&f[0], &first.prompt.ids)
            }
            _ => Vec::new(),
        }
    }

    /// The admitted `group`, prefilled, joins: its steering and mask go below the running rows',
    /// its slots become running, and each row picks its first token. All or nothing.
    fn complete(
        &mut self,
        model: &dyn CausalLm,
        group: Group,
        prefilled: Prefilled,
        on_token: &mut dyn FnMut(RowId, u32, Option<&PositionLogprobs>),
    ) -> Result<Vec<RowId>, GenerateError> {
        let context = model.config().max_position_embeddings;
        let Group {
            requests,
            step,
            blocks,
            reused,
            ..
        } = group;
        let group_rows = requests.len();
        let running_rows = self.rows.len();
        let cache = self.cache.as_mut().ok_or(GenerateError::LostState)?;
        if let Some(prefix) = self.prefix.as_mut() {
            // The prompt's new whole blocks are kept for later prompts that start the same.
            cache.focus_admitted();
            for (index, key) in blocks.iter().enumerate().skip(reused / BLOCK) {
                if !prefix.contains(key) {
                    match cache.read_positions(0, index * BLOCK, BLOCK) {
                        Ok(kv) => prefix.insert(*key, kv),
                        Err(e) => tracing::warn!("keeping a prompt block: {e}"),
                    }
                }
            }
        }
        let mut steering = prefilled.steering;
        if running_rows > 0 {
            let mut merged = self.steering.clone();
            if let Err(e) = merged.append_rows(running_rows, steering, group_rows) {
                cache.abandon();
                return Err(e.into());
            }
            steering = merged;
        }
        cache.commit();
        let capacity = cache.capacity();
        self.steering = steering;
        self.mask = stack_masks(&self.mask, &step.attention_mask);
        let width = step.input_ids.ncols();
        let fixed = self.slots.is_some();
        let prefill_ms = prefilled.prefill_ms;

        let first_id = self.next_id;
        self.next_id += group_rows as RowId;
        let codec = self.codec.clone();
        let mut joined: Vec<ActiveRow> = requests
            .into_iter()
            .zip(prefilled.decisions.into_iter().zip(prefilled.echoed))
            .enumerate()
            .map(|(r, (request, (decisions, prompt_logprobs)))| ActiveRow {
                id: first_id + r as RowId,
                next_position: request.prompt.ids.len() as i64,
                limit: match fixed {
                    true => context.min(capacity - (width - request.prompt.ids.len())),
                    false => context,
                },
                pending: self.pad_id,
                tokens: Vec::new(),
                logprobs: Vec::new(),
                prompt_logprobs,
                finish: (request.max_new_tokens == 0).then_some(FinishReason::Length),
                failure: None,
                rng: match request.sampling {
                    Sampling::Greedy => None,
                    Sampling::Random { seed, .. } => Some(StdRng::seed_from_u64(seed)),
                },
                stop_text: (!request.stop_strings.is_empty()).then(|| StopText {
                    decoder: StreamDecoder::default(),
                    text: String::new(),
                }),
                prefill_ms,
                decode_ms: 0.0,
                decisions,
                request,
            })
            .collect();
        for (row, scores) in joined.iter_mut().zip(prefilled.logits.rows()) {
            let scores = scores.as_slice().unwrap_or(&[]);
            row.pick(scores, codec.as_deref(), on_token);
        }
        let ids = joined.iter().map(|row| row.id).collect();
        self.rows.extend(joined);
        Ok(ids)
    }

    /// One decode step: every row feeds its pending token (finished rows feed padding until they
    /// are taken out) and unfinished rows choose their next token.
    pub fn step(
        &mut self,
        model: &mut dyn CausalLm,
        on_token: &mut dyn FnMut(RowId, u32, Option<&PositionLogprobs>),
    ) -> Result<(), GenerateError> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let cache = self.cache.as_mut().ok_or(GenerateError::LostState)?;
        cache.focus_running();
        let batch = self.rows.len();
        let pad = self.pad_id as i64;
        let feed = |row: &ActiveRow| if row.done() { pad } else { row.pending as i64 };
        let input_ids = Array2::from_shape_fn((batch, 1), |(r, _)| feed(&self.rows[r]));
        let position_ids = Array2::from_shape_fn((batch, 1), |(r, _)| self.rows[r].next_position);
        // Each row's new token goes at its own length.
        let lengths = cache.lengths();
        let mask = Array2::from_shape_fn((batch, cache.longest() + 1), |(r, c)| {
            match c.cmp(&lengths[r]) {
                std::cmp::Ordering::Less => self.mask[[r, c]],
                std::cmp::Ordering::Equal => 1,
                std::cmp::Ordering::Greater => 0,
            }
        });
        let step = Step {
            input_ids,
            position_ids,
            attention_mask: mask,
            images: Vec::new(),
        };
        let started = Instant::now();
        let logits = model.forward(&step, cache, &mut self.steering)?;
        self.mask = step.attention_mask;
        let elapsed = started.elapsed().as_secs_f64() * 1e3;
        let codec = self.codec.as_deref();
        for (row, scores) in self.rows.iter_mut().zip(logits.rows()) {
            if !row.done() {
                row.decode_ms += elapsed;
            }
            row.next_position += 1;
            row.pick(scores.as_slice().unwrap_or(&[]), codec, on_token);
        }
        Ok(())
    }

    /// Take finished (or failed) rows out of the batch (their KV cache is freed) and return
    /// what each produced.
    pub fn take_finished(&mut self) -> Result<Vec<(RowId, RowResult)>, GenerateError> {
        self.remove(ActiveRow::done)
    }

    /// Take a row out whether or not it finished (a client went away); returns what it made.
    pub fn cancel(&mut self, id: RowId) -> Result<Option<RowResult>, GenerateError> {
        Ok(self
            .remove(|row| row.id == id)?
            .into_iter()
            .next()
            .map(|(_, result)| result))
    }

    fn remove(
        &mut self,
        leaves: impl Fn(&ActiveRow) -> bool,
    ) -> Result<Vec<(RowId, RowResult)>, GenerateError> {
        let leaving: Vec<usize> = (0..self.rows.len())
            .filter(|&r| leaves(&self.rows[r]))
            .collect();
        if leaving.is_empty() {
            return Ok(Vec::new());
        }
        // The cache goes first: it is the one step that can fail, and it fails unchanged.
        let (order, longest) = match self.cache.as_mut() {
            Some(cache) => (cache.release(&leaving)?, cache.longest()),
            None => return Err(GenerateError::LostState),
        };
        let mask = self.mask.select(Axis(0), &order);
        self.mask = mask.slice(ndarray::s![.., ..longest]).to_owned();
        self.steering.retain_rows(&order);
        let mut rows: Vec<Option<ActiveRow>> = std::mem::take(&mut self.rows)
            .into_iter()
            .map(Some)
            .collect();
        self.rows = order.iter().filter_map(|&r| rows[r].take()).collect();
        Ok(leaving
            .iter()
            .filter_map(|&r| rows[r].take())
            .map(|row| (row.id, row.into_result()))
            .collect())
    }
}

/// `running` `[R, W]` over `group` `[G, w]`, both padded on the right with zeros to the wider.
fn stack_masks(running: &Array2<i64>, group: &Array2<i64>) -> Array2<i64> {
    let width = running.ncols().max(group.ncols());
    let rows = running.nrows();
    let mut stacked = Array2::zeros((rows + group.nrows(), width));
    stacked
        .slice_mut(ndarray::s![..rows, ..running.ncols()])
        .assign(running);
    stacked
        .slice_mut(ndarray::s![rows.., ..group.ncols()])
        .assign(group);
    stacked
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(sampling: Sampling) -> ActiveRow {
        ActiveRow {
            id: 4,
            request: RowRequest {
                prompt: vec![1, 2].into(),
                sampling,
                max_new_tokens: 8,
                stop_ids: vec![0],
                stop_strings: Vec::new(),
                steering: None,
                penalties: Penalties::default(),
                logprobs: Some(2),
                prompt_logprobs: false,
            },
            next_position: 2,
            limit: 64,
            pending: 0,
            tokens: Vec::new(),
            logprobs: Vec::new(),
            prompt_logprobs: Vec::new(),
            finish: None,
            failure: None,
            rng: Some(StdRng::seed_from_u64(0)),
            stop_text: None,
            prefill_ms: 0.0,
            decode_ms: 0.0,
            decisions: Vec::new(),
        }
    }

    #[test]
    fn non_finite_logits_fail_the_row_instead_of_picking_a_token() {
        let sampling = Sampling::with_temperature(0.7, 1.0, 0, 3);
        for logits in [[1.0, f32::NAN, 0.5], [f32::INFINITY, 0.0, 0.0]] {
            let mut seen = Vec::new();
            let mut row = row(sampling);
            row.pick(&logits, None, &mut |_, id, _| seen.push(id));
            assert!(row.done() && seen.is_empty() && row.tokens.is_empty());
            let err = row.into_result().unwrap_err();
            assert!(
                matches!(err, GenerateError::NonFiniteLogits { row: 4, token: 0 }),
                "{err}"
            );
        }
        let mut fine = row(Sampling::Greedy);
        fine.pick(&[0.0, 3.0, 1.0], None, &mut |_, _, _| {});
        assert_eq!(fine.tokens, vec![1]);
        let scored = &fine.logprobs[0];
        assert_eq!((scored.token.id, scored.top.len()), (1, 2));
        assert!((scored.token.logprob - scored.top[0].logprob).abs() < 1e-7);
        // Stopping on the end-of-sequence token (id 0) keeps no token, but reports its
        // log-probability last, and does not stream it.
        let mut seen = Vec::new();
        fine.pick(&[4.0, 3.0, 1.0], None, &mut |_, id, _| seen.push(id));
        assert!(seen.is_empty() && fine.tokens == vec![1]);
        assert_eq!(fine.finish, Some(FinishReason::Stop));
        assert_eq!(fine.logprobs.len(), 2);
        assert_eq!(fine.logprobs[1].token.id, 0);
    }

    #[test]
    fn rows_without_a_cache_are_an_error_not_a_panic() {
        let mut batch = RunningBatch::new(0);
        let mut finished = row(Sampling::Greedy);
        finished.finish = Some(FinishReason::Stop);
        batch.rows.push(finished);
        assert!(matches!(
            batch.take_finished(),
            Err(GenerateError::LostState)
        ));
    }

    #[test]
    fn masks_stack_padded_on_the_right() {
        let running = ndarray::array![[1, 1, 1], [0, 1, 1]];
        let group = ndarray::array![[1, 1, 1, 1, 1]];
        let stacked = stack_masks(&running, &group);
        assert_eq!(
            stacked,
            ndarray::array![[1, 1, 1, 0, 0], [0, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
        );
    }
}
