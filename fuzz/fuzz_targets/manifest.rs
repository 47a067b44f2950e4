//! `manifest.json`: the schema, then every structural check `Bundle::open` makes before a file
//! is touched.
#![no_main]

use libfuzzer_sys::fuzz_target;
use onnx_steer::bundle::Manifest;

fuzz_target!(|data: &[u8]| {
    if let Ok(manifest) = serde_json::from_slice::<Manifest>(data) {
        let _ = manifest.validate();
    }
});
