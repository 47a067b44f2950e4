//! `GET /metrics`: Prometheus text format. Requests by endpoint and status, generated tokens,
//! latency histograms, requests per steering spec, queue depth and batch size.

use crate::generate::KvUsage;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// The server's metrics, registered in their own registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    tokens: IntCounter,
    latency: HistogramVec,
    steering: IntCounterVec,
    queue_depth: IntGauge,
    batch_size: IntGauge,
    kv_slots: IntGauge,
    kv_slots_used: IntGauge,
    kv_positions_filled: IntGauge,
    kv_cache_bytes: IntGauge,
    prefix_lookup_tokens: IntGauge,
    prefix_hit_tokens: IntGauge,
    prefix_bytes: IntGauge,
    prefix_hit_rate: prometheus::Gauge,
}

impl Metrics {
    /// Create and register every metric.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("onnx_steer".into()), None)?;
        let requests = IntCounterVec::new(
            Opts::new("requests_total", "HTTP requests by endpoint and status"),
            &["endpoint", "status"],
        )?;
        let tokens = IntCounter::new("generated_tokens_total", "Tokens generated for requests")?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "request_seconds",
                "Time to a full response (to the first byte for streams)",
            )
            .buckets(prometheus::exponential_buckets(0.01, 2.0, 14)?),
            &["endpoint"],
        )?;
        let steering = IntCounterVec::new(
            Opts::new(
                "steering_requests_total",
                "Generation requests by steering spec",
            ),
            &["spec"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(tokens.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(steering.clone()))?;
        let gauge = |name: &str, help: &str| {
            let gauge = IntGauge::new(name, help)?;
            registry.register(Box::new(gauge.clone()))?;
            Ok::<_, prometheus::Error>(gauge)
        };
        let queue_depth = gauge("queue_depth", "Requests waiting for a batch slot")?;
        let batch_size = gauge("batch_size", "Rows in the running batch")?;
        let kv_slots = gauge("kv_slots", "KV cache slots (--max-batch)")?;
        let kv_slots_used = gauge("kv_slots_used", "KV cache slots held by running rows")?;
        let kv_positions_filled = gauge(
            "kv_positions_filled",
            "Positions the running rows have filled in their KV slots",
        )?;
        let kv_cache_bytes = gauge(
            "kv_cache_bytes",
            "Bytes of the KV cache's buffers, allocated once at start",
        )?;
        let prefix_lookup_tokens = gauge(
            "prefix_cache_lookup_tokens",
            "Prompt tokens of requests whose prefix could be reused, since start",
        )?;
        let prefix_hit_tokens = gauge(
            "prefix_cache_hit_tokens",
            "Prompt tokens whose KV came from the prefix cache instead of a prefill, since start",
        )?;
        let prefix_bytes = gauge("prefix_cache_bytes", "Bytes the prefix cache holds")?;
        let prefix_hit_rate = prometheus::Gauge::new(
            "prefix_cache_hit_rate",
            "Share of looked-up prompt tokens served from the prefix cache, since start",
        )?;
        registry.register(Box::new(prefix_hit_rate.clone()))?;
        Ok(Self {
            registry,
            requests,
            tokens,
            latency,
            steering,
            queue_depth,
            batch_size,
            kv_slots,
            kv_slots_used,
            kv_positions_filled,
            kv_cache_bytes,
            prefix_lookup_tokens,
            prefix_hit_tokens,
            prefix_bytes,
            prefix_hit_rate,
        })
    }

    /// A finished request: its endpoint, status and duration.
    pub fn request(&self, endpoint: &str, status: u16, seconds: f64) {
        self.requests
            .with_label_values(&[endpoint, &status.to_string()])
            .inc();
        self.latency.with_label_values(&[endpoint]).observe(seconds);
    }

    /// Tokens a request generated.
    pub fn tokens(&self, count: usize) {
        self.tokens.inc_by(count as u64);
    }

    /// Drop the series of a spec that was deleted, so that deleted names do not pile up.
    pub fn forget_steering(&self, spec: &str) {
        let _ = self.steering.remove_label_values(&[spec]);
    }

    /// A generation request with this steering (`none`, `inline`, or a registered name).
    pub fn steering(&self, spec: &str) {
        self.steering.with_label_values(&[spec]).inc();
    }

    /// The text exposition, with the engine's current queue depth, batch size and KV slots.
    pub fn render(&self, queue_depth: usize, batch_size: usize, kv: KvUsage) -> String {
        let prefix = kv.prefix;
        let gauges = [
            (&self.queue_depth, queue_depth as u64),
            (&self.batch_size, batch_size as u64),
            (&self.kv_slots, kv.slots as u64),
            (&self.kv_slots_used, kv.used_slots as u64),
            (&self.kv_positions_filled, kv.filled_positions as u64),
            (&self.kv_cache_bytes, kv.bytes as u64),
            (&self.prefix_bytes, prefix.bytes as u64),
            (&self.prefix_lookup_tokens, prefix.lookup_tokens),
            (&self.prefix_hit_tokens, prefix.hit_tokens),
        ];
        for (gauge, value) in gauges {
            gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        }
        self.prefix_hit_rate
            .set(prefix.hit_tokens as f64 / prefix.lookup_tokens.max(1) as f64);
        let mut buffer = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::error!("encoding metrics: {e}");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}
