//! Continuous batching on the default bundle: rows that join a running batch mid-generation, with
//! their own steering, and rows that leave early produce exactly what they produce alone.

mod common;

use std::sync::Arc;

use onnx_steer::generate::{RowRequest, RunningBatch};
use onnx_steer::steer::{vector, SteerSpec};
use onnx_steer::{Bundle, Runtime, RuntimeOptions, Sampling, SegmentChain, TextCodec};

fn request(
    codec: &TextCodec,
    prompt: &str,
    max_new_tokens: usize,
    steering: Option<Arc<onnx_steer::steer::ResolvedSteering>>,
) -> RowRequest {
    RowRequest {
        prompt: codec
            .encode_prompt(prompt, true, 0)
            .expect("prompt encodes")
            .into(),
        sampling: Sampling::Greedy,
        max_new_tokens,
        stop_ids: vec![2],
        stop_strings: Vec::new(),
        steering,
    }
}

#[test]
fn joining_and_leaving_rows_match_their_solo_runs() {
    let bundle = Bundle::open(common::bundle_dir()).expect("bundle");
    let runtime = Runtime::new(RuntimeOptions::default()).expect("runtime");
    let mut model = SegmentChain::load(&bundle, &runtime).expect("model");
    let codec = TextCodec::load(&bundle).expect("tokenizer");
    let dir = tempfile::tempdir().unwrap();
    let direction: Vec<f32> = (0..576).map(|i| ((i % 7) as f32 - 3.0) * 0.5).collect();
    vector::write_safetensors(
        &dir.path().join("v.safetensors"),
        &[("direction".into(), direction)],
    )
    .unwrap();
    let text = r#"{"interventions": [{"kind": "vector", "path": "v.safetensors", "scale": 1.0, "layers": [10]}]}"#;
    let steering = Arc::new(
        SteerSpec::parse(text, dir.path(), "test")
            .unwrap()
            .resolve(bundle.config(), &runtime)
            .unwrap(),
    );
    let requests = [
        request(&codec, "Name three colours.", 6, None),
        request(
            &codec,
            "Write a long story about a lighthouse keeper.",
            14,
            None,
        ),
        request(&codec, "What is the capital of France?", 10, Some(steering)),
    ];
    let solo: Vec<Vec<u32>> = requests
        .iter()
        .map(|r| {
            let mut batch = RunningBatch::new(0);
            batch
                .join(&mut model, vec![r.clone()], &mut |_, _| {})
                .unwrap();
            while batch.has_unfinished() {
                batch.step(&mut model, &mut |_, _| {}).unwrap();
            }
            batch.take_finished().unwrap().remove(0).1.unwrap().token_ids
        })
        .collect();

    let mut batch = RunningBatch::new(0);
    batch
        .join(&mut model, requests[..2].to_vec(), &mut |_, _| {})
        .unwrap();
    let mut done = Vec::new();
    for _ in 0..3 {
        batch.step(&mut model, &mut |_, _| {}).unwrap();
        done.extend(batch.take_finished().unwrap());
    }
    batch
        .join(&mut model, vec![requests[2].clone()], &mut |_, _| {})
        .unwrap();
    while batch.has_unfinished() {
        batch.step(&mut model, &mut |_, _| {}).unwrap();
        done.extend(batch.take_finished().unwrap());
    }
    done.sort_by_key(|(id, _)| *id);
    let together: Vec<Vec<u32>> = done.into_iter().map(|(_, g)| g.unwrap().token_ids).collect();
    assert_eq!(together, solo);
    assert!(batch.is_empty());
}
