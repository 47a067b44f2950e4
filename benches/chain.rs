//! Criterion benches of the hot paths, on the default bundle (`make bundle`; each bench is
//! skipped with a note when the bundle or a steering artifact is missing):
//! one layer segment call, one decode step of the whole chain (unsteered and per intervention
//! kind), the prefill of a 128-token prompt (where learned interventions run their nets), and
//! sampling. `onnx-steer bench` is the end-to-end tokens/s measurement; these isolate the parts.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use ndarray::{Array2, Array3, Array4};
use onnx_steer::bundle::{Bundle, SegmentKind, Verification};
use onnx_steer::chain::{CausalLm, KvCache, LayerHook, SegmentChain, Step};
use onnx_steer::generate::Sampling;
use onnx_steer::runtime::{Runtime, RuntimeOptions};
use onnx_steer::steer::{BatchSteering, DecodeSteering, SteerSpec};
use ort::session::{Session, SessionInputValue};
use ort::value::{Tensor, TensorRef};
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
        images: Vec::new(),
    }
}

/// Session of the bundle's first segment of `kind`.
fn session_of(s: &Setup, kind: SegmentKind) -> Option<Session> {
    let segment = s.bundle.segment(kind)?;
    let path = s
        .bundle
        .verified_segment(segment, Verification::Stamped)
        .expect("segment files");
    Some(
        s.runtime
            .session_from_file(&path, &segment.file)
            .expect("segment session"),
    )
}

/// One decode call of layer 0 after a 128-token prompt, with the positions graph's outputs and a
/// zero KV cache prepared untimed: the per-segment cost the chain pays 30 times a token.
fn segment_call(c: &mut Criterion, s: &Setup) {
    let config = s.bundle.config();
    let (Some(mut positions), Some(mut layer)) = (
        session_of(s, SegmentKind::Positions),
        session_of(s, SegmentKind::Layer),
    ) else {
        return;
    };
    let value = |array: ndarray::ArrayD<f32>| Tensor::from_array(array).expect("tensor").into_dyn();
    let (kv, hd, d) = (
        config.num_key_value_heads,
        config.head_dim,
        config.hidden_size,
    );
    // A KV buffer with room for the decoded token, which GroupQueryAttention writes at 128.
    let past = value(Array4::<f32>::zeros((1, kv, PROMPT_TOKENS + 1, hd)).into_dyn());
    let seqlens = Tensor::from_array(ndarray::arr1(&[PROMPT_TOKENS as i32])).expect("seqlens");
    let total = Tensor::from_array(ndarray::arr0(PROMPT_TOKENS as i32 + 1)).expect("total");
    let hidden = value(Array3::<f32>::zeros((1, 1, d)).into_dyn());
    let delta = value(Array3::<f32>::zeros((1, 1, d)).into_dyn());
    let step = decode_step(PROMPT_TOKENS);
    let mut tables = positions
        .run(ort::inputs![
            "position_ids" => Tensor::from_array(step.position_ids.clone()).expect("positions"),
            "attention_mask" => Tensor::from_array(step.attention_mask.clone()).expect("mask"),
        ])
        .expect("positions run");
    let [bias, cos, sin] =
        ["attention_bias", "cos", "sin"].map(|name| tables.remove(name).expect(name));
    drop(tables);
    let mut group = c.benchmark_group("segment");
    group.bench_function("positions decode call (P=128)", |b| {
        b.iter(|| {
            positions
                .run(ort::inputs![
                    "position_ids" => TensorRef::from_array_view(step.position_ids.view()).expect("positions"),
                    "attention_mask" => TensorRef::from_array_view(step.attention_mask.view()).expect("mask"),
                ])
                .expect("positions run")
                .len()
        })
    });
    group.bench_function("layer_00 decode call (P=128)", |b| {
        b.iter(|| {
            let inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = vec![
                ("hidden_in".into(), (&hidden).into()),
                ("attention_bias".into(), (&bias).into()),
                ("cos".into(), (&cos).into()),
                ("sin".into(), (&sin).into()),
                ("past_key".into(), (&past).into()),
                ("past_value".into(), (&past).into()),
                ("seqlens_k".into(), (&seqlens).into()),
                ("total_sequence_length".into(), (&total).into()),
                ("steer_delta".into(), (&delta).into()),
            ];
            layer.run(inputs).expect("layer run").len()
        })
    });
    group.finish();
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
                    let mut hook = batch.prefill(s.bundle.config(), &[PROMPT_TOKENS]);
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
                let mut prefill = batch.prefill(s.bundle.config(), &[PROMPT_TOKENS]);
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
