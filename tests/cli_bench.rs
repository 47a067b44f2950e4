//! `onnx-steer bench` end to end on the default bundle, scaled down: every variant is measured
//! and the in-run ratios are present and positive.

mod common;

use assert_cmd::Command;
use common::bundle_dir;

#[test]
fn bench_reports_every_variant_and_ratios() {
    let dir = tempfile::tempdir().unwrap();
    let vector = dir.path().join("v.safetensors");
    onnx_steer::steer::vector::write_safetensors(&vector, &[("direction".into(), vec![0.01; 576])])
        .unwrap();
    let spec = dir.path().join("spec.json");
    std::fs::write(
        &spec,
        r#"{"interventions": [{"kind": "vector", "path": "v.safetensors", "scale": 1.0, "layers": [12]}]}"#,
    )
    .unwrap();
    let out = dir.path().join("bench.json");
    Command::cargo_bin("onnx-steer")
        .unwrap()
        .args([
            "bench",
            "--batch",
            "1,2",
            "--prompt-tokens",
            "8",
            "--new-tokens",
            "4",
            "--repeats",
            "2",
            "--warmup",
            "0",
        ])
        .arg("--bundle")
        .arg(bundle_dir())
        .arg("--steer")
        .arg(&spec)
        .arg("--json")
        .arg(&out)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .assert()
        .success();
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let workloads = report["workloads"].as_array().unwrap();
    assert_eq!(workloads.len(), 2);
    for workload in workloads {
        let names: Vec<&str> = workload["variants"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["variant"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["segmented", "segmented+spec", "monolithic"]);
        for variant in workload["variants"].as_array().unwrap() {
            assert!(variant["decode_tokens_per_s"]["mean"].as_f64().unwrap() > 0.0);
            assert!(variant["prefill_tokens_per_s"]["mean"].as_f64().unwrap() > 0.0);
        }
        for ratio in [
            "decode_segmented+spec_over_segmented",
            "decode_segmented_over_monolithic",
        ] {
            assert!(workload["ratios"][ratio].as_f64().unwrap() > 0.0, "{ratio}");
        }
    }
    assert!(report["peak_rss_mib"].as_f64().unwrap() > 100.0);
}
