//! ONNX Runtime values in and out of ndarray: graph inputs in a bundle's dtype, fp32 copies of
//! fp32 or fp16 outputs. The chain, the steering graphs and the vision encoder share these.

use ndarray::{
    Array, Array1, Array2, Array3, ArrayD, ArrayView2, ArrayView3, ArrayViewD, Axis, Dimension,
};
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

/// How one prompt's states at a layer become the single `[d]` input of a prober or capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// The last prompt token (for a chat prompt, the template's final token).
    #[default]
    Last,
    /// The mean over every prompt token, template included: it reads what the request says rather
    /// than how the template ends, which carries better to prompts phrased unlike the training ones.
    Mean,
}

impl Pooling {
    /// `states` `[T, d]`: one prompt's real (unpadded) tokens in order (zeros when `T` is 0).
    pub fn reduce(self, states: ArrayView2<'_, f32>) -> Array1<f32> {
        let pooled = match self {
            Pooling::Last => states.outer_iter().last().map(|row| row.to_owned()),
            Pooling::Mean => states.mean_axis(Axis(0)),
        };
        pooled.unwrap_or_else(|| Array1::zeros(states.ncols()))
    }
}

/// Each row's pooled state of a left-padded layer output `[B, T, d]`, `[B, d]` fp32: row `r`'s prompt
/// is its last `lengths[r]` positions (only those are read).
pub fn pooled_f32(
    value: &DynValue,
    lengths: &[usize],
    pooling: Pooling,
) -> Result<Array2<f32>, RuntimeError> {
    let pooled = with_hidden(value, |view| pool_rows(view, lengths, pooling))?;
    if lengths.len() != pooled.nrows() {
        return Err(RuntimeError::Shape(format!(
            "{} prompt lengths for a hidden state of {} rows",
            lengths.len(),
            pooled.nrows()
        )));
    }
    Ok(pooled)
}

/// [`pooled_f32`] on an fp32 view (the caller checks that every row has a length).
fn pool_rows(view: ArrayView3<'_, f32>, lengths: &[usize], pooling: Pooling) -> Array2<f32> {
    let (rows, width, hidden) = view.dim();
    let mut out = Array2::zeros((rows, hidden));
    for (r, (mut row, &length)) in out.outer_iter_mut().zip(lengths).enumerate() {
        let start = width - length.min(width);
        row.assign(&pooling.reduce(view.slice(ndarray::s![r, start.., ..])));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_reads_only_each_rows_own_left_padded_tokens() {
        // Row 0: padding, then tokens 1 and 3; row 1: tokens 2, 4, 6 (no padding).
        let hidden = ndarray::array![[[9.0f32], [1.0], [3.0]], [[2.0], [4.0], [6.0]]];
        let mean = pool_rows(hidden.view(), &[2, 3], Pooling::Mean);
        assert_eq!(mean.column(0).to_vec(), vec![2.0, 4.0]);
        let last = pool_rows(hidden.view(), &[2, 3], Pooling::Last);
        assert_eq!(last.column(0).to_vec(), vec![3.0, 6.0]);
    }

    #[test]
    fn pooling_an_empty_prompt_gives_zeros() {
        let empty = Array2::<f32>::zeros((0, 4));
        for pooling in [Pooling::Last, Pooling::Mean] {
            assert_eq!(pooling.reduce(empty.view()).to_vec(), vec![0.0; 4]);
        }
    }
}
