//! ONNX Runtime values in and out of ndarray: graph inputs in a bundle's dtype, fp32 copies of
//! fp32 or fp16 outputs. The chain, the steering graphs and the vision encoder share these.

use ndarray::{Array, Array2, Array3, ArrayD, ArrayView2, ArrayView3, ArrayViewD, Dimension};
use ort::session::SessionInputValue;
use ort::value::{DynValue, Tensor, TensorRef};

use super::RuntimeError;
use crate::bundle::Dtype;

/// An i64 array view as a graph input, without copying (`what` names it in errors).
pub fn view_input<'a>(
    array: ArrayView2<'a, i64>,
    what: &str,
) -> Result<SessionInputValue<'a>, RuntimeError> {
    Ok(TensorRef::from_array_view(array)
        .map_err(RuntimeError::tensor(what))?
        .into())
}

/// An fp32 array as a graph input of `dtype` (`what` names it in errors).
pub fn value_in<D: Dimension + 'static>(
    array: Array<f32, D>,
    dtype: Dtype,
    what: &str,
) -> Result<DynValue, RuntimeError> {
    let value = match dtype {
        Dtype::Fp32 => Tensor::from_array(array).map(Tensor::into_dyn),
        Dtype::Fp16 => Tensor::from_array(array.mapv(half::f16::from_f32)).map(Tensor::into_dyn),
    };
    value.map_err(RuntimeError::tensor(what))
}

/// A tensor of any rank as an fp32 array, and the dtype it had (`what` names it in errors).
pub fn to_f32(value: &DynValue, what: &str) -> Result<(ArrayD<f32>, Dtype), RuntimeError> {
    if let Ok(view) = value.try_extract_array::<f32>() {
        return Ok((view.to_owned(), Dtype::Fp32));
    }
    let view = value
        .try_extract_array::<half::f16>()
        .map_err(RuntimeError::tensor(what))?;
    Ok((view.mapv(half::f16::to_f32), Dtype::Fp16))
}

/// A layer output `[B, T, d]` as a 3-D view.
fn as_3d<T>(view: ArrayViewD<'_, T>) -> Result<ArrayView3<'_, T>, RuntimeError> {
    view.into_dimensionality::<ndarray::Ix3>()
        .map_err(|e| RuntimeError::Shape(format!("hidden state is not [B, T, d]: {e}")))
}

/// Apply `take` to a layer output as an fp32 or fp16 view; the result is fp32 either way.
fn with_hidden<D: Dimension>(
    value: &DynValue,
    take: impl Fn(ArrayView3<'_, f32>) -> Array<f32, D>,
) -> Result<Array<f32, D>, RuntimeError> {
    match value.try_extract_array::<f32>() {
        Ok(view) => Ok(take(as_3d(view)?)),
        Err(_) => {
            let view = value
                .try_extract_array::<half::f16>()
                .map_err(RuntimeError::tensor("hidden state"))?;
            let widened = as_3d(view)?.mapv(half::f16::to_f32);
            Ok(take(widened.view()))
        }
    }
}

/// A layer output `[B, T, d]` as fp32, whatever the bundle's dtype.
pub fn hidden_to_f32(value: &DynValue) -> Result<Array3<f32>, RuntimeError> {
    with_hidden(value, |view| view.to_owned())
}

/// Each row's state at the last position of a layer output, `[B, d]` fp32 (only that slice is copied).
pub fn last_position_f32(value: &DynValue) -> Result<Array2<f32>, RuntimeError> {
    with_hidden(value, |view| {
        let last = view.dim().1.saturating_sub(1);
        view.slice(ndarray::s![.., last, ..]).to_owned()
    })
}
