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
