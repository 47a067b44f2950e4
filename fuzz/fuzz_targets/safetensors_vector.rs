//! Safetensors vector files: the header, dtypes and shapes, then the direction naming rules.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use onnx_steer::steer::vector::{Directions, VectorFormat};

fuzz_target!(|data: &[u8]| {
    let _ = Directions::parse(
        Path::new("fuzz.safetensors"),
        data,
        VectorFormat::Safetensors,
    );
});
