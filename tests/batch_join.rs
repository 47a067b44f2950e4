//! Continuous batching on the default bundle: rows that join a running batch mid-generation, with
//! their own steering, and rows that leave early produce exactly what they produce alone.

mod common;

use std::sync::Arc;

use onnx_steer::generate::{RowRequest, RunningBatch};
use onnx_steer::{Bundle, Sampling, SegmentChain, TextCodec};

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
        penalties: Default::default(),
        logprobs: None,
        prompt_logprobs: false,
    }
}

/// `requests` joined as one group and decoded to the end: each row's tokens, in order.
fn generate_all(model: &mut SegmentChain, requests: Vec<RowRequest>) -> Vec<Vec<u32>> {
    let mut batch = RunningBatch::new(0);
    batch.join(model, requests, &mut |_, _, _| {}).unwrap();
    while batch.has_unfinished() {
        batch.step(model, &mut |_, _, _| {}).unwrap();
    }
    let mut done = batch.take_finished().unwrap();
    done.sort_by_key(|(id, _)| *id);
    done.into_iter()
        .map(|(_, result)| result.unwrap().token_ids)
        .collect()
}

#[test]
fn joining_and_leaving_rows_match_their_solo_runs() {
    let bundle = Bundle::open(common::bundle_dir()).expect("bundle");
    let runtime = common::runtime();
    let mut model = SegmentChain::load(&bundle, runtime).expect("model");
    let codec = TextCodec::load(&bundle).expect("tokenizer");
    let steering = common::vector_steering(&bundle, 7, &[10], "all");
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
        .map(|r| generate_all(&mut model, vec![r.clone()]).remove(0))
        .collect();

    let mut batch = RunningBatch::new(0);
    batch
        .join(&mut model, requests[..2].to_vec(), &mut |_, _, _| {})
        .unwrap();
    let mut done = Vec::new();
    for _ in 0..3 {
        batch.step(&mut model, &mut |_, _, _| {}).unwrap();
        done.extend(batch.take_finished().unwrap());
    }
    batch
        .join(&mut model, vec![requests[2].clone()], &mut |_, _, _| {})
        .unwrap();
    while batch.has_unfinished() {
        batch.step(&mut model, &mut |_, _, _| {}).unwrap();
        done.extend(batch.take_finished().unwrap());
    }
    done.sort_by_key(|(id, _)| *id);
    let together: Vec<Vec<u32>> = done
        .into_iter()
        .map(|(_, g)| g.unwrap().token_ids)
        .collect();
    assert_eq!(together, solo);
    assert!(batch.is_empty());
}

/// Run `request` alone to the end and return its result.
fn solo(
    model: &mut SegmentChain,
    batch: RunningBatch,
    request: RowRequest,
) -> Result<onnx_steer::Generated, onnx_steer::GenerateError> {
    let mut batch = batch;
    batch.join(model, vec![request], &mut |_, _, _| {})?;
    while batch.has_unfinished() {
        batch.step(model, &mut |_, _, _| {})?;
    }
    batch.take_finished()?.remove(0).1
}

#[test]
fn a_stop_string_ends_the_row_where_the_text_reaches_it() {
    let bundle = Bundle::open(common::bundle_dir()).expect("bundle");
    let runtime = common::runtime();
    let mut model = SegmentChain::load(&bundle, runtime).expect("model");
    let codec = Arc::new(TextCodec::load(&bundle).expect("tokenizer"));
    let base = request(&codec, "Name three colours.", 24, None);
    let full = solo(&mut model, RunningBatch::new(0), base.clone()).unwrap();
    let text = codec.decode(&full.token_ids).unwrap();
    // A stop string from the middle of the unstopped text: the row must end on the token that
    // completes it, keeping exactly the tokens before.
    let words: Vec<&str> = text.split_whitespace().collect();
    assert!(words.len() > 4, "{text:?}");
    let stop = words[words.len() / 2].to_string();
    let stopped_request = RowRequest {
        stop_strings: vec![stop.clone()],
        ..base.clone()
    };
    let without_text = solo(&mut model, RunningBatch::new(0), stopped_request.clone());
    assert!(matches!(
        without_text,
        Err(onnx_steer::GenerateError::StopStringsWithoutText)
    ));
    let batch = RunningBatch::new(0).with_text(codec.clone());
    let stopped = solo(&mut model, batch, stopped_request).unwrap();
    assert_eq!(
        stopped.finish_reason,
        onnx_steer::generate::FinishReason::Stop
    );
    assert!(stopped.token_ids.len() < full.token_ids.len());
    assert_eq!(
        stopped.token_ids[..],
        full.token_ids[..stopped.token_ids.len()]
    );
    let kept = codec.decode(&stopped.token_ids).unwrap();
    let before = codec
        .decode(&stopped.token_ids[..stopped.token_ids.len() - 1])
        .unwrap();
    assert!(kept.contains(&stop) && !before.contains(&stop), "{kept:?}");
}

#[test]
fn streamed_text_equals_the_whole_decode() {
    let bundle = Bundle::open(common::bundle_dir()).expect("bundle");
    let codec = TextCodec::load(&bundle).expect("tokenizer");
    let text = "Café au lait, naïve résumé — 東京 and 🙂 emoji; then plain ASCII words again.";
    let ids = codec.encode(text, false).unwrap();
    let mut decoder = onnx_steer::text::StreamDecoder::default();
    let mut streamed = String::new();
    for &id in &ids {
        let delta = decoder.push(&codec, id).unwrap();
        assert!(!delta.contains('\u{FFFD}'), "{delta:?}");
        streamed.push_str(&delta);
    }
    assert_eq!(streamed, codec.decode(&ids).unwrap());
}

#[test]
fn a_chunked_prefill_matches_the_whole_prompt_at_once() {
    let bundle = Bundle::open(common::bundle_dir()).expect("bundle");
    let runtime = common::runtime();
    let codec = TextCodec::load(&bundle).expect("tokenizer");
    let steering = common::vector_steering(&bundle, 5, &[4, 20], "all");
    let story =
        "The lighthouse keeper climbed the stairs and watched the storm roll in. ".repeat(40);
    let prompts = [
        format!("{story} What did he see?"),
        "Name a colour.".to_string(),
    ];
    let run = |chunk: usize| {
        let mut model = SegmentChain::load(&bundle, runtime)
            .expect("model")
            .with_prefill_chunk(chunk);
        let requests = prompts
            .iter()
            .map(|p| request(&codec, p, 8, Some(steering.clone())))
            .collect();
        generate_all(&mut model, requests)
    };
    let whole = run(0);
    // 64-token chunks: the long row takes about 12 of them, the short (left-padded) row the same.
    assert_eq!(run(64), whole);
    assert_eq!(whole[0].len(), 8);
}

#[test]
fn a_short_row_continues_exactly_after_the_longest_row_leaves() {
    let bundle = Bundle::open(common::bundle_dir()).expect("bundle");
    let codec = TextCodec::load(&bundle).expect("tokenizer");
    let mut model = SegmentChain::load(&bundle, common::runtime()).expect("model");
    let long = "Tell me everything about the history of lighthouses on rocky coasts. ".repeat(6);
    let short = request(&codec, "Name a colour and a fruit.", 12, None);
    let solo = generate_all(&mut model, vec![short.clone()]).remove(0);
    let mut batch = RunningBatch::new(2);
    let ids = batch
        .join(
            &mut model,
            vec![request(&codec, &long, 2, None), short],
            &mut |_, _, _| {},
        )
        .unwrap();
    let long_width = batch.cached_positions();
    let mut finished = Vec::new();
    let mut width_after = None;
    while batch.has_unfinished() {
        batch.step(&mut model, &mut |_, _, _| {}).unwrap();
        // The long row leaves after its 2 tokens; its padding in front of the short row goes too.
        finished.extend(batch.take_finished().unwrap());
        if width_after.is_none() && finished.iter().any(|(id, _)| *id == ids[0]) {
            width_after = Some(batch.cached_positions());
        }
    }
    let width_after = width_after.expect("the long row left first");
    assert!(
        width_after > 0 && width_after < long_width / 2,
        "the cache holds {width_after} positions after the long row's {long_width} left"
    );
    finished.extend(batch.take_finished().unwrap());
    let short_row = finished.iter().find(|(id, _)| *id == ids[1]).unwrap();
    assert_eq!(short_row.1.as_ref().unwrap().token_ids, solo);
}
