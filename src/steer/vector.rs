//! Steering-vector files: safetensors (what `train-vector` writes) and GGUF control vectors
//! (repeng, llama.cpp). Both hold F32 tensors named `direction.{layer}`; a file may instead hold a
//! single tensor `direction` that applies at whatever layers a spec names.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};

use super::gguf::{GgufVectors, MetaValue};
use super::SteerError;

const SHARED: &str = "direction";
const PREFIX: &str = "direction.";

/// The directions of one vector file, by layer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Directions {
    per_layer: BTreeMap<usize, Vec<f32>>,
    shared: Option<Vec<f32>>,
}

fn file_error(path: &Path, message: impl Into<String>) -> SteerError {
    SteerError::VectorFile {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

impl Directions {
    /// Build from named tensors; names other than `direction` / `direction.{N}` are ignored.
    pub fn from_named(
        path: &Path,
        tensors: impl IntoIterator<Item = (String, Vec<f32>)>,
    ) -> Result<Self, SteerError> {
        let mut out = Self::default();
        for (name, values) in tensors {
            if name == SHARED {
                out.shared = Some(values);
            } else if let Some(layer) = name.strip_prefix(PREFIX) {
                let layer: usize = layer
                    .parse()
                    .map_err(|_| file_error(path, format!("tensor {name} has no layer number")))?;
                out.per_layer.insert(layer, values);
            }
        }
        if out.per_layer.is_empty() && out.shared.is_none() {
            return Err(file_error(path, "no `direction` or `direction.N` tensors"));
        }
        Ok(out)
    }

    /// Load a `.gguf` or `.safetensors` file (chosen by extension).
    pub fn load(path: &Path) -> Result<Self, SteerError> {
        let metadata = std::fs::metadata(path).map_err(SteerError::io(path))?;
        if !metadata.is_file() {
            return Err(file_error(path, "is not a regular file"));
        }
        let is_gguf = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
        if is_gguf {
            let file = GgufVectors::read(path).map_err(|e| file_error(path, e.to_string()))?;
            return Self::from_named(path, file.tensors);
        }
        let bytes = std::fs::read(path).map_err(SteerError::io(path))?;
        let tensors =
            SafeTensors::deserialize(&bytes).map_err(|e| file_error(path, e.to_string()))?;
        let mut named = Vec::new();
        for (name, view) in tensors.tensors() {
            let values = match view.dtype() {
                StDtype::F32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                StDtype::F16 => view
                    .data()
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                other => {
                    return Err(file_error(
                        path,
                        format!("tensor {name} is {other:?}; use F32 or F16"),
                    ))
                }
            };
            named.push((name, values));
        }
        Self::from_named(path, named)
    }

    /// Layers with their own direction; `None` for a single-direction file.
    pub fn layers(&self) -> Option<Vec<usize>> {
        (!self.per_layer.is_empty()).then(|| self.per_layer.keys().copied().collect())
    }

    /// The direction for `layer`: its own, else the file's single shared direction.
    pub fn for_layer(&self, layer: usize) -> Option<&[f32]> {
        self.per_layer
            .get(&layer)
            .or(self.shared.as_ref())
            .map(Vec::as_slice)
    }

    /// Every direction as `(name, values)`, in the `direction.{layer}` naming.
    pub fn named(&self) -> Vec<(String, Vec<f32>)> {
        let shared = self.shared.iter().map(|v| (SHARED.to_string(), v.clone()));
        self.per_layer
            .iter()
            .map(|(l, v)| (format!("{PREFIX}{l}"), v.clone()))
            .chain(shared)
            .collect()
    }

    /// Write as a GGUF control vector (arch `controlvector`, as repeng's `export_gguf`).
    pub fn write_gguf(&self, path: &Path, model_hint: &str) -> Result<(), SteerError> {
        let mut file = GgufVectors::default();
        file.metadata.insert(
            "general.architecture".into(),
            MetaValue::Str("controlvector".into()),
        );
        file.metadata.insert(
            "controlvector.model_hint".into(),
            MetaValue::Str(model_hint.into()),
        );
        let count = self.per_layer.len() as u32;
        file.metadata
            .insert("controlvector.layer_count".into(), MetaValue::U32(count));
        file.tensors = self.named().into_iter().collect();
        let mut out = std::fs::File::create(path).map_err(|e| file_error(path, e.to_string()))?;
        file.write(&mut out)
            .map_err(|e| file_error(path, e.to_string()))
    }

    /// Write as safetensors with the same tensor names.
    pub fn write_safetensors(&self, path: &Path) -> Result<(), SteerError> {
        write_safetensors(path, &self.named())
    }
}

/// Write F32 vectors as safetensors.
pub fn write_safetensors(path: &Path, tensors: &[(String, Vec<f32>)]) -> Result<(), SteerError> {
    let shaped: Vec<(String, Vec<usize>, &[f32])> = tensors
        .iter()
        .map(|(name, v)| (name.clone(), vec![v.len()], v.as_slice()))
        .collect();
    write_f32_tensors(path, &shaped)
}

/// Write F32 tensors of any shape as safetensors.
pub fn write_f32_tensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, &[f32])],
) -> Result<(), SteerError> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), data)| {
            TensorView::new(StDtype::F32, shape.clone(), data).map(|view| (name.clone(), view))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e.to_string()))?;
    safetensors::serialize_to_file(views, None, path).map_err(|e| file_error(path, e.to_string()))
}

/// Convert between vector formats by extension (`.gguf` or `.safetensors`); exact for F32.
pub fn convert(input: &Path, output: &Path, model_hint: &str) -> Result<(), SteerError> {
    let directions = Directions::load(input)?;
    if output
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        directions.write_gguf(output, model_hint)
    } else {
        directions.write_safetensors(output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversion_round_trip_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        let st = dir.path().join("v.safetensors");
        let original = vec![
            ("direction.3".to_string(), vec![0.1f32, -2.0, 1e-7]),
            ("direction.10".to_string(), vec![5.5f32, 0.0, -0.25]),
        ];
        write_safetensors(&st, &original).unwrap();
        let gguf = dir.path().join("v.gguf");
        convert(&st, &gguf, "test").unwrap();
        let back = dir.path().join("back.safetensors");
        convert(&gguf, &back, "test").unwrap();
        let loaded = Directions::load(&back).unwrap();
        assert_eq!(loaded, Directions::load(&st).unwrap());
        assert_eq!(loaded.layers(), Some(vec![3, 10]));
        assert_eq!(loaded.for_layer(10), Some(&[5.5f32, 0.0, -0.25][..]));
    }

    #[test]
    fn single_direction_applies_anywhere() {
        let dir = tempfile::tempdir().unwrap();
        let st = dir.path().join("one.safetensors");
        write_safetensors(&st, &[("direction".to_string(), vec![1.0, 2.0])]).unwrap();
        let loaded = Directions::load(&st).unwrap();
        assert_eq!(loaded.layers(), None);
        assert_eq!(loaded.for_layer(7), Some(&[1.0f32, 2.0][..]));
    }
}
