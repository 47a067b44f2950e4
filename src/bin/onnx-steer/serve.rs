//! `onnx-steer serve`: the OpenAI-compatible server on one bundle.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use onnx_steer::server::engine::EngineHandle;
use onnx_steer::text::TextCodec;
use onnx_steer::vision::VisionEncoder;
use onnx_steer::Bundle;

use crate::args::RuntimeArgs;
use crate::CliError;

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// Bundle directory written by `python -m onnx_steer_export export`.
    #[arg(long)]
    bundle: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Folder of steer specs: each `NAME.json` is registered as `NAME`, and inline specs may only
    /// name files inside it. It is followed: specs are registered, replaced or removed as their
    /// files appear, change or go away (replicas that mount one folder serve the same specs).
    #[arg(long)]
    steer_dir: Option<PathBuf>,
    /// How often the steering folder is checked for changes, in milliseconds (0: read at start only).
    #[arg(long, default_value_t = 1000)]
    steer_dir_poll_ms: u64,
    /// Most requests decoding together in one batch: the KV cache holds a slot for each,
    /// allocated at start.
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// Positions each request's KV slot holds, prompt plus generated tokens (default: the
    /// model's context). The KV cache is --max-batch x this, allocated once; longer requests get
    /// 400. On the CPU a slot's memory is only used as far as its rows fill it.
    #[arg(long)]
    max_context: Option<usize>,
    /// Memory for the KV of prompt prefixes, in MiB: a prompt that starts like an earlier one
    /// (every chat request starts with its template's head) under the same prompt steering
    /// prefills only what differs. Least recently used blocks go first (0: off).
    #[arg(long, default_value_t = 256)]
    prefix_cache_mb: usize,
    /// Most requests waiting for a batch slot, served first come, first served; more get 429 with
    /// a Retry-After from how long recent requests waited.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Longest a request may wait for a batch slot, in seconds; it then gets 503 with Retry-After
    /// (0: it waits until its --timeout-s). A client that disconnects leaves the queue at once.
    #[arg(long, default_value_t = 0)]
    queue_timeout_s: u64,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
    /// Tokens generated when a request gives no max_tokens.
    #[arg(long, default_value_t = 256)]
    default_max_tokens: usize,
    /// Longest a request may take, in seconds.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
    /// Most prompt tokens prefilled as one group (rows x the longest prompt): prefill memory
    /// grows with it, so long prompts join in smaller groups.
    #[arg(long, default_value_t = 8192)]
    prefill_tokens: usize,
    /// Seconds a connection may take to send a request's headers; also how long an idle
    /// connection is kept open before and between requests.
    #[arg(long, default_value_t = 30)]
    header_timeout_s: u64,
    /// Seconds a request body may take to arrive in full (408 after).
    #[arg(long, default_value_t = 30)]
    body_timeout_s: u64,
    /// Memory registered and cached steering specs may hold together, in MiB (507 beyond).
    #[arg(long, default_value_t = 1024)]
    steering_memory_mb: usize,
    /// Seconds between SIGTERM and closing the listener: `GET /ready` answers 503 meanwhile and
    /// requests are still served, so that a load balancer stops routing here first (Kubernetes:
    /// a few seconds, within terminationGracePeriodSeconds).
    #[arg(long, default_value_t = 0)]
    drain_grace_s: u64,
    /// File holding the bearer token that POST and DELETE /v1/steering require. Without it,
    /// anyone who can reach the port can replace the registered specs.
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

pub(crate) fn run(args: ServeArgs) -> Result<(), CliError> {
    use onnx_steer::server::{engine, router, serve, AppState, Limits};

    let bundle = Bundle::open(&args.bundle)?;
    let runtime = std::sync::Arc::new(args.runtime.runtime()?);
    let model = args.runtime.chain(&bundle, &runtime)?;
    let encoder = VisionEncoder::load(&bundle, &runtime)?;
    let mut config = bundle.config().clone();
    // The server's context: every length check (400s, max_tokens) uses it.
    config.max_position_embeddings = args
        .max_context
        .map_or(config.max_position_embeddings, |positions| {
            positions.clamp(2, config.max_position_embeddings)
        });
    let codec = Arc::new(TextCodec::load(&bundle)?);
    let (handle, engine_thread) = engine::spawn(
        Box::new(model),
        codec.clone(),
        engine::EngineOptions {
            max_batch: args.max_batch.max(1),
            max_context: config.max_position_embeddings,
            prefill_chunk: args.runtime.prefill_chunk,
            prefix_cache_bytes: args.prefix_cache_mb.saturating_mul(1 << 20),
            max_queue: args.max_queue.max(1),
            pad_id: config.pad_token_id.unwrap_or(config.eos_token_ids[0]),
            prefill_tokens: args.prefill_tokens.max(1),
            queue_timeout: (args.queue_timeout_s > 0)
                .then(|| std::time::Duration::from_secs(args.queue_timeout_s)),
        },
    )?;
    let engine = handle.clone();
    let limits = Limits {
        max_body_bytes: args.max_body_bytes,
        default_max_tokens: args.default_max_tokens,
        timeout: std::time::Duration::from_secs(args.timeout_s),
        body_timeout: std::time::Duration::from_secs(args.body_timeout_s),
        steering_memory_bytes: args.steering_memory_mb.saturating_mul(1 << 20),
    };
    let state = AppState::new(
        handle,
        codec,
        config,
        runtime,
        bundle.manifest().name.clone(),
        args.steer_dir.clone(),
        limits,
    )?;
    let state = match encoder {
        Some(encoder) => state.with_vision(encoder),
        None => state,
    };
    if args.steer_dir_poll_ms > 0 {
        state.watch_steer_dir(std::time::Duration::from_millis(args.steer_dir_poll_ms))?;
    }
    let state = match &args.admin_token_file {
        Some(path) => state.with_admin_token(&read_admin_token(path)?),
        None => {
            tracing::warn!(
                "POST and DELETE /v1/steering are open to anyone who reaches the port \
                 (pass --admin-token-file to require a token)"
            );
            state
        }
    };
    let draining = state.drain_handle();
    let grace = std::time::Duration::from_secs(args.drain_grace_s);
    let address = format!("{}:{}", args.host, args.port);
    let server = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    server.block_on(async {
        let listener = tokio::net::TcpListener::bind(&address).await?;
        tracing::info!("serving {} on http://{address}", args.bundle.display());
        eprintln!("listening on http://{address}");
        serve(
            listener,
            router(state),
            std::time::Duration::from_secs(args.header_timeout_s.max(1)),
            shutdown_signal(engine.clone(), draining, grace),
        )
        .await
    })?;
    // The router and this last handle gone, the engine's queue closes: it drains and stops.
    drop(engine);
    drop(server);
    let joined = engine_thread.join();
    if joined.is_err() {
        return Err(CliError::Input(
            "the engine thread panicked; the server stopped (a supervisor should restart it)"
                .into(),
        ));
    }
    Ok(())
}

/// The admin token: the file's first line, which must not be empty.
fn read_admin_token(path: &std::path::Path) -> Result<String, CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        CliError::Input(format!(
            "could not read the admin token file {}: {e}",
            path.display()
        ))
    })?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.is_empty() {
        return Err(CliError::Input(format!(
            "the admin token file {} is empty",
            path.display()
        )));
    }
    Ok(token)
}

/// Ctrl-C, SIGTERM, or the engine thread ending: stop accepting, let requests in flight finish.
/// On a signal the server first drains for `grace` (`GET /ready` 503, requests still served).
async fn shutdown_signal(
    engine: EngineHandle,
    draining: Arc<std::sync::atomic::AtomicBool>,
    grace: std::time::Duration,
) {
    let engine_stopped = async {
        while engine.is_alive() {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        eprintln!("the engine thread stopped");
    };
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    let signalled = tokio::select! {
        () = interrupt => true,
        () = terminate => true,
        () = engine_stopped => false,
    };
    if signalled {
        draining.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    if signalled && !grace.is_zero() {
        eprintln!(
            "draining for {} s: /ready answers 503, requests are still served",
            grace.as_secs()
        );
        tokio::time::sleep(grace).await;
    }
    eprintln!("shutting down: finishing requests in flight");
}
