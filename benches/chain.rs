//! Criterion benches of the hot paths, on the default bundle (`make bundle`; each bench is
//! skipped with a note when the bundle or a steering artifact is missing):
//! one layer segment call, one decode step of the whole chain (unsteered and per intervention
//! kind), the prefill of a 128-token prompt (where learned interventions run their nets), and
//! sampling. `onnx-steer bench` is the end-to-end tokens/s measurement; these isolate the parts.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use ndarray::{Array2, Array3, Array4};
use onnx_steer::bundle::Bundle;
use onnx_steer::generate::Sampling;
use onnx_steer::model::{CausalLm, KvCache, LayerHook, SegmentChain, Step};
use onnx_steer::runtime::{Runtime, RuntimeOptions};
use onnx_steer::steer::{BatchSteering, DecodeSteering, SteerSpec};
use ort::value::Tensor;
use rand::rngs::StdRng;
use rand::SeedableRng;

const PROMPT_TOKENS: usize = 128;

fn bundle_dir() -> PathBuf {
    std::env::var_os("ONNX_STEER_BUNDLE").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx/smollm2-135m-instruct"),
        PathBuf::from,
    )
}

struct Setup {
    bundle: Bundle,
    runtime: Runtime,
}

fn setup() -> Option<Setup> {
    let bundle = match Bundle::open(bundle_dir()) {
        Ok(bundle) => bundle,
        Err(e) => {
            eprintln!("skipping model benches: {e}");
            return None;
        }
    };
    let runtime = Runtime::new(RuntimeOptions::default()).ok()?;
    Some(Setup { bundle, runtime })
}

/// The prefill step of one prompt of `PROMPT_TOKENS` ids.
fn prompt_step() -> Step {
    let ids: Vec<u32> = (0..PROMPT_TOKENS as u32).map(|i| 1000 + i * 7).collect();
    Step::left_padded(&[ids], 0)
}

/// The decode step after `seen` positions (one new token).
fn decode_step(seen: usize) -> Step {
    Step {
        input_ids: Array2::from_elem((1, 1), 1234),
        position_ids: Array2::from_elem((1, 1), seen as i64),
        attention_mask: Array2::ones((1, seen + 1)),
    }
}

fn segment_call(c: &mut Criterion, s: &Setup) {
    let config = s.bundle.config();
    let Some(layer) = s.bundle.layers().first().map(|l| l.file.clone()) else {
        return;
    };
    let bytes = s.bundle.read_verified(&layer).expect("layer file");
    let mut session = s.runtime.session(&bytes, &layer).expect("layer session");
    let (kv, hd, d) = (
        config.num_key_value_heads,
        config.head_dim,
        config.hidden_size,
    );
    let past = Array4::<f32>::zeros((1, kv, PROMPT_TOKENS, hd));
    c.bench_function("segment/layer_00 decode call (P=128)", |b| {
        b.iter(|| {
            let inputs = ort::inputs![
                "hidden_in" => Tensor::from_array(Array3::<f32>::zeros((1, 1, d))).expect("hidden"),
                "position_ids" => Tensor::from_array(Array2::<i64>::from_elem((1, 1), PROMPT_TOKENS as i64)).expect("positions"),
                "attention_mask" => Tensor::from_array(Array2::<i64>::ones((1, PROMPT_TOKENS + 1))).expect("mask"),
                "past_key" => Tensor::from_array(past.clone()).expect("keys"),
                "past_value" => Tensor::from_array(past.clone()).expect("values"),
                "steer_delta" => Tensor::from_array(Array3::<f32>::zeros((1, 1, d))).expect("delta"),
            ];
            session.run(inputs).expect("layer run").len()
        })
    });
}

/// Specs of the default bundle's `steer/` folder that exist, by intervention kind.
fn steering(
    s: &Setup,
) -> Vec<(
    &'static str,
    Option<Arc<onnx_steer::steer::ResolvedSteering>>,
)> {
    let mut kinds = vec![("unsteered", None)];
    for (kind, file) in [
        ("vector", "refusal.json"),
        ("l2s", "l2s.json"),
        ("w2s", "w2s.json"),
        ("svf", "svf_sentiment.json"),
        ("autosteer", "autosteer.json"),
    ] {
        let path = bundle_dir().join("steer").join(file);
        match SteerSpec::load(&path).and_then(|spec| spec.resolve(s.bundle.config(), &s.runtime)) {
            Ok(resolved) => kinds.push((kind, Some(Arc::new(resolved)))),
            Err(e) => eprintln!("skipping {kind} benches: {e} (run `make steer`)"),
        }
    }
    kinds
}

fn chain_steps(c: &mut Criterion, s: &Setup) {
    let mut chain = SegmentChain::load(&s.bundle, &s.runtime).expect("segment chain");
    let prompt = prompt_step();
    let mut group = c.benchmark_group("chain");
    group.sample_size(10);
    for (kind, resolved) in steering(s) {
        let batch = BatchSteering::uniform(resolved, 1);
        group.bench_function(format!("prefill 128 tokens/{kind}"), |b| {
            b.iter_batched(
                || KvCache::empty(s.bundle.config(), s.bundle.manifest().dtype, 1).expect("cache"),
                |mut cache| {
                    let mut hook = batch.prefill(s.bundle.config());
                    chain
                        .forward(&prompt, &mut cache, &mut hook)
                        .expect("prefill")
                },
                BatchSize::PerIteration,
            )
        });
        // Decode steps time alone: each sample prefills untimed, then decodes `iters` tokens.
        group.bench_function(format!("decode step/{kind}"), |b| {
            b.iter_custom(|iters| {
                let mut cache = chain.new_cache(1).expect("cache");
                let mut prefill = batch.prefill(s.bundle.config());
                chain
                    .forward(&prompt, &mut cache, &mut prefill)
                    .expect("prefill");
                let mut deltas: DecodeSteering = prefill.decode();
                let mut total = Duration::ZERO;
                for step in 0..iters as usize {
                    let step = decode_step(PROMPT_TOKENS + step);
                    let started = Instant::now();
                    chain
                        .forward(&step, &mut cache, &mut deltas as &mut dyn LayerHook)
                        .expect("decode");
                    total += started.elapsed();
                }
                total
            })
        });
    }
    group.finish();
}

fn sampling(c: &mut Criterion) {
    let vocab = 49_152;
    let logits: Vec<f32> = (0..vocab)
        .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
        .collect();
    let random = Sampling::Random {
        temperature: 0.8,
        top_p: 0.95,
        top_k: 50,
        seed: 0,
    };
    let mut group = c.benchmark_group("sampling");
    group.bench_function("greedy/49152", |b| {
        b.iter(|| Sampling::Greedy.pick(&logits, None))
    });
    group.bench_function("top-k 50, top-p 0.95/49152", |b| {
        let mut rng = StdRng::seed_from_u64(0);
        b.iter(|| random.pick(&logits, Some(&mut rng)))
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    sampling(c);
    if let Some(s) = setup() {
        segment_call(c, &s);
        chain_steps(c, &s);
    }
}

criterion_group!(chain_benches, benches);
criterion_main!(chain_benches);
