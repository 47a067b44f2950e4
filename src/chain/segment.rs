//! Loading one segment: its manifest entry, the verified files, the session and the interface check.

use ndarray::Array2;
use ort::session::Session;
use ort::value::DynValue;

use super::{run_error, ModelError};
use crate::bundle::{Bundle, Segment, TensorSpec, Verification};
use crate::runtime::Runtime;

fn expect_io(session: &Session, segment: &Segment) -> Result<(), ModelError> {
    let names = |outlets: &[ort::value::Outlet]| -> Vec<String> {
        outlets.iter().map(|o| o.name().to_string()).collect()
    };
    let promised =
        |specs: &[TensorSpec]| -> Vec<String> { specs.iter().map(|s| s.name.clone()).collect() };
    let (got_in, got_out) = (names(session.inputs()), names(session.outputs()));
    let (want_in, want_out) = (promised(&segment.inputs), promised(&segment.outputs));
    if got_in != want_in || got_out != want_out {
        return Err(ModelError::Interface {
            file: segment.file.clone(),
            problem: format!(
                "graph has inputs {got_in:?} and outputs {got_out:?}, manifest lists {want_in:?} and {want_out:?}"
            ),
        });
    }
    Ok(())
}

fn require_names(segment: &Segment, inputs: &[&str], outputs: &[&str]) -> Result<(), ModelError> {
    let has = |specs: &[TensorSpec], name: &str| specs.iter().any(|s| s.name == name);
    for name in inputs {
        if !has(&segment.inputs, name) {
            return Err(ModelError::Interface {
                file: segment.file.clone(),
                problem: format!("no input named {name}"),
            });
        }
    }
    for name in outputs {
        if !has(&segment.outputs, name) {
            return Err(ModelError::Interface {
                file: segment.file.clone(),
                problem: format!("no output named {name}"),
            });
        }
    }
    Ok(())
}

/// A session together with the manifest entry it was built from.
pub(crate) struct LoadedSegment {
    pub(crate) session: Session,
    pub(crate) name: String,
}

pub(crate) fn load_segment(
    bundle: &Bundle,
    runtime: &Runtime,
    segment: &Segment,
    inputs: &[&str],
    outputs: &[&str],
) -> Result<LoadedSegment, ModelError> {
    require_names(segment, inputs, outputs)?;
    let path = bundle.verified_segment(segment, Verification::Stamped)?;
    let session = runtime.session_from_file(&path, &segment.file)?;
    expect_io(&session, segment)?;
    Ok(LoadedSegment {
        session,
        name: segment.file.clone(),
    })
}

pub(crate) fn take(
    outputs: &mut ort::session::SessionOutputs<'_>,
    name: &str,
    segment: &str,
) -> Result<DynValue, ModelError> {
    outputs.remove(name).ok_or_else(|| ModelError::Interface {
        file: segment.to_string(),
        problem: format!("output {name} missing at run time"),
    })
}

pub(crate) fn logits_of(value: &DynValue, segment: &str) -> Result<Array2<f32>, ModelError> {
    let view = value
        .try_extract_array::<f32>()
        .map_err(run_error(segment))?;
    view.into_dimensionality::<ndarray::Ix2>()
        .map(|v| v.to_owned())
        .map_err(|e| ModelError::Interface {
            file: segment.to_string(),
            problem: format!("logits are not [batch, vocab]: {e}"),
        })
}
