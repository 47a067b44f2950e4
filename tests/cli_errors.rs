//! Bad input through the real CLI: each case must end in a one-line error that says what to fix,
//! with exit code 1 (never a panic). Uses the default bundle that `make bundle` exports.

use std::path::Path;

mod common;

use assert_cmd::Command;
use common::bundle_dir;
use predicates::prelude::*;

fn onnx_steer() -> Command {
    let mut cmd = Command::cargo_bin("onnx-steer").expect("binary builds");
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    cmd
}

/// A copy of the default bundle (files hard-linked, or copied across file systems: a bundle's files
/// must be regular files inside it) with an edited manifest and some files left out.
fn altered_bundle(
    edit: impl FnOnce(&mut serde_json::Value),
    leave_out: &[&str],
) -> tempfile::TempDir {
    let source = bundle_dir();
    let dir = tempfile::tempdir().expect("temp dir");
    let text = std::fs::read_to_string(source.join("manifest.json")).expect("manifest readable");
    let mut manifest: serde_json::Value = serde_json::from_str(&text).expect("manifest parses");
    for name in manifest["files"].as_object().expect("files map").keys() {
        if !leave_out.contains(&name.as_str()) {
            let (from, to) = (source.join(name), dir.path().join(name));
            if std::fs::hard_link(&from, &to).is_err() {
                std::fs::copy(&from, &to).expect("copy a bundle file");
            }
        }
    }
    edit(&mut manifest);
    std::fs::write(dir.path().join("manifest.json"), manifest.to_string()).expect("write manifest");
    dir
}

/// Runs generate and returns stderr, asserting exit code 1 and a single `error:` line.
fn generate_error(cmd: &mut Command) -> String {
    let output = cmd.output().expect("runs");
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "expected one error line, got: {stderr}");
    stderr
}

fn generate_in(bundle: &Path) -> Command {
    let mut cmd = onnx_steer();
    cmd.args([
        "generate",
        "--max-new-tokens",
        "2",
        "--prompt",
        "Hello",
        "--bundle",
    ])
    .arg(bundle);
    cmd
}

#[test]
fn missing_bundle_dir() {
    let stderr = generate_error(&mut generate_in(Path::new("/nonexistent/bundle")));
    assert!(
        stderr.contains("does not exist") && stderr.contains("onnx_steer_export export"),
        "{stderr}"
    );
}

#[test]
fn corrupt_manifest() {
    let bundle = altered_bundle(|_| {}, &[]);
    std::fs::write(
        bundle.path().join("manifest.json"),
        "{\"format_version\": 1, \"name\": ",
    )
    .unwrap();
    let stderr = generate_error(&mut generate_in(bundle.path()));
    assert!(
        stderr.contains("manifest") && stderr.contains("not valid"),
        "{stderr}"
    );
}

#[test]
fn manifest_with_missing_layer_entry() {
    let bundle = altered_bundle(
        |m| {
            let segments = m["segments"].as_array_mut().unwrap();
            segments.retain(|s| s["index"] != 7);
        },
        &[],
    );
    let stderr = generate_error(&mut generate_in(bundle.path()));
    assert!(stderr.contains("numbered 0..30"), "{stderr}");
}

#[test]
fn sha256_mismatch() {
    let bundle = altered_bundle(
        |m| m["files"]["layer_03.onnx"]["sha256"] = "0".repeat(64).into(),
        &[],
    );
    let stderr = generate_error(&mut generate_in(bundle.path()));
    assert!(
        stderr.contains("layer_03.onnx is corrupt") && stderr.contains("sha256"),
        "{stderr}"
    );
    let inspect = onnx_steer()
        .args(["inspect", "--bundle"])
        .arg(bundle.path())
        .output()
        .unwrap();
    assert_eq!(inspect.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&inspect.stderr).contains("sha256"));
}

#[test]
fn absurd_manifest_sizes_are_errors_not_aborts() {
    // Each used to abort the process (allocation failure, capacity overflow) or pre-size a read
    // buffer from the claim.
    type Edit = fn(&mut serde_json::Value);
    let edits: [(&str, Edit); 4] = [
        ("num_layers", |m| {
            m["model"]["num_layers"] = 1_000_000_000_000u64.into()
        }),
        ("num_layers", |m| m["model"]["num_layers"] = u64::MAX.into()),
        ("hidden_size", |m| {
            m["model"]["hidden_size"] = 1_000_000_000_000u64.into()
        }),
        ("the manifest says 1000000000000", |m| {
            m["files"]["layer_00.onnx"]["bytes"] = 1_000_000_000_000u64.into()
        }),
    ];
    for (what, edit) in edits {
        let bundle = altered_bundle(edit, &[]);
        let stderr = generate_error(&mut generate_in(bundle.path()));
        assert!(stderr.contains(what), "{what}: {stderr}");
    }
}

#[test]
fn bundle_files_are_confined_and_verified_where_they_are_used() {
    // A segment named outside the bundle.
    let bundle = altered_bundle(
        |m| {
            let entry = m["files"]["head.onnx"].clone();
            m["files"]["../../../../etc/hostname"] = entry;
            m["segments"]
                .as_array_mut()
                .unwrap()
                .iter_mut()
                .for_each(|s| {
                    if s["kind"] == "head" {
                        s["file"] = "../../../../etc/hostname".into();
                    }
                });
        },
        &[],
    );
    let stderr = generate_error(&mut generate_in(bundle.path()));
    assert!(
        stderr.contains("must be a relative path inside the bundle"),
        "{stderr}"
    );

    // A tampered tokenizer: `inspect` called it corrupt while `generate` used it.
    let bundle = altered_bundle(|_| {}, &[]);
    let tokenizer = bundle.path().join("tokenizer.json");
    let text = std::fs::read_to_string(&tokenizer).unwrap();
    // Replace the link with a new file: writing through it would change the real bundle.
    std::fs::remove_file(&tokenizer).unwrap();
    std::fs::write(&tokenizer, text.replacen("\"Hello\"", "\"Jello\"", 1)).unwrap();
    let stderr = generate_error(&mut generate_in(bundle.path()));
    assert!(stderr.contains("tokenizer.json is corrupt"), "{stderr}");

    // A chat template that is a link to a device (/dev/zero read 4.2 GB before).
    let bundle = altered_bundle(|_| {}, &["chat_template.jinja"]);
    std::os::unix::fs::symlink("/dev/zero", bundle.path().join("chat_template.jinja")).unwrap();
    let stderr = generate_error(generate_in(bundle.path()).arg("--chat"));
    assert!(
        stderr.contains("not a regular file inside the bundle"),
        "{stderr}"
    );
}

#[test]
fn missing_onnx_file() {
    let bundle = altered_bundle(|_| {}, &["layer_05.onnx"]);
    let stderr = generate_error(&mut generate_in(bundle.path()));
    assert!(stderr.contains("layer_05.onnx is missing"), "{stderr}");
}

#[test]
fn missing_onnx_runtime_library() {
    let stderr = generate_error(
        generate_in(&bundle_dir()).env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so"),
    );
    assert!(
        stderr.contains("ONNX Runtime library not found") && stderr.contains("ORT_DYLIB_PATH"),
        "{stderr}"
    );
}

#[test]
fn unknown_provider_is_rejected_by_the_parser() {
    onnx_steer()
        .args(["generate", "--ep", "rocm", "--prompt", "x", "--bundle"])
        .arg(bundle_dir())
        .assert()
        .code(2)
        .stderr(
            predicate::str::contains("invalid value 'rocm'").and(predicate::str::contains("cpu")),
        );
}

#[test]
fn unavailable_provider_fails_clearly_or_falls_back() {
    // The venv's onnxruntime wheel is the CPU build, so CUDA cannot be registered here.
    let stderr = generate_error(generate_in(&bundle_dir()).args(["--ep", "cuda"]));
    assert!(
        stderr.contains("cuda is not available") && stderr.contains("--ep-fallback cpu"),
        "{stderr}"
    );
    onnx_steer()
        .args([
            "generate",
            "--max-new-tokens",
            "2",
            "--prompt",
            "Hello",
            "--ep",
            "tensorrt",
            "--ep-fallback",
            "cpu",
            "--bundle",
        ])
        .arg(bundle_dir())
        .assert()
        .success()
        .stderr(predicate::str::contains("falling back to cpu"));
}

#[test]
fn prompt_longer_than_context() {
    let long = "hello ".repeat(9000);
    let mut cmd = onnx_steer();
    cmd.args(["generate", "--prompt", &long, "--bundle"])
        .arg(bundle_dir());
    let stderr = generate_error(&mut cmd);
    assert!(
        stderr.contains("context is 8192") && stderr.contains("shorten"),
        "{stderr}"
    );
}

#[test]
fn empty_prompts_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prompts.txt");
    std::fs::write(&file, "\n  \n").unwrap();
    let mut cmd = onnx_steer();
    cmd.args(["generate", "--bundle"])
        .arg(bundle_dir())
        .arg("--prompts-file")
        .arg(&file);
    let stderr = generate_error(&mut cmd);
    assert!(stderr.contains("has no prompts"), "{stderr}");
}

#[test]
fn inspect_prints_a_summary() {
    onnx_steer()
        .args(["inspect", "--bundle"])
        .arg(bundle_dir())
        .assert()
        .success()
        .stdout(
            predicate::str::contains("30 layers").and(predicate::str::contains("sha256 verified")),
        );
}

#[test]
fn verified_files_are_stamped_and_a_changed_weights_file_is_hashed_again() {
    let bundle = altered_bundle(|_| {}, &[]);
    generate_in(bundle.path()).assert().success();
    let stamps: serde_json::Value = serde_json::from_slice(
        &std::fs::read(bundle.path().join(onnx_steer::bundle::STAMPS_FILE)).expect("stamps"),
    )
    .expect("stamps parse");
    let weights = "layer_03.onnx.data";
    assert!(stamps.get(weights).is_some(), "{stamps}");

    // The same size, one byte changed: the stamp no longer vouches for it, so it is hashed.
    let path = bundle.path().join(weights);
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    std::fs::remove_file(&path).unwrap(); // a hard link to the real bundle: replace, never write
    std::fs::write(&path, bytes).unwrap();
    let stderr = generate_error(&mut generate_in(bundle.path()));
    assert!(
        stderr.contains(&format!("{weights} is corrupt")),
        "{stderr}"
    );

    // `inspect --verify` hashes every file, stamps or not.
    onnx_steer()
        .args(["inspect", "--verify", "--bundle"])
        .arg(bundle_dir())
        .assert()
        .success()
        .stdout(predicate::str::contains("every file hashed now"));
}

fn spec_error(spec: serde_json::Value, vector: Option<(&str, Vec<f32>)>) -> String {
    let dir = tempfile::tempdir().unwrap();
    if let Some((name, values)) = vector {
        onnx_steer::steer::vector::write_safetensors(
            &dir.path().join("v.safetensors"),
            &[(name.to_string(), values)],
        )
        .unwrap();
    }
    let path = dir.path().join("spec.json");
    std::fs::write(&path, spec.to_string()).unwrap();
    generate_error(generate_in(&bundle_dir()).arg("--steer").arg(&path))
}

#[test]
fn bad_steer_specs_are_rejected_before_loading_the_model() {
    let stderr = spec_error(
        serde_json::json!({"interventions": [{"kind": "telepathy"}]}),
        None,
    );
    assert!(stderr.contains("unknown variant `telepathy`"), "{stderr}");
    let stderr = spec_error(
        serde_json::json!({"interventions": [{"kind": "vector", "path": "v.safetensors", "layers": [30]}]}),
        Some(("direction", vec![0.0; 576])),
    );
    assert!(stderr.contains("layer 30 is out of range"), "{stderr}");
    let stderr = spec_error(
        serde_json::json!({"interventions": [{"kind": "vector", "path": "v.safetensors", "layers": [3]}]}),
        Some(("direction", vec![0.0; 100])),
    );
    assert!(
        stderr.contains("length 100") && stderr.contains("576"),
        "{stderr}"
    );
    let mut poisoned = vec![0.0; 576];
    poisoned[7] = f32::INFINITY;
    let stderr = spec_error(
        serde_json::json!({"interventions": [{"kind": "vector", "path": "v.safetensors", "layers": [3]}]}),
        Some(("direction", poisoned)),
    );
    assert!(
        stderr.contains("non-finite") && stderr.contains("index 7"),
        "{stderr}"
    );
    let stderr = spec_error(
        serde_json::json!({"interventions": [{"kind": "vector", "path": "missing.gguf", "layers": [3]}]}),
        None,
    );
    assert!(stderr.contains("missing.gguf not found"), "{stderr}");
    let stderr =
        generate_error(generate_in(&bundle_dir()).args(["--steer", "/nonexistent/spec.json"]));
    assert!(
        stderr.contains("steer spec /nonexistent/spec.json not found"),
        "{stderr}"
    );
}
