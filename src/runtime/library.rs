//! Finding the ONNX Runtime shared library: `ORT_DYLIB_PATH`, else the onnxruntime wheel in the
//! project's `.venv` (what `make setup` installs).

use std::path::{Path, PathBuf};

use super::RuntimeError;

/// Environment variable that names the ONNX Runtime shared library explicitly.
pub const ORT_DYLIB_ENV: &str = "ORT_DYLIB_PATH";

pub(super) fn check_library(path: &Path) -> Result<PathBuf, RuntimeError> {
    if path.is_file() {
        Ok(path.to_path_buf())
    } else {
        Err(RuntimeError::LibraryNotFound(format!(
            "{} does not exist",
            path.display()
        )))
    }
}

/// `ORT_DYLIB_PATH` if set, else `libonnxruntime.so*` from the onnxruntime wheel in a `.venv`
/// found in the working directory, next to the executable, or in any of their ancestors.
pub fn find_library() -> Result<PathBuf, RuntimeError> {
    if let Some(path) = std::env::var_os(ORT_DYLIB_ENV).filter(|p| !p.is_empty()) {
        return check_library(Path::new(&path)).map_err(|_| {
            RuntimeError::LibraryNotFound(format!(
                "{ORT_DYLIB_ENV}={} does not exist",
                Path::new(&path).display()
            ))
        });
    }
    let starts = [std::env::current_dir().ok(), std::env::current_exe().ok()];
    let mut searched = Vec::new();
    for start in starts.iter().flatten() {
        for dir in start.ancestors() {
            let venv = dir.join(".venv");
            if let Some(found) = library_in_venv(&venv) {
                return Ok(found);
            }
            searched.push(venv);
        }
    }
    Err(RuntimeError::LibraryNotFound(format!(
        "{ORT_DYLIB_ENV} is unset and no .venv with onnxruntime was found above {}",
        starts
            .iter()
            .flatten()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" or ")
    )))
}

fn library_in_venv(venv: &Path) -> Option<PathBuf> {
    let lib = venv.join("lib");
    let pythons = std::fs::read_dir(&lib).ok()?;
    for python in pythons.flatten() {
        let capi = python.path().join("site-packages/onnxruntime/capi");
        let Ok(entries) = std::fs::read_dir(&capi) else {
            continue;
        };
        let mut candidates: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libonnxruntime.so"))
            })
            .collect();
        candidates.sort();
        if let Some(found) = candidates.pop() {
            return Some(found);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_explicit_library_is_reported() {
        let err = check_library(Path::new("/nonexistent/libonnxruntime.so")).unwrap_err();
        assert!(matches!(err, RuntimeError::LibraryNotFound(_)));
    }

    #[test]
    fn venv_search_finds_versioned_library() {
        let venv = tempfile::tempdir().unwrap();
        let capi = venv
            .path()
            .join("lib/python3.11/site-packages/onnxruntime/capi");
        std::fs::create_dir_all(&capi).unwrap();
        std::fs::write(capi.join("libonnxruntime.so.1.31.1"), b"").unwrap();
        std::fs::write(capi.join("libonnxruntime_providers_shared.so"), b"").unwrap();
        let found = library_in_venv(venv.path()).unwrap();
        assert!(found.ends_with("libonnxruntime.so.1.31.1"));
    }
}
