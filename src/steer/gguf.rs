//! The GGUF subset that control vectors use (repeng, llama.cpp): architecture `controlvector`,
//! one F32 tensor `direction.{layer}` per layer. Reads any GGUF v2/v3 metadata so files from other
//! writers load; writes exactly what `gguf.GGUFWriter` writes for repeng's export.

use std::collections::BTreeMap;
use std::io::Write;

/// Why a GGUF file could not be read as a control vector.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file does not start with the `GGUF` magic (holds the four bytes found).
    #[error("not a GGUF file (magic {0:?})")]
    Magic([u8; 4]),
    /// A GGUF version other than 2 or 3.
    #[error("GGUF version {0} is not supported (2 or 3)")]
    Version(u32),
    /// The file is truncated or its structure is inconsistent.
    #[error("GGUF is truncated or malformed: {0}")]
    Malformed(String),
    /// A tensor is not F32.
    #[error("tensor {name} has type {ggml_type}; control vectors must be F32 (type 0)")]
    TensorType {
        /// The tensor's name.
        name: String,
        /// Its GGML type id.
        ggml_type: u32,
    },
    /// Reading or writing the file failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

const MAGIC: &[u8; 4] = b"GGUF";
const ALIGNMENT: u64 = 32;
const GGML_TYPE_F32: u32 = 0;
const TYPE_UINT32: u32 = 4;
const TYPE_STRING: u32 = 8;
const TYPE_ARRAY: u32 = 9;
/// Deepest nesting of metadata arrays accepted: the reader descends once per level, so a crafted
/// file of nested array headers must not be able to exhaust the stack (real files nest at most 2).
const MAX_ARRAY_DEPTH: usize = 8;

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], GgufError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                GgufError::Malformed(format!("needs {n} bytes at offset {}", self.at))
            })?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }
    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn len(&mut self) -> Result<usize, GgufError> {
        let n = self.u64()?;
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.bytes.len())
            .ok_or_else(|| GgufError::Malformed(format!("length {n} exceeds the file")))
    }
    fn string(&mut self) -> Result<String, GgufError> {
        let n = self.len()?;
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| GgufError::Malformed("string is not UTF-8".into()))
    }
    /// Metadata value of GGUF type `ty` inside `depth` arrays; strings and u32s are kept, others
    /// are skipped.
    fn value(&mut self, ty: u32, depth: usize) -> Result<Option<MetaValue>, GgufError> {
        let fixed = match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            _ => 0,
        };
        match ty {
            TYPE_UINT32 => Ok(Some(MetaValue::U32(self.u32()?))),
            TYPE_STRING => Ok(Some(MetaValue::Str(self.string()?))),
            TYPE_ARRAY => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::Malformed(format!(
                        "metadata arrays nested deeper than {MAX_ARRAY_DEPTH} levels"
                    )));
                }
                let item = self.u32()?;
                let count = self.len()?;
                for _ in 0..count {
                    self.value(item, depth + 1)?;
                }
                Ok(None)
            }
            _ if fixed > 0 => {
                self.take(fixed)?;
                Ok(None)
            }
            _ => Err(GgufError::Malformed(format!("unknown metadata type {ty}"))),
        }
    }
}

/// A metadata value this module keeps.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// A `UINT32` value (`controlvector.layer_count`).
    U32(u32),
    /// A string value (`general.architecture`, `controlvector.model_hint`).
    Str(String),
}

/// A parsed control-vector GGUF: metadata it understands plus every F32 tensor, flattened.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GgufVectors {
    /// Metadata by key; values other than u32 and string are skipped when parsing.
    pub metadata: BTreeMap<String, MetaValue>,
    /// Every tensor by name (`direction.{layer}`), its F32 values flattened.
    pub tensors: BTreeMap<String, Vec<f32>>,
}

impl GgufVectors {
    /// Parse GGUF bytes; every tensor must be F32.
    pub fn parse(bytes: &[u8]) -> Result<Self, GgufError> {
        let mut c = Cursor { bytes, at: 0 };
        let magic: [u8; 4] = c.take(4)?.try_into().expect("4 bytes");
        if &magic != MAGIC {
            return Err(GgufError::Magic(magic));
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version(version));
        }
        let tensor_count = c.len()?;
        let kv_count = c.len()?;
        let mut metadata = BTreeMap::new();
        for _ in 0..kv_count {
            let key = c.string()?;
            let ty = c.u32()?;
            if let Some(value) = c.value(ty, 0)? {
                metadata.insert(key, value);
            }
        }
        let alignment = match metadata.get("general.alignment") {
            Some(MetaValue::U32(a)) if *a > 0 => *a as u64,
            _ => ALIGNMENT,
        };
        // A tensor entry takes at least 28 bytes, so a count the file cannot hold is refused here.
        if tensor_count > (bytes.len() - c.at) / 28 {
            return Err(GgufError::Malformed(format!(
                "{tensor_count} tensors cannot fit in the file"
            )));
        }
        let mut infos = Vec::with_capacity(tensor_count);
        for _ in 0..tensor_count {
            let name = c.string()?;
            let dims = c.u32()?;
            if dims != 1 {
                return Err(GgufError::Malformed(format!(
                    "tensor {name} has {dims} dimensions; a direction is one vector (1-D)"
                )));
            }
            let elements = c.u64()?;
            let ggml_type = c.u32()?;
            let offset = c.u64()?;
            if ggml_type != GGML_TYPE_F32 {
                return Err(GgufError::TensorType { name, ggml_type });
            }
            infos.push((name, elements, offset));
        }
        let data_start = (c.at as u64).div_ceil(alignment) * alignment;
        // Tensors must tile the data region without overlapping: otherwise a small file could name
        // the same bytes thousands of times and each copy would be allocated.
        let mut ranges: Vec<(u64, u64, &str)> = infos
            .iter()
            .map(|(name, elements, offset)| {
                (
                    *offset,
                    offset.saturating_add(elements.saturating_mul(4)),
                    name.as_str(),
                )
            })
            .collect();
        ranges.sort_unstable();
        for pair in ranges.windows(2) {
            if pair[1].0 < pair[0].1 {
                return Err(GgufError::Malformed(format!(
                    "tensors {} and {} overlap",
                    pair[0].2, pair[1].2
                )));
            }
        }
        let mut tensors = BTreeMap::new();
        for (name, elements, offset) in infos {
            let start = data_start.saturating_add(offset) as usize;
            let len = elements.saturating_mul(4) as usize;
            let raw = bytes.get(start..start.saturating_add(len)).ok_or_else(|| {
                GgufError::Malformed(format!("tensor {name} data is out of bounds"))
            })?;
            let values = raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect();
            if tensors.insert(name.clone(), values).is_some() {
                return Err(GgufError::Malformed(format!("tensor {name} occurs twice")));
            }
        }
        Ok(Self { metadata, tensors })
    }

    /// Write GGUF v3 with the given metadata and tensors (names sorted, 32-byte aligned data).
    pub fn write(&self, out: &mut impl Write) -> Result<(), GgufError> {
        let mut header = Vec::new();
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&3u32.to_le_bytes());
        header.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        header.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        let put_str = |buf: &mut Vec<u8>, s: &str| {
            buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
            buf.extend_from_slice(s.as_bytes());
        };
        for (key, value) in &self.metadata {
            put_str(&mut header, key);
            match value {
                MetaValue::U32(v) => {
                    header.extend_from_slice(&TYPE_UINT32.to_le_bytes());
                    header.extend_from_slice(&v.to_le_bytes());
                }
                MetaValue::Str(s) => {
                    header.extend_from_slice(&TYPE_STRING.to_le_bytes());
                    put_str(&mut header, s);
                }
            }
        }
        let mut offset = 0u64;
        for (name, values) in &self.tensors {
            put_str(&mut header, name);
            header.extend_from_slice(&1u32.to_le_bytes());
            header.extend_from_slice(&(values.len() as u64).to_le_bytes());
            header.extend_from_slice(&GGML_TYPE_F32.to_le_bytes());
            header.extend_from_slice(&offset.to_le_bytes());
            offset = (offset + values.len() as u64 * 4).div_ceil(ALIGNMENT) * ALIGNMENT;
        }
        header.resize(
            (header.len() as u64).div_ceil(ALIGNMENT) as usize * ALIGNMENT as usize,
            0,
        );
        out.write_all(&header)?;
        for values in self.tensors.values() {
            let mut data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            data.resize(
                (data.len() as u64).div_ceil(ALIGNMENT) as usize * ALIGNMENT as usize,
                0,
            );
            out.write_all(&data)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> GgufVectors {
        let mut v = GgufVectors::default();
        v.metadata.insert(
            "general.architecture".into(),
            MetaValue::Str("controlvector".into()),
        );
        v.metadata
            .insert("controlvector.layer_count".into(), MetaValue::U32(2));
        v.tensors
            .insert("direction.1".into(), vec![1.0, -2.5, 3.25]);
        v.tensors.insert("direction.2".into(), vec![0.5, 0.0, -1.0]);
        v
    }

    #[test]
    fn round_trip_is_exact() {
        let mut bytes = Vec::new();
        sample().write(&mut bytes).unwrap();
        assert_eq!(GgufVectors::parse(&bytes).unwrap(), sample());
    }

    #[test]
    fn truncated_file_is_an_error_not_a_panic() {
        let mut bytes = Vec::new();
        sample().write(&mut bytes).unwrap();
        // The last 20 bytes are alignment padding; cutting 24 reaches into tensor data.
        for cut in [3, 10, 40, bytes.len() - 24] {
            assert!(GgufVectors::parse(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn deeply_nested_metadata_arrays_are_an_error_not_a_stack_overflow() {
        let header = |levels: usize| {
            let mut bytes = b"GGUF".to_vec();
            bytes.extend(3u32.to_le_bytes());
            bytes.extend(0u64.to_le_bytes()); // tensors
            bytes.extend(1u64.to_le_bytes()); // metadata entries
            bytes.extend(1u64.to_le_bytes());
            bytes.push(b'k');
            bytes.extend(TYPE_ARRAY.to_le_bytes());
            for _ in 0..levels {
                bytes.extend(TYPE_ARRAY.to_le_bytes()); // items are arrays
                bytes.extend(1u64.to_le_bytes()); // one of them
            }
            bytes.extend(TYPE_UINT32.to_le_bytes());
            bytes.extend(1u64.to_le_bytes());
            bytes.extend(7u32.to_le_bytes());
            bytes
        };
        assert!(GgufVectors::parse(&header(3)).is_ok());
        // 55,000 levels aborted the process before (the attack of issue 21).
        let err = GgufVectors::parse(&header(55_000)).unwrap_err();
        assert!(err.to_string().contains("nested deeper"), "{err}");
    }

    #[test]
    fn wrong_magic_is_reported() {
        assert!(matches!(
            GgufVectors::parse(b"GGML\x03\0\0\0"),
            Err(GgufError::Magic(_))
        ));
    }

    #[test]
    fn tensors_that_share_their_bytes_are_refused() {
        let mut file = GgufVectors::default();
        file.tensors.insert("direction.1".into(), vec![1.0; 8]);
        file.tensors.insert("direction.2".into(), vec![2.0; 8]);
        let mut bytes = Vec::new();
        file.write(&mut bytes).unwrap();
        // Point the second tensor's offset (the last 8 bytes of its entry) at the first's data.
        let name = bytes.windows(11).position(|w| w == b"direction.2").unwrap();
        let offset_at = name + 11 + 4 + 8 + 4;
        bytes[offset_at..offset_at + 8].copy_from_slice(&0u64.to_le_bytes());
        let err = GgufVectors::parse(&bytes).unwrap_err();
        assert!(err.to_string().contains("overlap"), "{err}");
    }
}
