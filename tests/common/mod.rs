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
