//! The KV cache is written in place: 200 decode steps on the default bundle reuse the same
//! buffers (no reallocation, no copy of the whole cache), and the tokens are those of a run whose
//! cache had to grow along the way. (export/tests/test_kv_graphs.py checks that no layer graph
//! concatenates past and new keys.)

mod common;

use ndarray::Array2;
use onnx_steer::chain::{FixedDeltas, KvCache, Step};
use onnx_steer::{Bundle, CausalLm, SegmentChain, TextCodec};

const STEPS: usize = 200;

/// Greedy decode `STEPS` tokens after `prompt` with `cache`, checking its buffers after each step
/// with `check`; returns the tokens.
fn decode(
    model: &mut SegmentChain,
    prompt: &[u32],
    cache: &mut KvCache,
    check: &mut dyn FnMut(&KvCache),
) -> Vec<u32> {
    let mut step = Step::left_padded(&[prompt.to_vec()], 0);
    let mut tokens = Vec::new();
    for _ in 0..STEPS {
        let logits = model
            .forward(&step, cache, &mut FixedDeltas::default())
            .expect("step");
        let next = logits
            .row(0)
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(id, _)| id as u32)
            .expect("logits");
        tokens.push(next);
        check(cache);
        let position = (prompt.len() + tokens.len() - 1) as i64;
        step = Step {
            input_ids: Array2::from_elem((1, 1), i64::from(next)),
            position_ids: Array2::from_elem((1, 1), position),
            attention_mask: Array2::ones((1, cache.longest() + 1)),
            images: Vec::new(),
        };
    }
    tokens
}

#[test]
fn two_hundred_decode_steps_write_one_set_of_buffers_in_place() {
    let bundle = Bundle::open(common::bundle_dir()).expect("bundle");
    let mut model = SegmentChain::load(&bundle, common::runtime()).expect("model");
    let codec = TextCodec::load(&bundle).expect("tokenizer");
    let prompt = codec
        .encode_prompt("Tell me a long story about a lighthouse.", true, 0)
        .expect("prompt");

    let mut cache = model.new_cache(1).expect("cache");
    cache.reserve(prompt.len() + STEPS).expect("reserve");
    let capacity = cache.capacity();
    let addresses = cache.buffer_addresses();
    assert_eq!(addresses.len(), 2 * bundle.config().num_layers);
    let mut steps = 0;
    let in_place = decode(&mut model, &prompt, &mut cache, &mut |cache| {
        steps += 1;
        assert_eq!(
            cache.buffer_addresses(),
            addresses,
            "buffers moved at step {steps}"
        );
        assert_eq!(cache.capacity(), capacity);
    });
    assert_eq!(steps, STEPS);
    assert_eq!(cache.longest(), prompt.len() + STEPS - 1);

    // A cache that starts empty grows by reallocating; its tokens must be the same.
    let mut grown = model.new_cache(1).expect("cache");
    let mut moves = 0;
    let mut last = grown.buffer_addresses();
    let regrown = decode(&mut model, &prompt, &mut grown, &mut |cache| {
        let now = cache.buffer_addresses();
        moves += usize::from(now != last);
        last = now;
    });
    assert!(
        moves >= 1,
        "a cache sized for the prompt must grow during 200 steps"
    );
    assert_eq!(regrown, in_place);
}
