//! Shared by the integration tests: where the default bundle is (exported by `make bundle`).

use std::path::{Path, PathBuf};

/// `ONNX_STEER_BUNDLE`, else the repo's default bundle; fails with how to create it if missing.
pub fn bundle_dir() -> PathBuf {
    let dir = std::env::var_os("ONNX_STEER_BUNDLE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx/smollm2-135m-instruct")
        });
    assert!(
        dir.join("manifest.json").is_file(),
        "default bundle missing at {}; run `make bundle`",
        dir.display()
    );
    dir
}

/// The one ONNX Runtime of a test binary (ONNX Runtime allows one environment per process, and
/// tests run on parallel threads).
#[allow(dead_code)] // not every test binary loads a model
pub fn runtime() -> &'static onnx_steer::Runtime {
    static RUNTIME: std::sync::OnceLock<onnx_steer::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        onnx_steer::Runtime::new(onnx_steer::RuntimeOptions::default()).expect("ONNX Runtime")
    })
}

/// A vector spec at `layers` (at `positions`: "all", "prompt" or "generated") whose direction
/// repeats a ramp of `period` values, resolved.
#[allow(dead_code)] // not every test binary steers
pub fn vector_steering(
    bundle: &onnx_steer::Bundle,
    period: usize,
    layers: &[usize],
    positions: &str,
) -> std::sync::Arc<onnx_steer::steer::ResolvedSteering> {
    let dir = tempfile::tempdir().unwrap();
    let half = (period / 2) as f32;
    let direction: Vec<f32> = (0..576)
        .map(|i| ((i % period) as f32 - half) * 0.5)
        .collect();
    onnx_steer::steer::vector::write_safetensors(
        &dir.path().join("v.safetensors"),
        &[("direction".into(), direction)],
    )
    .unwrap();
    let text = serde_json::json!({"interventions": [
        {"kind": "vector", "path": "v.safetensors", "scale": 1.0, "layers": layers,
         "positions": positions}
    ]})
    .to_string();
    let spec = onnx_steer::steer::SteerSpec::parse(&text, dir.path(), "test").unwrap();
    std::sync::Arc::new(spec.resolve(bundle.config(), runtime()).unwrap())
}
