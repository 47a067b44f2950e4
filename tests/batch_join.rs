//! Continuous batching on the default bundle: rows that join a running batch mid-generation, with
//! their own steering, and rows that leave early produce exactly what they produce alone.

mod common;

use std::sync::Arc;

use onnx_steer::generate::{Joining, KvSlots, RowId, RowRequest, RowResult, RunningBatch};
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

/// The tokens of row `id` among `finished` rows, if it finished well.
fn tokens_of(finished: &[(RowId, RowResult)], id: RowId) -> Option<Vec<u32>> {
    finished
        .iter()
        .find(|(row, _)| *row == id)
        .and_then(|(_, result)| result.as_ref().ok())
        .map(|generated| generated.token_ids.clone())
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
fn rows_own_kv_slots_that_join_and_leave_without_touching_the_others() {
    let bundle = Bundle::open(common::bundle_dir()).expect("bundle");
    let codec = TextCodec::load(&bundle).expect("tokenizer");
    let mut model = SegmentChain::load(&bundle, common::runtime()).expect("model");
    let long = "Tell me everything about the history of lighthouses on rocky coasts. ".repeat(6);
    let long = request(&codec, &long, 3, None);
    let short = request(&codec, "Name a colour and a fruit.", 12, None);
    let third = request(&codec, "What is two plus two?", 4, None);
    let solo: Vec<Vec<u32>> = [&short, &third]
        .iter()
        .map(|r| generate_all(&mut model, vec![(*r).clone()]).remove(0))
        .collect();
    let slots = KvSlots {
        rows: 2,
        positions: 256,
    };
    let mut batch = RunningBatch::new(2).with_slots(slots);
    let mut sink = |_: u64, _: u32, _: Option<&_>| {};
    batch
        .join(&mut model, vec![long.clone()], &mut sink)
        .unwrap();
    batch.step(&mut model, &mut sink).unwrap();
    let kv = batch.kv_usage();
    let long_len = long.prompt.ids.len() + 1;
    assert_eq!(
        (kv.slots, kv.used_slots, kv.positions_per_slot),
        (2, 1, 256)
    );
    assert_eq!(kv.filled_positions, long_len);
    // The short row joins a running batch: it fills only its own slot, with no padding to the
    // long row's length.
    let short_id = batch
        .join(&mut model, vec![short.clone()], &mut sink)
        .unwrap()[0];
    let kv = batch.kv_usage();
    assert_eq!(kv.used_slots, 2);
    assert_eq!(kv.filled_positions, long_len + short.prompt.ids.len());
    // Both slots are taken: a third row is refused with a clear error, and the batch runs on.
    let full = batch
        .join(&mut model, vec![third.clone()], &mut sink)
        .unwrap_err()
        .to_string();
    assert!(full.contains("KV slots are free"), "{full}");
    let mut finished = Vec::new();
    let mut third_id = None;
    while batch.has_unfinished() {
        batch.step(&mut model, &mut sink).unwrap();
        let left = batch.take_finished().unwrap();
        // The long row leaves after its 3 tokens; the third row takes its slot.
        if third_id.is_none() && !left.is_empty() {
            assert_eq!(batch.kv_usage().used_slots, 1);
            third_id = Some(
                batch
                    .join(&mut model, vec![third.clone()], &mut sink)
                    .unwrap()[0],
            );
        }
        finished.extend(left);
    }
    finished.extend(batch.take_finished().unwrap());
    let tokens = |id| tokens_of(&finished, id);
    assert_eq!(tokens(short_id), Some(solo[0].clone()));
    assert_eq!(
        tokens(third_id.expect("the third row joined")),
        Some(solo[1].clone())
    );
    assert_eq!(
        batch.kv_usage().filled_positions,
        0,
        "every slot is free again"
    );
}

#[test]
fn a_row_stops_when_its_slot_is_full() {
    let bundle = Bundle::open(common::bundle_dir()).expect("bundle");
    let codec = TextCodec::load(&bundle).expect("tokenizer");
    let mut model = SegmentChain::load(&bundle, common::runtime()).expect("model");
    let row = request(
        &codec,
        "Write a long story about a lighthouse keeper.",
        50,
        None,
    );
    let prompt = row.prompt.ids.len();
    let solo = generate_all(&mut model, vec![row.clone()]).remove(0);
    let mut batch = RunningBatch::new(2).with_slots(KvSlots {
        rows: 1,
        positions: prompt + 10,
    });
    let mut sink = |_: u64, _: u32, _: Option<&_>| {};
    batch.join(&mut model, vec![row], &mut sink).unwrap();
    while batch.has_unfinished() {
        batch.step(&mut model, &mut sink).unwrap();
    }
    let (_, result) = batch.take_finished().unwrap().remove(0);
    let generated = result.unwrap();
    assert_eq!(
        generated.token_ids,
        solo[..11],
        "10 positions of room, then one last token"
    );
    assert_eq!(
        generated.finish_reason,
        onnx_steer::generate::FinishReason::Length
    );
}

#[test]
fn a_long_prompt_joins_in_chunks_while_the_running_rows_decode() {
    let bundle = Bundle::open(common::bundle_dir()).expect("bundle");
    let codec = TextCodec::load(&bundle).expect("tokenizer");
    let mut model = SegmentChain::load(&bundle, common::runtime()).expect("model");
    let steering = common::vector_steering(&bundle, 7, &[10], "all");
    let long = "Tell me everything about the history of lighthouses on rocky coasts. ".repeat(12);
    let long = request(&codec, &long, 6, Some(steering));
    let short = request(
        &codec,
        "Write a long story about a lighthouse keeper.",
        24,
        None,
    );
    let solo: Vec<Vec<u32>> = [&short, &long]
        .iter()
        .map(|r| generate_all(&mut model, vec![(*r).clone()]).remove(0))
        .collect();
    let mut batch = RunningBatch::new(2).with_slots(KvSlots {
        rows: 4,
        positions: 512,
    });
    let mut sink = |_: u64, _: u32, _: Option<&_>| {};
    let short_id = batch.join(&mut model, vec![short], &mut sink).unwrap()[0];
    let chunk = 64;
    let joining = batch
        .begin_join(&mut model, vec![long.clone()], chunk, &mut sink)
        .unwrap();
    assert_eq!(joining, Joining::Pending);
    assert!(batch
        .begin_join(&mut model, vec![long.clone()], chunk, &mut sink)
        .is_err());
    let (mut long_id, mut steps_while_joining) = (None, 0);
    let mut finished = Vec::new();
    while batch.has_unfinished() || batch.joining() {
        if let Some(ids) = batch.advance_join(&mut model, chunk, &mut sink).unwrap() {
            long_id = Some(ids[0]);
        }
        if batch.joining() {
            steps_while_joining += 1;
        }
        batch.step(&mut model, &mut sink).unwrap();
        finished.extend(batch.take_finished().unwrap());
    }
    let chunks = long.prompt.ids.len().div_ceil(chunk);
    assert_eq!(
        steps_while_joining,
        chunks - 1,
        "the short row decodes one token after each chunk but the last"
    );
    let tokens = |id| tokens_of(&finished, id);
    assert_eq!(tokens(short_id), Some(solo[0].clone()));
    assert_eq!(
        tokens(long_id.expect("the long row joined")),
        Some(solo[1].clone())
    );
}

#[test]
fn a_prompt_prefix_is_reused_only_under_the_same_prompt_steering() {
    let bundle = Bundle::open(common::bundle_dir()).expect("bundle");
    let codec = TextCodec::load(&bundle).expect("tokenizer");
    let mut model = SegmentChain::load(&bundle, common::runtime()).expect("model");
    let context = "A lighthouse stands on a rocky island. Its keeper lights the lamp at dusk, \
                   winds the clockwork, and writes the weather in a log every four hours. ";
    let ask = |question: &str, steering| {
        request(
            &codec,
            &format!("{context}{context}{question}"),
            10,
            steering,
        )
    };
    let all = common::vector_steering(&bundle, 7, &[10], "all");
    let generated = common::vector_steering(&bundle, 7, &[10], "generated");
    let requests = [
        ask("When is the lamp lit?", None),
        ask("What does the keeper write?", None),
        ask("What does the keeper write?", Some(all)),
        ask("What does the keeper write?", Some(generated)),
    ];
    let solo: Vec<Vec<u32>> = requests
        .iter()
        .map(|r| generate_all(&mut model, vec![r.clone()]).remove(0))
        .collect();
    let mut batch = RunningBatch::new(2)
        .with_slots(KvSlots {
            rows: 4,
            positions: 256,
        })
        .with_prefix_cache(64 << 20);
    let mut sink = |_: u64, _: u32, _: Option<&_>| {};
    let mut hits = Vec::new();
    for (request, expected) in requests.iter().zip(&solo) {
        let id = batch
            .join(&mut model, vec![request.clone()], &mut sink)
            .unwrap()[0];
        hits.push(batch.kv_usage().prefix.hit_tokens);
        while batch.has_unfinished() {
            batch.step(&mut model, &mut sink).unwrap();
        }
        let (left, result) = batch.take_finished().unwrap().remove(0);
        assert_eq!(left, id);
        assert_eq!(
            &result.unwrap().token_ids,
            expected,
            "prefix reuse changed the output"
        );
    }
    let block = onnx_steer::generate::prefix_cache::BLOCK as u64;
    assert_eq!(hits[0], 0, "an empty cache has nothing to reuse");
    assert!(
        hits[1] >= 2 * block,
        "the shared context is reused: {hits:?}"
    );
    assert_eq!(
        hits[2], hits[1],
        "a vector on prompt positions does not reuse the unsteered prefix"
    );
    assert!(
        hits[3] > hits[2],
        "steering of generated positions shares the unsteered prefix: {hits:?}"
    );
}
