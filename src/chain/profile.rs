//! Wall time per segment of the chain, split into prefill and decode steps: where a token's time
//! goes, for `onnx-steer bench` and for deciding what to optimise next.
//!
//! Timing is off unless [`crate::chain::CausalLm::start_profile`] turned it on; then each session
//! run and each steering call is bracketed by two clock reads (tens of nanoseconds).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

/// The part of a step spent in steering hooks (deltas, reads and rewrites).
pub const STEERING: &str = "steering";
/// The part of a step outside every session run and hook: tensor conversion and bookkeeping.
pub const OTHER: &str = "other";

#[derive(Debug, Clone, Default)]
struct PhaseTimes {
    steps: usize,
    forward: Duration,
    parts: BTreeMap<String, Duration>,
}

impl PhaseTimes {
    fn summary(&self) -> PhaseProfile {
        let steps = self.steps.max(1) as f64;
        let ms = |d: Duration| d.as_secs_f64() * 1e3 / steps;
        let mut ms_per_step: BTreeMap<String, f64> = self
            .parts
            .iter()
            .map(|(part, took)| (part.clone(), ms(*took)))
            .collect();
        let inside: Duration = self.parts.values().sum();
        ms_per_step.insert(OTHER.into(), ms(self.forward.saturating_sub(inside)));
        PhaseProfile {
            steps: self.steps,
            step_ms: ms(self.forward),
            ms_per_step,
        }
    }
}

/// Accumulated segment timings; [`SegmentProfile::summary`] turns them into milliseconds per step.
#[derive(Debug, Clone, Default)]
pub struct SegmentProfile {
    prefill: PhaseTimes,
    decode: PhaseTimes,
}

impl SegmentProfile {
    fn phase(&mut self, decode: bool) -> &mut PhaseTimes {
        if decode {
            &mut self.decode
        } else {
            &mut self.prefill
        }
    }

    /// Run `work` and add its wall time to `part` (a segment file name, or [`STEERING`]).
    pub fn time<T>(&mut self, decode: bool, part: &str, work: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        let out = work();
        let took = started.elapsed();
        let parts = &mut self.phase(decode).parts;
        match parts.get_mut(part) {
            Some(total) => *total += took,
            None => {
                parts.insert(part.to_string(), took);
            }
        }
        out
    }

    /// Count one whole forward step of `took`.
    pub fn add_step(&mut self, decode: bool, took: Duration) {
        let phase = self.phase(decode);
        phase.steps += 1;
        phase.forward += took;
    }

    /// Milliseconds per step of each part, for prefill and decode.
    pub fn summary(&self) -> ProfileSummary {
        ProfileSummary {
            prefill: self.prefill.summary(),
            decode: self.decode.summary(),
        }
    }
}

/// [`SegmentProfile::time`] when profiling is on, a plain call when it is off.
pub fn time_if<T>(
    profile: &mut Option<SegmentProfile>,
    decode: bool,
    part: &str,
    work: impl FnOnce() -> T,
) -> T {
    match profile {
        Some(profile) => profile.time(decode, part, work),
        None => work(),
    }
}

/// One phase's breakdown: whole-step time and each part's share, in milliseconds per step.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseProfile {
    /// Forward steps measured in this phase.
    pub steps: usize,
    /// Mean wall time of a whole step, in milliseconds.
    pub step_ms: f64,
    /// Keyed by segment file (`layer_07.onnx`), [`STEERING`] and [`OTHER`]; parts sum to `step_ms`.
    pub ms_per_step: BTreeMap<String, f64>,
}

impl PhaseProfile {
    /// One line for a terminal: every decoder layer summed as `layers`, the other parts by name.
    pub fn one_line(&self) -> String {
        let is_layer = |part: &str| part.starts_with("layer_");
        let layers: Vec<f64> = self
            .ms_per_step
            .iter()
            .filter(|(part, _)| is_layer(part))
            .map(|(_, ms)| *ms)
            .collect();
        let mut line = format!("{:.3} ms/step =", self.step_ms);
        if !layers.is_empty() {
            let total: f64 = layers.iter().sum();
            line += &format!(
                " {} layers {total:.3} ({:.3} each)",
                layers.len(),
                total / layers.len() as f64
            );
        }
        for (part, ms) in self.ms_per_step.iter().filter(|(part, _)| !is_layer(part)) {
            let name = part.strip_suffix(".onnx").unwrap_or(part);
            line += &format!(" + {name} {ms:.3}");
        }
        line
    }
}

/// Prefill and decode breakdowns of one profiled run.
#[derive(Debug, Clone, Serialize)]
pub struct ProfileSummary {
    /// Prefill steps (whole prompts).
    pub prefill: PhaseProfile,
    /// Decode steps (one new token per row).
    pub decode: PhaseProfile,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_and_other_add_up_to_the_step() {
        let mut profile = SegmentProfile::default();
        profile.time(true, "layer_00.onnx", || {
            std::thread::sleep(Duration::from_millis(2))
        });
        profile.time(true, STEERING, || ());
        profile.add_step(true, Duration::from_millis(5));
        profile.add_step(true, Duration::from_millis(5));
        let decode = profile.summary().decode;
        assert_eq!(decode.steps, 2);
        assert!((decode.step_ms - 5.0).abs() < 1e-9);
        let sum: f64 = decode.ms_per_step.values().sum();
        assert!(
            (sum - decode.step_ms).abs() < 1e-6,
            "{sum} vs {}",
            decode.step_ms
        );
        assert!(decode.ms_per_step["layer_00.onnx"] >= 1.0);
        assert_eq!(profile.summary().prefill.steps, 0);
        let line = decode.one_line();
        assert!(line.starts_with("5.000 ms/step = 1 layers"), "{line}");
        assert!(
            line.contains("+ steering") && line.contains("+ other"),
            "{line}"
        );
    }

    #[test]
    fn off_means_no_record() {
        let mut profile: Option<SegmentProfile> = None;
        assert_eq!(time_if(&mut profile, true, "embed.onnx", || 7), 7);
        assert!(profile.is_none());
    }
}
