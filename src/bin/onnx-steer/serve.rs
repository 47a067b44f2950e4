//! `onnx-steer serve`: the OpenAI-compatible server on one bundle.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use onnx_steer::server::engine::EngineHandle;
use onnx_steer::text::TextCodec;
use onnx_steer::vision::VisionEncoder;
use onnx_steer::{Bundle, SegmentChain};

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
    /// name files inside it.
    #[arg(long)]
    steer_dir: Option<PathBuf>,
    /// Most requests decoding together in one batch.
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// Most requests waiting for a batch slot; more get 429 with Retry-After.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
    /// Tokens generated when a request gives no max_tokens.
    #[arg(long, default_value_t = 256)]
    default_max_tokens: usize,
    /// Longest a request may take, in seconds.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

pub(crate) fn run(args: ServeArgs) -> Result<(), CliError> {
    use onnx_steer::server::{engine, router, AppState, Limits};

    let bundle = Bundle::open(&args.bundle)?;
    let runtime = std::sync::Arc::new(args.runtime.runtime()?);
    let model = SegmentChain::load(&bundle, &runtime)?;
    let encoder = VisionEncoder::load(&bundle, &runtime)?;
    let config = bundle.config().clone();
    let codec = Arc::new(TextCodec::load(&bundle)?);
    let (handle, engine_thread) = engine::spawn(
        Box::new(model),
        codec.clone(),
        engine::EngineOptions {
            max_batch: args.max_batch.max(1),
            max_queue: args.max_queue.max(1),
            pad_id: config.pad_token_id.unwrap_or(config.eos_token_ids[0]),
        },
    )?;
    let engine = handle.clone();
    let limits = Limits {
        max_body_bytes: args.max_body_bytes,
        default_max_tokens: args.default_max_tokens,
        timeout: std::time::Duration::from_secs(args.timeout_s),
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
    let address = format!("{}:{}", args.host, args.port);
    let server = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    server.block_on(async {
        let listener = tokio::net::TcpListener::bind(&address).await?;
        tracing::info!("serving {} on http://{address}", args.bundle.display());
        eprintln!("listening on http://{address}");
        axum::serve(listener, router(state))
            .with_graceful_shutdown(shutdown_signal(engine.clone()))
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

/// Ctrl-C, SIGTERM, or the engine thread ending: stop accepting, let requests in flight finish.
async fn shutdown_signal(engine: EngineHandle) {
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
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
        () = engine_stopped => {},
    }
    eprintln!("shutting down: finishing requests in flight");
}
