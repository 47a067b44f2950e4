//! Steering: the steer spec (JSON), loading and validating what it names, and turning it into
//! per-layer additions for a batch whose rows may each carry a different spec.
//!
//! Static vectors are known before a step runs. Learned interventions ([`learned`]: L2S, W2S,
//! AutoSteer's prober) read a layer's output at prefill and decide each row's additions for the
//! later layers of the same pass, or switch on its refusal head. Rewrite graphs ([`field`]: SVF
//! fields, the refusal head) transform the state at a layer or before the LM head at every step.
//! [`PrefillSteering`] is the [`LayerHook`] of the prefill step; its [`PrefillSteering::decode`]
//! gives the [`DecodeSteering`] of every decode step.
//!
//! Layer L means the output of decoder block L (HF `hidden_states[L+1]`), as in repeng and
//! llama.cpp. The runtime adds each layer's summed delta inside that layer's graph
//! (`steer_delta` input), so activations never leave the execution provider to be steered.

//!
//! Modules, in the order data flows: [`spec`] (the JSON schema), [`resolve`] (files read, checked
//! and loaded against a model), [`files`], [`vector`] and [`gguf`] (file formats), [`learned`] and
//! [`field`] (the learned nets and rewrite graphs), [`batch`] (per-row steering of a batch).

pub mod batch;
pub mod field;
pub mod files;
pub mod gguf;
pub mod learned;
pub mod resolve;
pub mod spec;
pub mod vector;

use std::path::PathBuf;

pub use batch::{BatchSteering, DecodeSteering, PrefillSteering};
pub use learned::Decision;
pub use resolve::ResolvedSteering;
pub use spec::{
    AutoSteerIntervention, Intervention, L2sIntervention, Phase, Positions, SteerSpec,
    SvfIntervention, VectorIntervention, W2sIntervention,
};
pub use vector::Directions;

/// Why a steer spec or a file it names is unusable.
#[derive(Debug, thiserror::Error)]
pub enum SteerError {
    /// The spec file does not exist.
    #[error("steer spec {path} not found")]
    MissingSpec {
        /// The spec file.
        path: PathBuf,
    },
    /// The spec is not valid JSON for the schema.
    #[error("steer spec {path}: {message}")]
    Syntax {
        /// The spec file (or where an inline spec came from).
        path: PathBuf,
        /// What serde said.
        message: String,
    },
    /// One intervention of a spec is unusable; `source` says why.
    #[error("steer spec {spec}: intervention {index}: {source}")]
    Invalid {
        /// Where the spec came from.
        spec: String,
        /// The intervention's position in `interventions`.
        index: usize,
        /// Why it is unusable.
        #[source]
        source: Box<SteerError>,
    },
    /// A value breaks a rule of the schema or of the model (a layer out of range, a non-finite scale).
    #[error("{0}")]
    Rule(String),
    /// A file the spec names does not exist.
    #[error("{path} not found (paths are relative to the spec file)")]
    MissingFile {
        /// The file, resolved against the spec's directory.
        path: PathBuf,
    },
    /// A file exists but could not be read (permissions, a directory, an I/O error).
    #[error("could not read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error, with its kind.
        #[source]
        source: std::io::Error,
    },
    /// A vector file is malformed.
    #[error("vector file {path}: {message}")]
    VectorFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A file's sha256 differs from the one the spec pins.
    #[error("{path} has sha256 {actual}, the spec pins {expected}; retrain or fix the spec")]
    HashMismatch {
        /// The file.
        path: PathBuf,
        /// The pinned hash.
        expected: String,
        /// The file's hash.
        actual: String,
    },
    /// A learned net or rewrite graph does not load or has the wrong interface.
    #[error("steering net {path}: {message}")]
    Net {
        /// The graph file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
}

impl SteerError {
    /// Map an I/O error on `path` to [`SteerError::MissingFile`] when the file is not there, and
    /// to [`SteerError::Io`] (keeping its kind) otherwise.
    pub fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| match source.kind() {
            std::io::ErrorKind::NotFound => Self::MissingFile {
                path: path.to_path_buf(),
            },
            _ => Self::Io {
                path: path.to_path_buf(),
                source,
            },
        }
    }

    /// This error as the cause of intervention `index` of spec `spec` being unusable.
    pub(crate) fn in_intervention(self, spec: &str, index: usize) -> Self {
        Self::Invalid {
            spec: spec.to_string(),
            index,
            source: Box::new(self),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use super::*;
    use crate::bundle::ModelConfig;
    use crate::chain::{LayerHook, Site};

    fn config() -> ModelConfig {
        crate::bundle::manifest::tiny_config(4)
    }

    use crate::runtime::test_runtime as runtime;

    fn spec_with(
        dir: &Path,
        intervention: serde_json::Value,
    ) -> Result<ResolvedSteering, SteerError> {
        let text = serde_json::json!({ "interventions": [intervention] }).to_string();
        SteerSpec::parse(&text, dir, "test.json")?.resolve(&config(), runtime())
    }

    fn vector_dir(directions: &[(usize, Vec<f32>)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let named: Vec<(String, Vec<f32>)> = directions
            .iter()
            .map(|(l, v)| (format!("direction.{l}"), v.clone()))
            .collect();
        vector::write_safetensors(&dir.path().join("v.safetensors"), &named).unwrap();
        dir
    }

    #[test]
    fn unknown_kind_is_rejected() {
        let err = SteerSpec::parse(
            r#"{"interventions": [{"kind": "magic"}]}"#,
            Path::new("."),
            "s.json",
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown variant `magic`"), "{err}");
    }

    #[test]
    fn layer_out_of_range_is_rejected() {
        let dir = vector_dir(&[(1, vec![1.0, 0.0, 0.0])]);
        let err = spec_with(
            dir.path(),
            serde_json::json!({"kind": "vector", "path": "v.safetensors", "layers": [9]}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("layer 9 is out of range"), "{err}");
    }

    #[test]
    fn wrong_length_is_rejected() {
        let dir = vector_dir(&[(1, vec![1.0, 0.0])]);
        let err = spec_with(
            dir.path(),
            serde_json::json!({"kind": "vector", "path": "v.safetensors"}),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("length 2, the model's hidden size is 3"),
            "{err}"
        );
    }

    #[test]
    fn non_finite_values_are_rejected() {
        let dir = vector_dir(&[(2, vec![1.0, f32::NAN, 0.0])]);
        let err = spec_with(
            dir.path(),
            serde_json::json!({"kind": "vector", "path": "v.safetensors"}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("non-finite"), "{err}");
    }

    #[test]
    fn missing_file_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let err = spec_with(
            dir.path(),
            serde_json::json!({"kind": "vector", "path": "nope.gguf", "layers": [1]}),
        )
        .unwrap_err();
        assert!(matches!(err, SteerError::MissingFile { .. }), "{err}");
    }

    #[test]
    fn interventions_sum_per_layer_and_respect_positions() {
        let dir = vector_dir(&[(1, vec![1.0, 2.0, 3.0])]);
        let text = serde_json::json!({"interventions": [
            {"kind": "vector", "path": "v.safetensors", "scale": 2.0},
            {"kind": "vector", "path": "v.safetensors", "scale": -0.5, "positions": "generated"},
        ]})
        .to_string();
        let steering = SteerSpec::parse(&text, dir.path(), "s")
            .unwrap()
            .resolve(&config(), runtime())
            .unwrap();
        assert_eq!(steering.delta(1, Phase::Prefill), Some(vec![2.0, 4.0, 6.0]));
        assert_eq!(steering.delta(1, Phase::Decode), Some(vec![1.5, 3.0, 4.5]));
        assert_eq!(steering.delta(0, Phase::Decode), None);
    }

    #[test]
    fn composed_specs_act_as_one() {
        let dir = vector_dir(&[(1, vec![1.0, 2.0, 3.0])]);
        let part = |scale: f32| {
            spec_with(
                dir.path(),
                serde_json::json!({"kind": "vector", "path": "v.safetensors", "scale": scale}),
            )
            .unwrap()
        };
        let composed = ResolvedSteering::compose([part(1.0), part(2.0)]).unwrap();
        assert_eq!(composed.delta(1, Phase::Decode), Some(vec![3.0, 6.0, 9.0]));
        let mut decode = BatchSteering::uniform(Some(Arc::new(composed)), 1)
            .prefill(&config(), &[1])
            .decode();
        assert!(decode.steers() && !decode.rewrites(Site::Head));
        assert_eq!(
            decode.delta(1).unwrap().row(0).to_vec(),
            vec![3.0, 6.0, 9.0]
        );
    }

    /// A resolved spec adding (1, 1, 1) at layer 2.
    fn ones_at_layer_2() -> Arc<ResolvedSteering> {
        let dir = vector_dir(&[(2, vec![1.0, 1.0, 1.0])]);
        let spec = serde_json::json!({"kind": "vector", "path": "v.safetensors"});
        Arc::new(spec_with(dir.path(), spec).unwrap())
    }

    #[test]
    fn decode_steering_follows_rows_that_join_and_leave() {
        let steering = ones_at_layer_2();
        let decode = |rows: Vec<_>| {
            let lengths = vec![1; rows.len()];
            BatchSteering::new(rows)
                .prefill(&config(), &lengths)
                .decode()
        };
        let mut running = decode(vec![None]);
        running
            .append_rows(1, decode(vec![Some(steering), None]), 2)
            .unwrap();
        let layer2 = running.delta(2).unwrap().clone();
        assert_eq!(layer2.nrows(), 3);
        assert_eq!(layer2.row(1).to_vec(), vec![1.0; 3]);
        assert_eq!(layer2.row(2).to_vec(), vec![0.0; 3]);
        running.retain_rows(&[0, 2]);
        assert!(
            running.delta(2).is_none(),
            "no remaining row steers layer 2"
        );
        assert!(!running.steers());
    }

    #[test]
    fn normalize_holds_for_tiny_and_huge_vectors_and_refuses_zero() {
        for value in [1e-30f32, 1e20] {
            let dir = vector_dir(&[(0, vec![value; 3])]);
            let spec =
                serde_json::json!({"kind": "vector", "path": "v.safetensors", "normalize": true});
            let delta = spec_with(dir.path(), spec)
                .unwrap()
                .delta(0, Phase::Prefill)
                .unwrap();
            let norm = delta.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "{value}: {delta:?}");
        }
        let dir = vector_dir(&[(0, vec![0.0; 3])]);
        let spec =
            serde_json::json!({"kind": "vector", "path": "v.safetensors", "normalize": true});
        let err = spec_with(dir.path(), spec).unwrap_err();
        assert!(err.to_string().contains("is zero"), "{err}");
    }

    #[test]
    fn normalize_makes_unit_directions() {
        let dir = vector_dir(&[(0, vec![3.0, 0.0, 4.0])]);
        let steering = spec_with(dir.path(), serde_json::json!({"kind": "vector", "path": "v.safetensors", "normalize": true, "scale": 10.0})).unwrap();
        assert_eq!(steering.delta(0, Phase::Prefill), Some(vec![6.0, 0.0, 8.0]));
    }

    #[test]
    fn batch_rows_get_their_own_deltas() {
        let steering = ones_at_layer_2();
        let batch = BatchSteering::new(vec![None, Some(steering)]);
        let mut prefill = batch.prefill(&config(), &[1, 1]);
        assert!(prefill.delta(1).is_none());
        let layer2 = prefill.delta(2).unwrap().clone();
        assert_eq!(layer2.row(0).to_vec(), vec![0.0; 3]);
        assert_eq!(layer2.row(1).to_vec(), vec![1.0; 3]);
        let decode = prefill.decode();
        assert_eq!(decode.deltas().0[2].as_ref().unwrap(), layer2);
    }

    #[test]
    fn l2s_must_read_below_the_steered_layer() {
        let dir = tempfile::tempdir().unwrap();
        let err = spec_with(
            dir.path(),
            serde_json::json!({"kind": "l2s", "path": "net.onnx", "read_layer": 2, "layer": 2}),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("read_layer 2 must be below layer 2"),
            "{err}"
        );
    }

    #[test]
    fn learned_net_with_wrong_hash_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("net.onnx"), b"not a graph").unwrap();
        let err = spec_with(
            dir.path(),
            serde_json::json!({"kind": "l2s", "path": "net.onnx", "sha256": "00", "read_layer": 1, "layer": 2}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("the spec pins 00"), "{err}");
    }

    #[test]
    fn learned_net_that_is_not_onnx_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("router.onnx"), b"not a graph").unwrap();
        let vectors = vector_dir(&[(2, vec![1.0, 0.0, 0.0]), (3, vec![0.0, 1.0, 0.0])]);
        std::fs::copy(
            vectors.path().join("v.safetensors"),
            dir.path().join("bank.safetensors"),
        )
        .unwrap();
        let err = spec_with(
            dir.path(),
            serde_json::json!({"kind": "w2s", "router": "router.onnx", "bank": "bank.safetensors", "read_layer": 1}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("steering net"), "{err}");
        let err = spec_with(
            dir.path(),
            serde_json::json!({"kind": "w2s", "router": "router.onnx", "bank": "bank.safetensors", "read_layer": 2}),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("bank layer 2 is not above read_layer 2"),
            "{err}"
        );
    }

    #[test]
    fn a_scale_that_overflows_the_direction_is_refused() {
        let dir = vector_dir(&[(1, vec![1e20, 0.0, -3e19])]);
        let err = spec_with(
            dir.path(),
            serde_json::json!({"kind": "vector", "path": "v.safetensors", "scale": 1e20}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("overflows"), "{err}");
        // Each entry within the bound, their sum not: refused too.
        let dir = vector_dir(&[(1, vec![1.0, 0.5, 0.0])]);
        let text = serde_json::json!({"interventions": [
            {"kind": "vector", "path": "v.safetensors", "scale": 8e18},
            {"kind": "vector", "path": "v.safetensors", "scale": 8e18},
        ]})
        .to_string();
        let err = SteerSpec::parse(&text, dir.path(), "s")
            .unwrap()
            .resolve(&config(), runtime())
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("sum of the vectors added at layer 1 overflows"),
            "{err}"
        );
        // Finite but past where the next RMS norm overflows float32 (the model then runs on zeros).
        let err = spec_with(
            dir.path(),
            serde_json::json!({"kind": "vector", "path": "v.safetensors", "scale": 1e20}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("norm overflows float32"), "{err}");
    }

    #[test]
    fn thousands_of_entries_are_refused_and_repeats_hold_one_delta_per_layer() {
        let dir = vector_dir(&[(1, vec![1.0, 0.0, 0.0]), (2, vec![0.0, 1.0, 0.0])]);
        let entry = serde_json::json!({"kind": "vector", "path": "v.safetensors", "scale": 0.5});
        // The registration attack of issue 21: 20,600 entries naming one file.
        let many = serde_json::json!({"interventions": vec![entry.clone(); 20_600]}).to_string();
        let err = SteerSpec::parse(&many, dir.path(), "s").unwrap_err();
        assert!(
            err.to_string().contains("more than the limit of 64"),
            "{err}"
        );
        let most = serde_json::json!({"interventions": vec![entry; spec::MAX_INTERVENTIONS]});
        let steering = SteerSpec::parse(&most.to_string(), dir.path(), "s")
            .unwrap()
            .resolve(&config(), runtime())
            .unwrap();
        assert_eq!(steering.delta(1, Phase::Decode), Some(vec![32.0, 0.0, 0.0]));
        // Two layers, one delta each: memory does not grow with the entries.
        assert_eq!(steering.memory_bytes(), 2 * 3 * 4);
    }
}
