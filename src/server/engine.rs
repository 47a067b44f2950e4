//! The engine thread: it owns the model and a [`RunningBatch`], admits queued jobs between decode
//! steps (up to `max_batch` rows), and streams each row's tokens back to its request.
//!
//! Requests never touch the model: they send their [`Job`]s through a bounded queue, as one group
//! that joins the batch together, and read [`JobEvent`]s. A request that goes away drops its receiver; the engine then cancels the row and
//! its KV cache is freed at once.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use crate::chain::CausalLm;
use crate::generate::batch::{
    Joining, KvSlots, KvUsage, RowId, RowRequest, RowResult, RunningBatch,
};
use crate::generate::{validate_prompts, GenerateError, Generated, PositionLogprobs};
use crate::text::TextCodec;

/// What the engine tells a request about its row.
#[derive(Debug)]
pub enum JobEvent {
    /// A kept token, as soon as it is chosen, with its log-probabilities if the request asked.
    Token(u32, Option<PositionLogprobs>),
    /// The row finished (or was cut at its length); the full result.
    Done(Generated),
    /// The row could not run; the message says why.
    Failed(String),
    /// The row waited in the queue longer than the queue timeout and left it without running.
    Expired(Duration),
}

/// What a request whose job expired in the queue ([`JobEvent::Expired`]) is told.
pub fn expired_message(waited: Duration) -> String {
    format!(
        "waited {:.1} s in the queue, longer than the server's queue timeout (serve \
         --queue-timeout-s): it is overloaded; retry later",
        waited.as_secs_f64()
    )
}

/// One request's row, and where its events go.
pub struct Job {
    /// What to generate.
    pub request: RowRequest,
    /// Where the row's events go.
    pub events: UnboundedSender<JobEvent>,
}

/// How the engine batches.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    /// Most rows decoding at once: the KV cache's slots.
    pub max_batch: usize,
    /// Positions each row's KV slot holds (prompt plus generated tokens): the server's context.
    pub max_context: usize,
    /// Bytes of prompt-prefix KV kept for reuse by later prompts that start the same (0: none).
    pub prefix_cache_bytes: usize,
    /// Most prompt tokens prefilled per engine step while a prompt joins running rows, which
    /// decode a token between chunks (0: a prompt is prefilled whole when it joins). Each chunk
    /// is sized to take about as long as a decode step, from recent timings.
    pub prefill_chunk: usize,
    /// Most jobs waiting to join; more are refused (HTTP 429).
    pub max_queue: usize,
    /// Left padding and the input of finished rows.
    pub pad_id: u32,
    /// Most prompt tokens one prefill group may hold, counted as rows x the longest prompt (what
    /// left padding makes it): prefill memory grows with it, so long prompts join in smaller
    /// groups, and a prompt longer than the budget joins alone.
    pub prefill_tokens: usize,
    /// Longest a job may wait in the queue; it then leaves with [`JobEvent::Expired`] (HTTP 503
    /// with Retry-After). `None`: it waits until its request's own deadline.
    pub queue_timeout: Option<Duration>,
}

/// A queued job and when it was queued.
struct Waiting {
    job: Job,
    since: Instant,
}

/// Take out of `queue`, in place, the jobs whose request went away (they never run) and those
/// that waited longer than `timeout` (told [`JobEvent::Expired`]); returns how many left.
fn sweep(queue: &mut VecDeque<Waiting>, timeout: Option<Duration>, now: Instant) -> usize {
    let before = queue.len();
    queue.retain(|waiting| {
        if waiting.job.events.is_closed() {
            return false;
        }
        let waited = now.saturating_duration_since(waiting.since);
        if timeout.is_some_and(|limit| waited > limit) {
            let _ = waiting.job.events.send(JobEvent::Expired(waited));
            return false;
        }
        true
    });
    before - queue.len()
}

/// Why a job was not queued.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The queue is full; retry later (HTTP 429).
    #[error("the server is busy ({0} requests waiting); retry later")]
    QueueFull(usize),
    /// The engine thread has stopped (HTTP 503); the server cannot generate any more.
    #[error("the engine has stopped; the server cannot generate (restart it)")]
    EngineStopped,
}

/// Clears the alive flag when the engine thread ends, by return or by panic.
struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
        if std::thread::panicking() {
            tracing::error!("the engine thread panicked");
        }
    }
}

/// Sends jobs to the engine thread; cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: SyncSender<(Instant, Vec<Job>)>,
    waiting: Arc<AtomicUsize>,
    /// How long recently admitted jobs waited in the queue, in milliseconds (a moving average).
    recent_wait_ms: Arc<AtomicU64>,
    running: Arc<AtomicUsize>,
    kv: Arc<Mutex<KvUsage>>,
    alive: Arc<AtomicBool>,
    max_queue: usize,
}

impl EngineHandle {
    /// Queue `jobs` (the choices of one request) to join the batch together, in one prefill
    /// when they fit, so that what they generate does not depend on when the engine woke up.
    /// Refused whole, at once, when the queue cannot take them all or the engine has stopped.
    pub fn submit(&self, jobs: Vec<Job>) -> Result<(), SubmitError> {
        let count = jobs.len();
        // Counted before the send, so the engine's decrement never runs ahead of it.
        let before = self.waiting.fetch_add(count, Ordering::Relaxed);
        let refused = if before + count > self.max_queue.max(1) {
            SubmitError::QueueFull(self.max_queue)
        } else {
            match self.jobs.try_send((Instant::now(), jobs)) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Full(_)) => SubmitError::QueueFull(self.max_queue),
                Err(TrySendError::Disconnected(_)) => SubmitError::EngineStopped,
            }
        };
        self.waiting.fetch_sub(count, Ordering::Relaxed);
        Err(refused)
    }

    /// False once the engine thread has ended (a panic included).
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }

    /// Jobs waiting to join the batch.
    pub fn queue_depth(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Rows in the running batch.
    pub fn batch_size(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    /// Use of the KV cache's slots, as of the last step.
    pub fn kv_usage(&self) -> KvUsage {
        self.kv.lock().map(|usage| *usage).unwrap_or_default()
    }

    /// Seconds a request refused now should wait before it tries again: how long recently
    /// admitted jobs waited in the queue (a full queue drains at about that pace), 1 to 600.
    pub fn retry_after_s(&self) -> u64 {
        self.recent_wait_ms
            .load(Ordering::Relaxed)
            .div_ceil(1000)
            .clamp(1, 600)
    }
}

/// Start the engine thread on `model`; it runs until every handle is dropped and the batch drains.
/// `codec` decodes rows' text so that stop strings end them.
pub fn spawn(
    model: Box<dyn CausalLm + Send>,
    codec: Arc<TextCodec>,
    options: EngineOptions,
) -> std::io::Result<(EngineHandle, std::thread::JoinHandle<()>)> {
    let (jobs, queue) = mpsc::sync_channel(options.max_queue.max(1));
    let waiting = Arc::new(AtomicUsize::new(0));
    let running = Arc::new(AtomicUsize::new(0));
    let alive = Arc::new(AtomicBool::new(true));
    let recent_wait_ms = Arc::new(AtomicU64::new(0));
    let kv = Arc::new(Mutex::new(KvUsage::default()));
    let handle = EngineHandle {
        jobs,
        waiting: waiting.clone(),
        recent_wait_ms: recent_wait_ms.clone(),
        running: running.clone(),
        kv: kv.clone(),
        alive: alive.clone(),
        max_queue: options.max_queue,
    };
    let thread = std::thread::Builder::new()
        .name("onnx-steer-engine".into())
        .spawn(move || {
            let _alive = AliveGuard(alive);
            let mut engine = Engine {
                batch: new_batch(&options, &codec),
                model,
                options,
                queue,
                waiting,
                recent_wait_ms,
                running,
                kv,
                deferred: VecDeque::new(),
                codec,
                listeners: HashMap::new(),
                joining: Vec::new(),
                pace: Pace::default(),
            };
            engine.allocate();
            engine.run()
        })?;
    Ok((handle, thread))
}

struct Engine {
    model: Box<dyn CausalLm + Send>,
    options: EngineOptions,
    queue: Receiver<(Instant, Vec<Job>)>,
    waiting: Arc<AtomicUsize>,
    recent_wait_ms: Arc<AtomicU64>,
    running: Arc<AtomicUsize>,
    kv: Arc<Mutex<KvUsage>>,
    batch: RunningBatch,
    /// Every job taken from the channel that has not joined yet, in arrival order.
    deferred: VecDeque<Waiting>,
    codec: Arc<TextCodec>,
    listeners: HashMap<RowId, UnboundedSender<JobEvent>>,
    /// Where the events of the group being prefilled in chunks go, in row order.
    joining: Vec<UnboundedSender<JobEvent>>,
    pace: Pace,
}

/// Fewest prompt tokens in a chunk of a joining prompt: a chunk costs about a pass over the
/// weights whatever its size, so smaller ones only slow the join.
const MIN_JOIN_CHUNK: usize = 8;

/// Recent decode-step times (a moving average) and the size of the next chunk of a joining
/// prompt, steered so that a chunk takes about one decode step: the running rows' time between
/// tokens then stays within about twice its usual. A chunk's cost is mostly a fixed pass over
/// the weights plus a little per token, so the size follows the ratio of the target to the last
/// chunk's time rather than a per-token rate.
#[derive(Debug)]
struct Pace {
    step_ms: f64,
    chunk: usize,
}

impl Default for Pace {
    fn default() -> Self {
        Self {
            step_ms: 0.0,
            chunk: MIN_JOIN_CHUNK,
        }
    }
}

impl Pace {
    fn note_step(&mut self, elapsed: Duration) {
        self.step_ms = average(self.step_ms, elapsed.as_secs_f64() * 1e3);
    }

    /// A chunk of `tokens` took `elapsed`: size the next one so that it takes one decode step.
    fn note_chunk(&mut self, elapsed: Duration, tokens: usize) {
        let took = elapsed.as_secs_f64() * 1e3;
        if self.step_ms > 0.0 && took > 0.0 && tokens >= self.chunk {
            // At most doubling or halving per chunk, so one slow chunk does not swing it.
            let ratio = (self.step_ms / took).clamp(0.5, 2.0);
            self.chunk = ((tokens as f64 * ratio) as usize).max(MIN_JOIN_CHUNK);
        }
    }

    /// Prompt tokens for the next chunk, at most `most`.
    fn chunk(&self, most: usize) -> usize {
        self.chunk.min(most.max(MIN_JOIN_CHUNK))
    }
}

/// `sample` folded into the moving average `average` (the first sample starts it).
fn average(average: f64, sample: f64) -> f64 {
    match average > 0.0 {
        true => 0.8 * average + 0.2 * sample,
        false => sample,
    }
}

/// A group prefilled together is left-padded to its longest prompt, and that padding is computed
/// like prompt tokens: a prompt of 20 tokens beside one of 1,500 costs 1,500. So a job joins a group
/// only while the padding stays under this fraction (1 in N) of the group's real tokens; prompts
/// of other lengths join in the next group, one decode step later.
const MOST_PADDING_DIVISOR: usize = 8;

/// The jobs admitted to one prefill group so far: their rows, prompt tokens and longest needs.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct PrefillGroup {
    rows: usize,
    prompt_tokens: usize,
    longest: usize,
    most_new: usize,
}

impl PrefillGroup {
    /// The group with one more job of `prompt` tokens generating up to `new_tokens`.
    fn with(self, prompt: usize, new_tokens: usize) -> Self {
        Self {
            rows: self.rows + 1,
            prompt_tokens: self.prompt_tokens + prompt,
            longest: self.longest.max(prompt),
            most_new: self.most_new.max(new_tokens),
        }
    }

    /// Whether the group may prefill together: within the prefill token budget (rows x the
    /// longest prompt, what left padding makes it), with room in each KV slot for the longest
    /// prompt plus the most new tokens (what it would have alone), and little padding.
    fn fits(&self, options: &EngineOptions) -> bool {
        let padded = self.rows * self.longest;
        padded <= options.prefill_tokens
            && self.longest + self.most_new <= options.max_context
            && padded - self.prompt_tokens <= self.prompt_tokens / MOST_PADDING_DIVISOR
    }
}

/// An empty running batch whose KV cache has `options`' slots.
fn new_batch(options: &EngineOptions, codec: &Arc<TextCodec>) -> RunningBatch {
    let batch = RunningBatch::new(options.pad_id)
        .with_text(codec.clone())
        .with_slots(KvSlots {
            rows: options.max_batch,
            positions: options.max_context,
        });
    match options.prefix_cache_bytes {
        0 => batch,
        bytes => batch.with_prefix_cache(bytes),
    }
}

impl Engine {
    /// Reserve the KV slots now (a failure is logged; the first join tries again and fails its
    /// requests with the reason).
    fn allocate(&mut self) {
        match self.batch.allocate(self.model.as_ref()) {
            Ok(()) => {
                let usage = self.batch.kv_usage();
                tracing::info!(
                    slots = usage.slots,
                    positions = usage.positions_per_slot,
                    mib = usage.bytes >> 20,
                    "KV cache allocated"
                );
            }
            Err(e) => tracing::error!("allocating the KV cache: {e}"),
        }
        self.publish();
    }

    /// Rows running and KV slots in use, for `/health` and `/metrics`.
    fn publish(&self) {
        self.running.store(self.batch.len(), Ordering::Relaxed);
        if let Ok(mut usage) = self.kv.lock() {
            *usage = self.batch.kv_usage();
        }
    }

    fn run(mut self) {
        let mut open = true;
        while open || !self.batch.is_empty() {
            let (admitted, still_open) = self.admit();
            open = still_open;
            if !admitted.is_empty() {
                self.join(admitted);
                self.publish();
            }
            self.drop_cancelled();
            self.advance_join();
            if self.batch.has_unfinished() {
                let listeners = &self.listeners;
                let mut on_token = |id: RowId, token: u32, logprobs: Option<&PositionLogprobs>| {
                    send(listeners, id, JobEvent::Token(token, logprobs.cloned()))
                };
                let started = Instant::now();
                match self.batch.step(self.model.as_mut(), &mut on_token) {
                    Ok(()) => self.pace.note_step(started.elapsed()),
                    Err(e) => self.fail_all(&e.to_string()),
                }
            }
            self.finish();
            self.publish();
        }
    }

    /// Jobs to join now, in arrival order: wait for one when idle, then take what is queued while
    /// it fits one [`PrefillGroup`] and the free KV slots (`max_batch` rows). The job that does
    /// not fit waits at the head of the line for the next step. Every queued job is looked at each step:
    /// one whose client left, or that waited past the queue timeout, leaves the queue at once.
    fn admit(&mut self) -> (Vec<Job>, bool) {
        let mut open = true;
        if self.batch.is_empty() && self.deferred.is_empty() {
            match self.queue.recv() {
                Ok((since, group)) => self.enqueue(since, group),
                Err(_) => return (Vec::new(), false),
            }
        }
        loop {
            match self.queue.try_recv() {
                Ok((since, group)) => self.enqueue(since, group),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        let now = Instant::now();
        let left = sweep(&mut self.deferred, self.options.queue_timeout, now);
        self.waiting.fetch_sub(left, Ordering::Relaxed);
        let mut admitted: Vec<Job> = Vec::new();
        if self.batch.joining() {
            // One group is prefilled in chunks at a time; the queue waits for it.
            return (admitted, open || !self.deferred.is_empty());
        }
        let mut group = PrefillGroup::default();
        while self.batch.len() + admitted.len() < self.options.max_batch {
            let Some(next) = self.deferred.pop_front() else {
                break;
            };
            let request = &next.job.request;
            let grown = group.with(request.prompt.ids.len(), request.max_new_tokens);
            if !admitted.is_empty() && !grown.fits(&self.options) {
                self.deferred.push_front(next);
                break;
            }
            group = grown;
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            self.note_wait(now.saturating_duration_since(next.since));
            admitted.push(next.job);
        }
        (admitted, open || !self.deferred.is_empty())
    }

    fn enqueue(&mut self, since: Instant, group: Vec<Job>) {
        self.deferred
            .extend(group.into_iter().map(|job| Waiting { job, since }));
    }

    /// Fold one admitted job's wait into the moving average behind Retry-After.
    fn note_wait(&self, waited: Duration) {
        let sample = u64::try_from(waited.as_millis()).unwrap_or(u64::MAX);
        let average = self.recent_wait_ms.load(Ordering::Relaxed);
        self.recent_wait_ms
            .store(average - average / 8 + sample / 8, Ordering::Relaxed);
    }

    /// Prefill the admitted jobs as one group; a job that cannot run fails alone.
    fn join(&mut self, jobs: Vec<Job>) {
        let context = self
            .options
            .max_context
            .min(self.model.config().max_position_embeddings);
        let mut accepted = Vec::with_capacity(jobs.len());
        for job in jobs {
            let checked = validate_prompts(std::slice::from_ref(&job.request.prompt), context)
                .and_then(|()| job.request.sampling.validate());
            match checked {
                Ok(()) if !job.events.is_closed() => accepted.push(job),
                Ok(()) => {}
                Err(e) => {
                    let _ = job.events.send(JobEvent::Failed(e.to_string()));
                }
            }
        }
        if accepted.is_empty() {
            return;
        }
        let (requests, senders): (Vec<RowRequest>, Vec<_>) =
            accepted.into_iter().map(|j| (j.request, j.events)).unzip();
        let mut first: Vec<(RowId, u32, Option<PositionLogprobs>)> = Vec::new();
        // A prompt longer than one paced chunk joins in chunks; with no row decoding there is
        // nothing to interleave with, and it joins whole.
        let chunk = match self.batch.has_unfinished() && self.options.prefill_chunk > 0 {
            true => self.join_chunk(),
            false => 0,
        };
        let begun = self.batch.begin_join(
            self.model.as_mut(),
            requests.clone(),
            chunk,
            &mut |id, token, logprobs| first.push((id, token, logprobs.cloned())),
        );
        let joined = match begun {
            Ok(Joining::Joined(ids)) => Ok(ids),
            Ok(Joining::Pending) => {
                self.joining = senders;
                return;
            }
            Err(e) => Err(e),
        };
        if let Err(e) = joined.map(|ids| self.listen(ids, &senders, first)) {
            if requests.len() == 1 {
                let _ = senders[0].send(JobEvent::Failed(e.to_string()));
                return;
            }
            // A group fails as a whole (say one row's learned net misbehaves); each request then
            // joins alone, so the failure stays with the rows it belongs to.
            tracing::warn!("a prefill group failed ({e}); joining its requests one by one");
            for (request, sender) in requests.into_iter().zip(senders) {
                if let Err(e) = self.join_group(vec![request], std::slice::from_ref(&sender)) {
                    let _ = sender.send(JobEvent::Failed(e.to_string()));
                }
            }
        }
    }

    /// Prefill `requests` as one group and start streaming to `senders`; all or nothing.
    fn join_group(
        &mut self,
        requests: Vec<RowRequest>,
        senders: &[UnboundedSender<JobEvent>],
    ) -> Result<(), GenerateError> {
        // Tokens chosen at prefill go out once the ids are known, right after the join.
        let mut first: Vec<(RowId, u32, Option<PositionLogprobs>)> = Vec::new();
        let ids = self
            .batch
            .join(self.model.as_mut(), requests, &mut |id, token, logprobs| {
                first.push((id, token, logprobs.cloned()))
            })?;
        self.listen(ids, senders, first);
        Ok(())
    }

    /// Joined rows `ids` stream to `senders`, starting with the `first` tokens their prefill chose.
    fn listen(
        &mut self,
        ids: Vec<RowId>,
        senders: &[UnboundedSender<JobEvent>],
        first: Vec<(RowId, u32, Option<PositionLogprobs>)>,
    ) {
        self.listeners
            .extend(ids.into_iter().zip(senders.iter().cloned()));
        for (id, token, logprobs) in first {
            send(&self.listeners, id, JobEvent::Token(token, logprobs));
        }
    }

    /// Prompt tokens for the next chunk of a joining prompt: paced to a decode step, or
    /// `--prefill-chunk` while requests wait in the queue (one group joins at a time, so the
    /// queue drains at prefill speed rather than the running rows' pace).
    fn join_chunk(&self) -> usize {
        match self.deferred.is_empty() {
            true => self.pace.chunk(self.options.prefill_chunk),
            false => self.options.prefill_chunk,
        }
    }

    /// Prefill the next chunk of the group joining in chunks; after its last, its rows stream.
    fn advance_join(&mut self) {
        if !self.batch.joining() {
            return;
        }
        let mut first: Vec<(RowId, u32, Option<PositionLogprobs>)> = Vec::new();
        let paced = self.deferred.is_empty();
        let chunk = self.join_chunk().min(self.batch.join_remaining());
        let started = Instant::now();
        let advanced =
            self.batch
                .advance_join(self.model.as_mut(), chunk, &mut |id, token, logprobs| {
                    first.push((id, token, logprobs.cloned()))
                });
        // Only paced chunks teach the pace: a backlog chunk (--prefill-chunk) would leave it far
        // above a decode step once the queue empties, and the running rows would stall again.
        if paced {
            self.pace.note_chunk(started.elapsed(), chunk);
        }
        match advanced {
            Ok(None) => {}
            Ok(Some(ids)) => {
                let senders = std::mem::take(&mut self.joining);
                self.listen(ids, &senders, first);
            }
            Err(e) => {
                for sender in self.joining.drain(..) {
                    let _ = sender.send(JobEvent::Failed(e.to_string()));
                }
            }
        }
    }

    /// Cancel rows whose request went away, and a chunked prefill whose requests all did.
    fn drop_cancelled(&mut self) {
        if !self.joining.is_empty() && self.joining.iter().all(|sender| sender.is_closed()) {
            self.joining.clear();
            self.batch.abandon_join();
        }
        let gone: Vec<RowId> = self
            .listeners
            .iter()
            .filter(|(_, sender)| sender.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.listeners.remove(&id);
            if let Err(e) = self.batch.cancel(id) {
                tracing::error!("cancelling row {id}: {e}");
            }
        }
    }

    /// Send finished rows their results and take them out of the batch.
    fn finish(&mut self) {
        match self.batch.take_finished() {
            Ok(done) => {
                for (id, result) in done {
                    if let Some(sender) = self.listeners.remove(&id) {
                        let _ = sender.send(event_of(result));
                    }
                }
            }
            Err(e) => self.fail_all(&e.to_string()),
        }
    }

    /// A step failed: every row in the batch fails with the reason, and the batch starts afresh.
    fn fail_all(&mut self, message: &str) {
        tracing::error!("batch failed: {message}");
        let senders = self.listeners.drain().map(|(_, sender)| sender);
        for sender in senders.chain(self.joining.drain(..)) {
            let _ = sender.send(JobEvent::Failed(message.to_string()));
        }
        self.batch = new_batch(&self.options, &self.codec);
    }
}

/// A row's result as the event its request gets.
fn event_of(result: RowResult) -> JobEvent {
    match result {
        Ok(generated) => JobEvent::Done(generated),
        Err(e) => JobEvent::Failed(e.to_string()),
    }
}

fn send(listeners: &HashMap<RowId, UnboundedSender<JobEvent>>, id: RowId, event: JobEvent) {
    if let Some(sender) = listeners.get(&id) {
        let _ = sender.send(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(capacity: usize) -> (EngineHandle, Receiver<(Instant, Vec<Job>)>) {
        let (jobs, queue) = mpsc::sync_channel(capacity);
        let handle = EngineHandle {
            jobs,
            waiting: Arc::new(AtomicUsize::new(0)),
            recent_wait_ms: Arc::new(AtomicU64::new(0)),
            running: Arc::new(AtomicUsize::new(0)),
            kv: Arc::default(),
            alive: Arc::new(AtomicBool::new(true)),
            max_queue: capacity,
        };
        (handle, queue)
    }

    fn job() -> Job {
        job_with(tokio::sync::mpsc::unbounded_channel().0)
    }

    fn job_with(events: UnboundedSender<JobEvent>) -> Job {
        Job {
            request: RowRequest {
                prompt: vec![1].into(),
                sampling: crate::generate::Sampling::Greedy,
                max_new_tokens: 1,
                stop_ids: Vec::new(),
                stop_strings: Vec::new(),
                steering: None,
                penalties: Default::default(),
                logprobs: None,
                prompt_logprobs: false,
            },
            events,
        }
    }

    #[test]
    fn jobs_whose_client_left_or_that_waited_too_long_leave_the_queue() {
        let start = Instant::now();
        let (kept_tx, _kept_rx) = tokio::sync::mpsc::unbounded_channel();
        let (gone_tx, gone_rx) = tokio::sync::mpsc::unbounded_channel();
        let (late_tx, mut late_rx) = tokio::sync::mpsc::unbounded_channel();
        drop(gone_rx);
        let mut queue: VecDeque<Waiting> = [
            (late_tx, start),
            (gone_tx, start + Duration::from_secs(9)),
            (kept_tx, start + Duration::from_secs(9)),
        ]
        .into_iter()
        .map(|(events, since)| Waiting {
            job: job_with(events),
            since,
        })
        .collect();
        let now = start + Duration::from_secs(10);
        assert_eq!(sweep(&mut queue, Some(Duration::from_secs(5)), now), 2);
        assert_eq!(queue.len(), 1, "the job of a waiting client in time stays");
        assert!(
            matches!(late_rx.try_recv(), Ok(JobEvent::Expired(waited)) if waited == Duration::from_secs(10))
        );
        // Without a queue timeout only the departed leave.
        assert_eq!(sweep(&mut queue, None, now + Duration::from_secs(3600)), 0);
    }

    #[test]
    fn retry_after_follows_the_recent_queue_wait() {
        let (handle, _queue) = handle(2);
        assert_eq!(handle.retry_after_s(), 1, "at least a second");
        handle.recent_wait_ms.store(7_200, Ordering::Relaxed);
        assert_eq!(handle.retry_after_s(), 8);
        handle.recent_wait_ms.store(u64::MAX, Ordering::Relaxed);
        assert_eq!(handle.retry_after_s(), 600);
    }

    #[test]
    fn a_full_queue_is_busy_and_a_stopped_engine_is_unavailable() {
        let (handle, queue) = handle(2);
        assert!(handle.submit(vec![job()]).is_ok());
        assert!(
            matches!(
                handle.submit(vec![job(), job()]),
                Err(SubmitError::QueueFull(2))
            ),
            "two choices that do not both fit are refused together"
        );
        assert_eq!(handle.queue_depth(), 1, "a refused job is not counted");
        drop(queue);
        assert!(matches!(
            handle.submit(vec![job()]),
            Err(SubmitError::EngineStopped)
        ));
        assert_eq!(handle.queue_depth(), 1);
    }

    #[test]
    fn a_prefill_group_takes_prompts_of_about_one_length() {
        let options = EngineOptions {
            max_batch: 16,
            max_context: 2048,
            prefix_cache_bytes: 0,
            prefill_chunk: 256,
            max_queue: 64,
            pad_id: 0,
            prefill_tokens: 8192,
            queue_timeout: None,
        };
        let group = PrefillGroup::default().with(400, 64).with(380, 64);
        assert!(group.fits(&options), "20 tokens of padding in 780");
        assert!(
            !group.with(20, 64).fits(&options),
            "a short prompt would be padded to 400 tokens"
        );
        assert!(
            !group.with(1500, 64).fits(&options),
            "and so would the two others"
        );
        let long = PrefillGroup::default().with(2000, 64);
        assert!(
            !long.fits(&options),
            "the slot is too short for the prompt and its tokens"
        );
        let wide = (0..5).fold(PrefillGroup::default(), |group, _| group.with(1800, 1));
        assert!(
            !wide.fits(&options),
            "9,000 tokens are over the prefill budget"
        );
    }

    #[test]
    fn the_alive_flag_drops_when_the_engine_thread_panics() {
        let alive = Arc::new(AtomicBool::new(true));
        let guard_flag = alive.clone();
        let thread = std::thread::spawn(move || {
            let _guard = AliveGuard(guard_flag);
            panic!("engine failure");
        });
        assert!(thread.join().is_err());
        assert!(!alive.load(Ordering::Relaxed));
    }
}
