//! Steer specs: the schema of every intervention kind and the file fields they name, as a
//! request's inline spec or a spec file reaches them.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use onnx_steer::steer::SteerSpec;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(spec) = SteerSpec::parse(text, Path::new("steer"), "fuzz") {
        for intervention in &spec.interventions {
            let _ = intervention.paths();
        }
    }
});
