//! The HTTP server (`onnx-steer serve`): OpenAI-compatible completions with steering per request,
//! served by one engine thread that batches concurrent requests.

pub mod engine;
