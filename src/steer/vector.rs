//! Steering-vector files: safetensors (what `train-vector` writes) and GGUF control vectors
//! (repeng, llama.cpp). Both hold F32 tensors named `direction.{layer}`; a file may instead hold a
//! single tensor `direction` that applies at whatever layers a spec names.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};

use super::files::write_regular;
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

/// The two vector file formats, told apart by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VectorFormat {
    /// A GGUF control vector (repeng, llama.cpp): `.gguf`.
    Gguf,
    /// Safetensors (what `train-vector` writes): any other extension.
    Safetensors,
}

impl VectorFormat {
    /// The format a file name implies.
    pub fn of(path: &Path) -> Self {
        let is_gguf = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
        if is_gguf {
            Self::Gguf
        } else {
            Self::Safetensors
        }
    }
}

/// Largest vector file read: a 70B model's 80 layers x 8192 F32 take 2.6 MB, so anything near
/// this is not a control vector, and refusing it by its size costs no memory.
pub const MAX_VECTOR_FILE_BYTES: u64 = 64 << 20;

/// The layer of a tensor named `direction.{N}`: `N` in canonical decimal only, so that `05`, `+5`
/// and `5` cannot name one layer twice.
fn layer_of(name: &str) -> Option<Result<usize, ()>> {
    let digits = name.strip_prefix(PREFIX)?;
    let canonical = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    Some(canonical.then(|| digits.parse().ok()).flatten().ok_or(()))
}

impl Directions {
    /// Build from named 1-D tensors; names other than `direction` / `direction.{N}` are ignored.
    pub fn from_named(
        path: &Path,
        tensors: impl IntoIterator<Item = (String, Vec<f32>)>,
    ) -> Result<Self, SteerError> {
        let mut out = Self::default();
        for (name, values) in tensors {
            let duplicate = if name == SHARED {
                out.shared.replace(values).is_some()
            } else if let Some(layer) = layer_of(&name) {
                let layer = layer.map_err(|()| {
                    file_error(
                        path,
                        format!("tensor {name:?}: the layer must be a plain decimal number"),
                    )
                })?;
                out.per_layer.insert(layer, values).is_some()
            } else {
                false
            };
            if duplicate {
                return Err(file_error(path, format!("tensor {name:?} occurs twice")));
            }
        }
        if out.per_layer.is_empty() && out.shared.is_none() {
            return Err(file_error(path, "no `direction` or `direction.N` tensors"));
        }
        Ok(out)
    }

    /// Load a `.gguf` or `.safetensors` file (chosen by extension). Only regular files up to
    /// [`MAX_VECTOR_FILE_BYTES`] are read, so a FIFO, a device or a huge sparse file is refused
    /// before any of it is read.
    pub fn load(path: &Path) -> Result<Self, SteerError> {
        let bytes = super::files::read_regular(path, MAX_VECTOR_FILE_BYTES)?;
        Self::parse(path, &bytes, VectorFormat::of(path))
    }

    /// Parse the bytes of a vector file; `path` only names it in errors.
    pub fn parse(path: &Path, bytes: &[u8], format: VectorFormat) -> Result<Self, SteerError> {
        let named = match format {
            VectorFormat::Gguf => GgufVectors::parse(bytes)
                .map_err(|e| file_error(path, e.to_string()))?
                .tensors
                .into_iter()
                .collect(),
            VectorFormat::Safetensors => {
                safetensors_vectors(bytes).map_err(|message| file_error(path, message))?
            }
        };
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
        let mut bytes = Vec::new();
        file.write(&mut bytes)
            .map_err(|e| file_error(path, e.to_string()))?;
        write_regular(path, &bytes)
    }

    /// Write as safetensors with the same tensor names.
    pub fn write_safetensors(&self, path: &Path) -> Result<(), SteerError> {
        write_safetensors(path, &self.named())
    }
}

/// The 1-D F32 or F16 tensors of a safetensors file, as F32.
fn safetensors_vectors(bytes: &[u8]) -> Result<Vec<(String, Vec<f32>)>, String> {
    let tensors = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let mut named = Vec::new();
    for (name, view) in tensors.tensors() {
        if view.shape().len() != 1 {
            return Err(format!(
                "tensor {name} has shape {:?}; a direction is one vector (1-D)",
                view.shape()
            ));
        }
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
            other => return Err(format!("tensor {name} is {other:?}; use F32 or F16")),
        };
        named.push((name, values));
    }
    Ok(named)
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
    let bytes = safetensors::serialize(views, None).map_err(|e| file_error(path, e.to_string()))?;
    write_regular(path, &bytes)
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

    #[test]
    fn ambiguous_layer_names_and_duplicates_are_refused() {
        for name in [
            "direction.05",
            "direction.+5",
            "direction.",
            "direction.5x",
            "direction.-1",
        ] {
            let err = Directions::from_named(Path::new("v"), [(name.to_string(), vec![1.0])])
                .unwrap_err();
            assert!(err.to_string().contains("plain decimal"), "{name}: {err}");
        }
        let ok = Directions::from_named(Path::new("v"), [("direction.0".to_string(), vec![1.0])]);
        assert_eq!(ok.unwrap().layers(), Some(vec![0]));
        // Two GGUF tensors of one name: the later one used to win silently.
        let mut file = GgufVectors::default();
        file.tensors.insert("direction.5".into(), vec![1.0]);
        let mut bytes = Vec::new();
        file.write(&mut bytes).unwrap();
        let twice = bytes.windows(11).position(|w| w == b"direction.5").unwrap();
        let mut doubled = bytes[..8].to_vec();
        doubled.extend(2u64.to_le_bytes()); // two tensors
        let entry_start = twice - 8;
        let entry_end = entry_start + 8 + 11 + 4 + 8 + 4 + 8;
        doubled.extend(&bytes[16..entry_end]);
        doubled.extend(&bytes[entry_start..entry_end]);
        // The second entry's data lies after the first's (its offset is the entry's last field).
        let offset_at = doubled.len() - 8;
        doubled[offset_at..].copy_from_slice(&32u64.to_le_bytes());
        doubled.resize(doubled.len().div_ceil(32) * 32 + 64, 0);
        let err = Directions::parse(Path::new("v.gguf"), &doubled, VectorFormat::Gguf).unwrap_err();
        assert!(err.to_string().contains("occurs twice"), "{err}");
    }

    #[test]
    fn matrices_are_refused_not_flattened() {
        let dir = tempfile::tempdir().unwrap();
        let st = dir.path().join("m.safetensors");
        let data = [1.0f32, 2.0, 3.0, 4.0];
        write_f32_tensors(&st, &[("direction.1".into(), vec![2, 2], &data)]).unwrap();
        let err = Directions::load(&st).unwrap_err();
        assert!(err.to_string().contains("1-D"), "{err}");
        let mut bytes = Vec::new();
        let mut file = GgufVectors::default();
        file.tensors.insert("direction.1".into(), data.to_vec());
        file.write(&mut bytes).unwrap();
        // Rewrite the tensor entry's dimension count (1 -> 2) and add a second dimension.
        let at = bytes.windows(11).position(|w| w == b"direction.1").unwrap() + 11;
        bytes[at..at + 4].copy_from_slice(&2u32.to_le_bytes());
        bytes.splice(at + 12..at + 12, 1u64.to_le_bytes());
        let err = Directions::parse(Path::new("m.gguf"), &bytes, VectorFormat::Gguf).unwrap_err();
        assert!(err.to_string().contains("2 dimensions"), "{err}");
    }

    #[test]
    fn fifos_devices_and_oversize_files_are_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("v.gguf");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        // Nobody writes to the FIFO: a blocking open would hang here.
        let err = Directions::load(&fifo).unwrap_err();
        assert!(err.to_string().contains("a FIFO"), "{err}");
        let err = Directions::load(Path::new("/dev/zero")).unwrap_err();
        assert!(err.to_string().contains("a device"), "{err}");
        // A 2 GB sparse file takes no disk and must take no memory either.
        let sparse = dir.path().join("big.safetensors");
        std::fs::File::create(&sparse)
            .unwrap()
            .set_len(2 << 30)
            .unwrap();
        let err = Directions::load(&sparse).unwrap_err();
        assert!(err.to_string().contains("more than the limit"), "{err}");
    }

    #[test]
    fn writers_refuse_links_and_devices_and_write_readable_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("v.safetensors");
        write_safetensors(&input, &[("direction.1".into(), vec![1.0, 2.0])]).unwrap();
        let mode = std::fs::metadata(&input).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644, "{mode:o}");
        let target = dir.path().join("target.txt");
        std::fs::write(&target, b"keep me").unwrap();
        let link = dir.path().join("link.gguf");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = convert(&input, &link, "t").unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        let err = convert(&input, Path::new("/dev/null"), "t").unwrap_err();
        assert!(err.to_string().contains("a device"), "{err}");
        // A regular file is replaced as before.
        let out = dir.path().join("out.gguf");
        std::fs::write(&out, b"old").unwrap();
        convert(&input, &out, "t").unwrap();
        assert_eq!(
            Directions::load(&out).unwrap(),
            Directions::load(&input).unwrap()
        );
    }
}
