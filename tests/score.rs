//! Teacher-forced scores on the default bundle: a batch scores each row as it scores alone
//! (shared prompts included), and a continuation scores as generating it reported, steered at
//! every `positions` setting.

mod common;

use std::sync::Arc;

use onnx_steer::generate::{score, RowRequest, RunningBatch, ScoreOptions, ScoreRequest};
use onnx_steer::steer::ResolvedSteering;
use onnx_steer::{Bundle, Sampling, SegmentChain, TextCodec};

const TOLERANCE: f32 = 1e-4;

fn request(
    codec: &TextCodec,
    prompt: &str,
    continuation: &str,
    steering: Option<Arc<ResolvedSteering>>,
) -> ScoreRequest {
    let (prompt, continuation) = codec
        .encode_scored(prompt, true, continuation)
        .expect("encodes");
    ScoreRequest {
        prompt: prompt.into(),
        continuation,
        steering,
    }
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() < TOLERANCE, "{what}: {a:?} vs {b:?}");
    }
}

fn token_logprobs(scored: &onnx_steer::generate::Scored) -> Vec<f32> {
    scored
        .continuation
        .iter()
        .map(|p| p.token.logprob)
        .collect()
}

#[test]
fn a_batch_scores_each_row_as_it_scores_alone() {
    let bundle = Bundle::open(common::bundle_dir()).expect("bundle");
    let mut model = SegmentChain::load(&bundle, common::runtime()).expect("model");
    let codec = TextCodec::load(&bundle).expect("tokenizer");
    let steering = common::vector_steering(&bundle, 7, &[10], "all");
    let requests = vec![
        request(
            &codec,
            "Which is bigger, a cat or a whale?",
            "A whale.",
            None,
        ),
        request(
            &codec,
            "Which is bigger, a cat or a whale?",
            "A cat, clearly",
            None,
        ),
        request(&codec, "Say hi.", "Hi!", Some(steering.clone())),
        request(
            &codec,
            "Which is bigger, a cat or a whale?",
            "A whale.",
            Some(steering),
        ),
    ];
    let options = ScoreOptions {
        top_logprobs: 2,
        prompt_logprobs: true,
    };
    let batch = score(&mut model, &requests, options, 0).expect("batch scores");
    for (row, request) in requests.iter().enumerate() {
        let alone = score(&mut model, std::slice::from_ref(request), options, 0).expect("solo");
        assert_close(
            &token_logprobs(&batch[row]),
            &token_logprobs(&alone[0]),
            "continuation",
        );
        let prompt = |s: &onnx_steer::generate::Scored| -> Vec<f32> {
            s.prompt.iter().map(|p| p.token.logprob).collect()
        };
        assert_close(&prompt(&batch[row]), &prompt(&alone[0]), "echoed prompt");
        assert_eq!(batch[row].prompt.len(), request.prompt.ids.len() - 1);
    }
    // The same continuation, steered, scores differently.
    let moved = batch[0].continuation_logprob() - batch[3].continuation_logprob();
    assert!(moved.abs() > 1e-3, "{moved}");
}

#[test]
fn a_continuation_scores_as_generating_it_reported() {
    let bundle = Bundle::open(common::bundle_dir()).expect("bundle");
    let mut model = SegmentChain::load(&bundle, common::runtime()).expect("model");
    let codec = TextCodec::load(&bundle).expect("tokenizer");
    let prompt = "Write one sentence about the sea.";
    for positions in [None, Some("all"), Some("prompt"), Some("generated")] {
        let steering = positions.map(|p| common::vector_steering(&bundle, 5, &[4, 20], p));
        let ids = codec.encode_prompt(prompt, true, 0).expect("encodes");
        let row = RowRequest {
            prompt: ids.clone().into(),
            sampling: Sampling::Greedy,
            max_new_tokens: 10,
            stop_ids: Vec::new(),
            stop_strings: Vec::new(),
            steering: steering.clone(),
            penalties: Default::default(),
            logprobs: Some(0),
            prompt_logprobs: false,
        };
        let mut batch = RunningBatch::new(0);
        batch
            .join(&mut model, vec![row], &mut |_, _, _| {})
            .expect("joins");
        while batch.has_unfinished() {
            batch.step(&mut model, &mut |_, _, _| {}).expect("steps");
        }
        let generated = batch
            .take_finished()
            .expect("finishes")
            .remove(0)
            .1
            .unwrap();
        let scored = score(
            &mut model,
            &[ScoreRequest {
                prompt: ids.into(),
                continuation: generated.token_ids.clone(),
                steering,
            }],
            ScoreOptions::default(),
            0,
        )
        .expect("scores");
        let reported: Vec<f32> = generated.logprobs.iter().map(|p| p.token.logprob).collect();
        assert_close(
            &token_logprobs(&scored[0]),
            &reported,
            &format!("positions {positions:?}"),
        );
    }
}
