//! The engine thread: it owns the model and a [`RunningBatch`], admits queued jobs between decode
//! steps (up to `max_batch` rows), and streams each row's tokens back to its request.
//!
//! Requests never touch the model: they send their [`Job`]s through a bounded queue, as one group
//! that joins the batch together, and read [`JobEvent`]s. A request that goes away drops its receiver; the engine then cancels the row and
//! its KV cache is freed at once.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;

use tokio::sync::mpsc::UnboundedSender;

use crate::chain::CausalLm;
use crate::generate::batch::{RowId, RowRequest, RowResult, RunningBatch};
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
    /// Most rows decoding at once.
    pub max_batch: usize,
    /// Most jobs waiting to join; more are refused (HTTP 429).
    pub max_queue: usize,
    /// Left padding and the input of finished rows.
    pub pad_id: u32,
    /// Most prompt tokens one prefill group may hold, counted as rows x the longest prompt (what
    /// left padding makes it): prefill memory grows with it, so long prompts join in smaller
    /// groups, and a prompt longer than the budget joins alone.
    pub prefill_tokens: usize,
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
    jobs: SyncSender<Vec<Job>>,
    waiting: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
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
            match self.jobs.try_send(jobs) {
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
    let handle = EngineHandle {
        jobs,
        waiting: waiting.clone(),
        running: running.clone(),
        alive: alive.clone(),
        max_queue: options.max_queue,
    };
    let thread = std::thread::Builder::new()
        .name("onnx-steer-engine".into())
        .spawn(move || {
            let _alive = AliveGuard(alive);
            Engine {
                model,
                options,
                queue,
                waiting,
                running,
                batch: RunningBatch::new(options.pad_id).with_text(codec.clone()),
                deferred: VecDeque::new(),
                codec,
                listeners: HashMap::new(),
            }
            .run()
        })?;
    Ok((handle, thread))
}

struct Engine {
    model: Box<dyn CausalLm + Send>,
    options: EngineOptions,
    queue: Receiver<Vec<Job>>,
    waiting: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
    batch: RunningBatch,
    /// Jobs taken from the queue that have not joined yet, in arrival order: they join first.
    deferred: VecDeque<Job>,
    codec: Arc<TextCodec>,
    listeners: HashMap<RowId, UnboundedSender<JobEvent>>,
}

impl Engine {
    fn run(mut self) {
        let mut open = true;
        while open || !self.batch.is_empty() {
            let (admitted, still_open) = self.admit();
            open = still_open;
            if !admitted.is_empty() {
                self.join(admitted);
                self.running.store(self.batch.len(), Ordering::Relaxed);
            }
            self.drop_cancelled();
            if self.batch.has_unfinished() {
                let listeners = &self.listeners;
                let mut on_token = |id: RowId, token: u32, logprobs: Option<&PositionLogprobs>| {
                    send(listeners, id, JobEvent::Token(token, logprobs.cloned()))
                };
                if let Err(e) = self.batch.step(self.model.as_mut(), &mut on_token) {
                    self.fail_all(&e.to_string());
                }
            }
            self.finish();
            self.running.store(self.batch.len(), Ordering::Relaxed);
        }
    }

    /// Jobs to join now, in arrival order: wait for one when idle, then take what is queued up to
    /// `max_batch` rows and the prefill token budget. The job that would overflow the budget
    /// waits at the head of the line for the next step.
    fn admit(&mut self) -> (Vec<Job>, bool) {
        let mut admitted: Vec<Job> = Vec::new();
        let mut open = true;
        let mut longest = 0;
        while self.batch.len() + admitted.len() < self.options.max_batch {
            let Some(next) = self.deferred.pop_front() else {
                let idle = self.batch.is_empty() && admitted.is_empty();
                let group = match idle {
                    true => self.queue.recv().map_err(|_| TryRecvError::Disconnected),
                    false => self.queue.try_recv(),
                };
                match group {
                    Ok(group) => self.deferred.extend(group),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
                continue;
            };
            let length = longest.max(next.request.prompt.ids.len());
            if !admitted.is_empty() && (admitted.len() + 1) * length > self.options.prefill_tokens {
                self.deferred.push_front(next);
                break;
            }
            longest = length;
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            admitted.push(next);
        }
        (admitted, open || !self.deferred.is_empty())
    }

    /// Prefill the admitted jobs as one group; a job that cannot run fails alone.
    fn join(&mut self, jobs: Vec<Job>) {
        let context = self.model.config().max_position_embeddings;
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
        if let Err(e) = self.join_group(requests.clone(), &senders) {
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
        self.listeners
            .extend(ids.into_iter().zip(senders.iter().cloned()));
        for (id, token, logprobs) in first {
            send(&self.listeners, id, JobEvent::Token(token, logprobs));
        }
        Ok(())
    }

    /// Cancel rows whose request went away.
    fn drop_cancelled(&mut self) {
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
        for (_, sender) in self.listeners.drain() {
            let _ = sender.send(JobEvent::Failed(message.to_string()));
        }
        self.batch = RunningBatch::new(self.options.pad_id).with_text(self.codec.clone());
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

    fn handle(capacity: usize) -> (EngineHandle, Receiver<Vec<Job>>) {
        let (jobs, queue) = mpsc::sync_channel(capacity);
        let handle = EngineHandle {
            jobs,
            waiting: Arc::new(AtomicUsize::new(0)),
            running: Arc::new(AtomicUsize::new(0)),
            alive: Arc::new(AtomicBool::new(true)),
            max_queue: capacity,
        };
        (handle, queue)
    }

    fn job() -> Job {
        let (events, _) = tokio::sync::mpsc::unbounded_channel();
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
