//! Reading the files a spec names: pinned sha256 checks, and loading a learned net with the
//! interface it must have.

use std::path::{Path, PathBuf};

use ort::session::Session;
use sha2::{Digest, Sha256};

use super::SteerError;
use crate::runtime::Runtime;

/// Read a file named by a spec, checking the pinned sha256 when there is one.
pub(crate) fn read_pinned(path: &Path, sha256: Option<&str>) -> Result<Vec<u8>, SteerError> {
    let bytes = std::fs::read(path).map_err(SteerError::io(path))?;
    if let Some(expected) = sha256 {
        let actual = hex::encode(Sha256::digest(&bytes));
        if !actual.eq_ignore_ascii_case(expected) {
            return Err(SteerError::HashMismatch {
                path: path.to_path_buf(),
                expected: expected.to_string(),
                actual,
            });
        }
    }
    Ok(bytes)
}

/// A net a spec names: its file, pinned hash, and the `[batch, width]` output it must have.
pub(crate) struct NetFile<'a> {
    pub(crate) path: PathBuf,
    pub(crate) sha256: Option<&'a str>,
    pub(crate) output: &'static str,
    pub(crate) width: usize,
}

impl NetFile<'_> {
    /// Verify and load the net, and check it maps `state [B, hidden]` to `output [B, width]`.
    pub(crate) fn load(&self, runtime: &Runtime, hidden: usize) -> Result<Session, SteerError> {
        let bytes = read_pinned(&self.path, self.sha256)?;
        let bad = |message: String| SteerError::Net {
            path: self.path.clone(),
            message,
        };
        let session = runtime
            .session(&bytes, &self.path.display().to_string())
            .map_err(|e| bad(e.to_string()))?;
        let shape_of =
            |outlets: &[ort::value::Outlet], name: &str| -> Result<Vec<i64>, SteerError> {
                let outlet = outlets
                    .iter()
                    .find(|o| o.name() == name)
                    .ok_or_else(|| bad(format!("the graph has no tensor named {name:?}")))?;
                outlet
                    .dtype()
                    .tensor_shape()
                    .map(|shape| shape.to_vec())
                    .ok_or_else(|| bad(format!("{name:?} is not a tensor")))
            };
        for (name, shape, want) in [
            ("state", shape_of(session.inputs(), "state")?, hidden),
            (
                self.output,
                shape_of(session.outputs(), self.output)?,
                self.width,
            ),
        ] {
            if shape.len() != 2 || shape[1] != want as i64 {
                return Err(bad(format!(
                "{name:?} has shape {shape:?}, expected [batch, {want}] (is it for another model?)"
            )));
            }
        }
        Ok(session)
    }
}
