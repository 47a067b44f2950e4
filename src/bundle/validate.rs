//! Structural checks of a parsed manifest, so that everything after [`super::Bundle::open`] can
//! trust its sizes, segments and file names.

use super::manifest::{Manifest, SegmentKind, VisionPositions, FORMAT_VERSION};

/// The first problem found in a manifest, in words a user can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Written by another version of the exporter.
    #[error("format_version {found} is not supported (this runtime reads {FORMAT_VERSION}); re-export the bundle")]
    FormatVersion {
        /// The manifest's version.
        found: u32,
    },
    /// A model size is zero.
    #[error("model sizes (hidden_size, num_layers, head_dim, vocab_size) must be positive")]
    ZeroSize,
    /// Query heads do not split into the key-value groups.
    #[error("num_attention_heads {heads} must be a multiple of num_key_value_heads {kv_heads}")]
    HeadGroups {
        /// Query heads.
        heads: usize,
        /// Key-value heads.
        kv_heads: usize,
    },
    /// No token ends generation.
    #[error("model.eos_token_ids is empty")]
    NoEos,
    /// A segment that must occur once does not.
    #[error("expected exactly one {kind:?} segment, found {count}")]
    SegmentCount {
        /// The segment kind.
        kind: SegmentKind,
        /// How many there are.
        count: usize,
    },
    /// A layer segment without its index.
    #[error("layer segment {file} has no index")]
    LayerIndex {
        /// The segment's file.
        file: String,
    },
    /// Layer indices are not 0..num_layers, once each.
    #[error("layer segments must be numbered 0..{layers} once each, found {found:?}")]
    LayerNumbering {
        /// `model.num_layers`.
        layers: usize,
        /// The indices found, sorted.
        found: Vec<usize>,
    },
    /// A file the manifest uses is missing from its `files` table.
    #[error("{what} file {file} is not listed under \"files\"")]
    Unlisted {
        /// What uses it (segment, tokenizer, bundle).
        what: &'static str,
        /// The file name.
        file: String,
    },
    /// A size is beyond what any real model has (and would be allocated from).
    #[error("model.{field} = {value} is beyond the limit of {limit}")]
    SizeLimit {
        /// The field.
        field: &'static str,
        /// Its value.
        value: usize,
        /// The largest accepted.
        limit: usize,
    },
    /// A file name leaves the bundle directory or is not a plain relative path.
    #[error("file name {0:?} must be a relative path inside the bundle directory")]
    FileName(String),
    /// The vision section and the vision graphs disagree, or ask for what this runtime lacks.
    #[error("{0}")]
    Vision(String),
}

/// `name` is relative and names something below the bundle directory: no root, no `..`, no `.`,
/// no empty parts, no NUL.
fn is_plain_relative(name: &str) -> bool {
    use std::path::{Component, Path};
    !name.is_empty()
        && !name.contains('\0')
        && !name.contains("//")
        && !name.ends_with('/')
        && Path::new(name)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

impl Manifest {
    /// Structural checks; returns the first problem in words a user can act on.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.format_version != FORMAT_VERSION {
            return Err(ManifestError::FormatVersion {
                found: self.format_version,
            });
        }
        let m = &self.model;
        for (field, value, limit) in [
            ("hidden_size", m.hidden_size, 1 << 16),
            ("num_layers", m.num_layers, 1 << 10),
            ("num_attention_heads", m.num_attention_heads, 1 << 10),
            ("num_key_value_heads", m.num_key_value_heads, 1 << 10),
            ("head_dim", m.head_dim, 1 << 12),
            ("vocab_size", m.vocab_size, 1 << 22),
            (
                "max_position_embeddings",
                m.max_position_embeddings,
                1 << 22,
            ),
        ] {
            if value > limit {
                return Err(ManifestError::SizeLimit {
                    field,
                    value,
                    limit,
                });
            }
        }
        if let Some(name) = self.files.keys().find(|name| !is_plain_relative(name)) {
            return Err(ManifestError::FileName(name.clone()));
        }
        if m.hidden_size == 0 || m.num_layers == 0 || m.head_dim == 0 || m.vocab_size == 0 {
            return Err(ManifestError::ZeroSize);
        }
        if m.num_key_value_heads == 0
            || !m.num_attention_heads.is_multiple_of(m.num_key_value_heads)
        {
            return Err(ManifestError::HeadGroups {
                heads: m.num_attention_heads,
                kv_heads: m.num_key_value_heads,
            });
        }
        if m.eos_token_ids.is_empty() {
            return Err(ManifestError::NoEos);
        }
        for kind in [
            SegmentKind::Embed,
            SegmentKind::Positions,
            SegmentKind::Norm,
            SegmentKind::Head,
        ] {
            let count = self.segments.iter().filter(|s| s.kind == kind).count();
            if count != 1 {
                return Err(ManifestError::SegmentCount { kind, count });
            }
        }
        let mut indices: Vec<usize> = Vec::new();
        let layers = self
            .segments
            .iter()
            .filter(|s| s.kind == SegmentKind::Layer);
        for segment in layers {
            indices.push(segment.index.ok_or_else(|| ManifestError::LayerIndex {
                file: segment.file.clone(),
            })?);
        }
        indices.sort_unstable();
        if indices != (0..m.num_layers).collect::<Vec<_>>() {
            return Err(ManifestError::LayerNumbering {
                layers: m.num_layers,
                found: indices,
            });
        }
        let unlisted = |what, file: &String| {
            (!self.files.contains_key(file)).then(|| ManifestError::Unlisted {
                what,
                file: file.clone(),
            })
        };
        let segments = self.segments.iter().chain(self.monolithic.iter());
        let files = segments.flat_map(|s| s.files().map(|file| ("segment", file)));
        let tokenizer = [("tokenizer", &self.tokenizer.file)];
        let template = self
            .tokenizer
            .chat_template
            .iter()
            .map(|f| ("chat template", f));
        for (what, file) in files.chain(tokenizer).chain(template) {
            if let Some(problem) = unlisted(what, file) {
                return Err(problem);
            }
        }
        self.validate_vision()
    }

    /// A vision section needs its two graphs and 1-D positions; graphs without a section are unusable.
    fn validate_vision(&self) -> Result<(), ManifestError> {
        let count = |kind| self.segments.iter().filter(|s| s.kind == kind).count();
        let graphs = (count(SegmentKind::Vision), count(SegmentKind::Projector));
        let problem = match &self.vision {
            None if graphs == (0, 0) => return Ok(()),
            None => "vision or projector segments without a \"vision\" section".to_string(),
            Some(_) if graphs != (1, 1) => format!(
                "a vision bundle needs one vision and one projector segment, found {} and {}",
                graphs.0, graphs.1
            ),
            Some(vision) if vision.positions != VisionPositions::Sequential => format!(
                "vision.positions {:?} is not supported: this runtime runs 1-D (sequential) positions",
                vision.positions
            ),
            Some(vision) if vision.image_tokens == 0 => {
                "vision.image_tokens must be positive".to_string()
            }
            Some(_) => return Ok(()),
        };
        Err(ManifestError::Vision(problem))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest_json(layers: usize) -> serde_json::Value {
        let io = serde_json::json!([]);
        let mut segments = vec![
            serde_json::json!({"kind": "embed", "file": "embed.onnx", "inputs": io, "outputs": io}),
        ];
        let mut files = serde_json::json!({
            "embed.onnx": {"sha256": "00", "bytes": 1},
            "positions.onnx": {"sha256": "00", "bytes": 1},
            "norm.onnx": {"sha256": "00", "bytes": 1},
            "head.onnx": {"sha256": "00", "bytes": 1},
            "tokenizer.json": {"sha256": "00", "bytes": 1},
        });
        for i in 0..layers {
            let file = format!("layer_{i:02}.onnx");
            segments.push(serde_json::json!({"kind": "layer", "index": i, "file": file, "inputs": io, "outputs": io}));
            files[file] = serde_json::json!({"sha256": "00", "bytes": 1});
        }
        for kind in ["positions", "norm", "head"] {
            segments.push(serde_json::json!({"kind": kind, "file": format!("{kind}.onnx"), "inputs": io, "outputs": io}));
        }
        serde_json::json!({
            "format_version": FORMAT_VERSION, "name": "t", "dtype": "fp32",
            "model": {"architecture": "llama", "hidden_size": 8, "num_layers": layers, "num_attention_heads": 2,
                      "num_key_value_heads": 1, "head_dim": 4, "vocab_size": 10, "max_position_embeddings": 16,
                      "eos_token_ids": [2]},
            "tokenizer": {"file": "tokenizer.json"},
            "segments": segments, "files": files,
        })
    }

    fn parse(value: serde_json::Value) -> Manifest {
        serde_json::from_value(value).expect("test manifest parses")
    }

    #[test]
    fn valid_manifest_passes() {
        assert_eq!(parse(manifest_json(2)).validate(), Ok(()));
    }

    #[test]
    fn missing_layer_is_reported() {
        let mut value = manifest_json(3);
        value["model"]["num_layers"] = 4.into();
        let err = parse(value).validate().unwrap_err().to_string();
        assert!(err.contains("numbered 0..4"), "{err}");
    }

    #[test]
    fn unsupported_format_version_is_reported() {
        let mut value = manifest_json(1);
        value["format_version"] = 99.into();
        assert!(parse(value)
            .validate()
            .unwrap_err()
            .to_string()
            .contains("format_version 99"));
    }

    #[test]
    fn unlisted_segment_file_is_reported() {
        let mut value = manifest_json(1);
        value["files"].as_object_mut().unwrap().remove("head.onnx");
        assert!(parse(value)
            .validate()
            .unwrap_err()
            .to_string()
            .contains("head.onnx"));
    }

    #[test]
    fn bad_head_grouping_is_reported() {
        let mut value = manifest_json(1);
        value["model"]["num_key_value_heads"] = 3.into();
        assert!(parse(value)
            .validate()
            .unwrap_err()
            .to_string()
            .contains("multiple"));
    }

    #[test]
    fn absurd_sizes_are_refused_before_anything_is_allocated() {
        for (field, value) in [
            ("num_layers", serde_json::json!(1_000_000_000_000u64)),
            ("num_layers", serde_json::json!(u64::MAX)),
            ("hidden_size", serde_json::json!(1_000_000_000_000u64)),
            ("vocab_size", serde_json::json!(1u64 << 40)),
        ] {
            let mut value_json = manifest_json(1);
            value_json["model"][field] = value.clone();
            let err = parse(value_json).validate().unwrap_err().to_string();
            assert!(
                err.contains(field) && err.contains("limit"),
                "{field}={value}: {err}"
            );
        }
    }

    #[test]
    fn file_names_must_stay_inside_the_bundle() {
        for name in [
            "../../etc/hostname",
            "/etc/hostname",
            "a/../../b",
            "",
            "x\0y",
            "dir/",
        ] {
            let mut value = manifest_json(1);
            value["files"][name] = serde_json::json!({"sha256": "00", "bytes": 1});
            let err = parse(value).validate().unwrap_err();
            assert!(matches!(err, ManifestError::FileName(_)), "{name:?}: {err}");
        }
        // A chat template must be a listed file like every other.
        let mut value = manifest_json(1);
        value["tokenizer"]["chat_template"] = "/etc/hostname".into();
        let err = parse(value).validate().unwrap_err().to_string();
        assert!(
            err.contains("chat template file /etc/hostname is not listed"),
            "{err}"
        );
    }
}
