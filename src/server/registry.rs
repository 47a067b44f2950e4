//! Steering specs the server knows: the registered ones by name (`--steer-dir`, `POST
//! /v1/steering`), and inline specs resolved once per distinct content. Inline specs may only name
//! files inside the steering directory ([`confine`]). Resolution reads files, hashes them and
//! builds ONNX sessions, so it always runs on a blocking thread.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use sha2::{Digest, Sha256};

use super::error::ApiError;
use crate::bundle::ModelConfig;
use crate::runtime::Runtime;
use crate::steer::files::MAX_NET_FILE_BYTES;
use crate::steer::{ResolvedSteering, SteerError, SteerSpec};

/// Resolved inline specs kept, most recent first; older ones are resolved again when they return.
const INLINE_CACHE: usize = 64;
/// Most specs registered at once (`--steer-dir` files and `POST /v1/steering`).
pub const MAX_REGISTERED: usize = 256;
/// Inline specs resolved (files read, sessions built) at the same time; the others wait.
const RESOLVING: usize = 2;

/// Every path a spec names must lie inside the steering directory (after following links).
pub fn confine(spec: &SteerSpec, dir: &Path) -> Result<(), ApiError> {
    let root = dir
        .canonicalize()
        .map_err(|_| ApiError::bad_request("the server's steering directory is unreadable"))?;
    for (_, path) in spec.interventions.iter().flat_map(|entry| entry.paths()) {
        let inside = root
            .join(path)
            .canonicalize()
            .map(|p| p.starts_with(&root))
            .unwrap_or(false);
        if !inside {
            return Err(ApiError::bad_request(format!(
                "steering file {:?} is not a file inside the server's steering directory",
                path.display().to_string()
            )));
        }
    }
    Ok(())
}

/// What resolving needs, shared with the blocking threads that do it.
struct Resolver {
    config: ModelConfig,
    runtime: Arc<Runtime>,
    steer_dir: Option<PathBuf>,
}

impl Resolver {
    /// Parse, confine and resolve an inline spec, `text` being `spec` as JSON (blocking: reads
    /// files, builds sessions).
    fn inline(
        &self,
        spec: &serde_json::Value,
        text: &str,
        room: usize,
    ) -> Result<ResolvedSteering, ApiError> {
        let dir = self.steer_dir.as_deref().ok_or_else(|| {
            ApiError::bad_request("inline steering specs need the server to run with --steer-dir")
        })?;
        if !spec.get("interventions").is_some_and(|v| v.is_array()) {
            return Err(ApiError::bad_request(
                "an inline steering spec needs \"interventions\"",
            ));
        }
        let parsed = SteerSpec::parse(text, dir, "request steering")
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        confine(&parsed, dir)?;
        // Sized from the files before any is read: a spec too big for the budget costs nothing.
        let files: std::collections::BTreeSet<PathBuf> = parsed
            .interventions
            .iter()
            .flat_map(|entry| entry.paths())
            .map(|(_, path)| dir.join(path))
            .collect();
        // Files past the readers' own limits are left to them: they refuse them with that reason.
        let size: u64 = files
            .iter()
            .filter_map(|path| std::fs::metadata(path).ok())
            .map(|m| m.len())
            .filter(|&len| len <= MAX_NET_FILE_BYTES)
            .sum();
        if size > room as u64 {
            return Err(insufficient(format!(
                "the files this spec names hold {size} bytes; {room} of the steering memory \
                 budget are free (serve --steering-memory-mb)"
            )));
        }
        parsed
            .resolve(&self.config, &self.runtime)
            .map_err(|e| ApiError::bad_request(e.to_string()))
    }
}

/// Named and inline steering specs, resolved and ready to share across requests.
pub struct SteeringRegistry {
    resolver: Arc<Resolver>,
    /// Bytes registered and cached specs may hold together ([`ResolvedSteering::memory_bytes`]).
    memory_budget: usize,
    /// Permits to resolve an inline spec ([`RESOLVING`]).
    resolving: tokio::sync::Semaphore,
    named: RwLock<HashMap<String, Arc<ResolvedSteering>>>,
    /// Inline specs by the sha256 of their JSON, most recently used first.
    inline: Mutex<VecDeque<([u8; 32], Arc<ResolvedSteering>)>>,
}

/// 507: the spec would not fit in what the server keeps.
fn insufficient(message: String) -> ApiError {
    ApiError::new(axum::http::StatusCode::INSUFFICIENT_STORAGE, message)
}

fn poisoned() -> ApiError {
    ApiError::internal("steering registry lock poisoned")
}

impl SteeringRegistry {
    /// A registry with every `*.json` spec of `steer_dir` registered under its file stem (files
    /// that are not specs, such as labels or reports, are skipped with a warning).
    pub fn new(
        config: ModelConfig,
        runtime: Arc<Runtime>,
        steer_dir: Option<PathBuf>,
        memory_budget: usize,
    ) -> Result<Self, SteerError> {
        let registry = Self {
            memory_budget,
            resolving: tokio::sync::Semaphore::new(RESOLVING),
            resolver: Arc::new(Resolver {
                config,
                runtime,
                steer_dir,
            }),
            named: RwLock::new(HashMap::new()),
            inline: Mutex::new(VecDeque::new()),
        };
        let Some(dir) = registry.resolver.steer_dir.clone() else {
            return Ok(registry);
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(SteerError::io(&dir))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.extension().is_some_and(|e| e == "json"))
            .collect();
        files.sort();
        for path in files {
            let Some(name) = path.file_stem().map(|s| s.to_string_lossy().into_owned()) else {
                continue;
            };
            let resolved = SteerSpec::load(&path).and_then(|spec| {
                spec.resolve(&registry.resolver.config, &registry.resolver.runtime)
            });
            let registered = match resolved {
                Ok(resolved) => registry
                    .register(name, Arc::new(resolved))
                    .map_err(|e| e.message),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = registered {
                tracing::warn!("not registering {}: {e}", path.display());
            }
        }
        Ok(registry)
    }

    /// The registered names, sorted.
    pub fn names(&self) -> Result<Vec<String>, ApiError> {
        let named = self.named.read().map_err(|_| poisoned())?;
        let mut names: Vec<String> = named.keys().cloned().collect();
        names.sort();
        Ok(names)
    }

    /// The spec registered as `name`.
    pub fn named(&self, name: &str) -> Result<Arc<ResolvedSteering>, ApiError> {
        let named = self.named.read().map_err(|_| poisoned())?;
        named.get(name).cloned().ok_or_else(|| {
            ApiError::not_found(format!(
                "no steering spec named {name:?} is registered (GET /v1/steering lists them)"
            ))
        })
    }

    /// Register (or replace) `name`; returns whether it replaced one. Requests in flight keep the
    /// version they started with.
    /// Refused (507) beyond [`MAX_REGISTERED`] specs or the steering memory budget.
    pub fn register(&self, name: String, spec: Arc<ResolvedSteering>) -> Result<bool, ApiError> {
        let mut named = self.named.write().map_err(|_| poisoned())?;
        let replaces = named.contains_key(&name);
        if !replaces && named.len() >= MAX_REGISTERED {
            return Err(insufficient(format!(
                "{MAX_REGISTERED} steering specs are registered, the most this server keeps; \
                 delete one first"
            )));
        }
        let others: usize = named
            .iter()
            .filter(|(n, _)| **n != name)
            .map(|(_, s)| s.memory_bytes())
            .sum();
        let total = others + spec.memory_bytes();
        if total > self.memory_budget {
            return Err(insufficient(format!(
                "registering this spec would hold {total} bytes of steering, more than the \
                 budget of {} (serve --steering-memory-mb)",
                self.memory_budget
            )));
        }
        Ok(named.insert(name, spec).is_some())
    }

    /// Bytes the registered specs hold.
    fn registered_bytes(&self) -> Result<usize, ApiError> {
        let named = self.named.read().map_err(|_| poisoned())?;
        Ok(named.values().map(|s| s.memory_bytes()).sum())
    }

    /// Forget `name`; returns whether it was registered.
    pub fn unregister(&self, name: &str) -> Result<bool, ApiError> {
        let mut named = self.named.write().map_err(|_| poisoned())?;
        Ok(named.remove(name).is_some())
    }

    /// An inline spec, resolved on a blocking thread the first time its content is seen and
    /// shared afterwards (its files are read once, like a registered spec's).
    pub async fn inline(&self, spec: serde_json::Value) -> Result<Arc<ResolvedSteering>, ApiError> {
        let text = spec.to_string();
        let key: [u8; 32] = Sha256::digest(text.as_bytes()).into();
        if let Some(found) = self.cached(&key)? {
            return Ok(found);
        }
        let room = self.memory_budget.saturating_sub(self.registered_bytes()?);
        // At most RESOLVING specs are read and built at once, whatever the number of requests.
        let _permit = self
            .resolving
            .acquire()
            .await
            .map_err(|_| ApiError::unavailable("the server is shutting down"))?;
        let resolver = self.resolver.clone();
        let resolved = tokio::task::spawn_blocking(move || resolver.inline(&spec, &text, room))
            .await
            .map_err(|e| ApiError::internal(format!("steering resolution failed: {e}")))??;
        let resolved = Arc::new(resolved);
        let size = resolved.memory_bytes();
        if size > room {
            return Err(insufficient(format!(
                "this spec holds {size} bytes of steering; {room} of the budget of {} are free \
                 (serve --steering-memory-mb)",
                self.memory_budget
            )));
        }
        let mut cache = self.inline.lock().map_err(|_| poisoned())?;
        cache.push_front((key, resolved.clone()));
        cache.truncate(INLINE_CACHE);
        // Least recently used specs leave the cache until it fits beside the registered ones.
        while cache.iter().map(|(_, s)| s.memory_bytes()).sum::<usize>() > room {
            cache.pop_back();
        }
        Ok(resolved)
    }

    fn cached(&self, key: &[u8; 32]) -> Result<Option<Arc<ResolvedSteering>>, ApiError> {
        let mut cache = self.inline.lock().map_err(|_| poisoned())?;
        let Some(at) = cache.iter().position(|(k, _)| k == key) else {
            return Ok(None);
        };
        let entry = cache.remove(at).ok_or_else(poisoned)?;
        let found = entry.1.clone();
        cache.push_front(entry);
        Ok(Some(found))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(path: &str) -> SteerSpec {
        let text = serde_json::json!({"interventions": [
            {"kind": "w2s", "router": "r.onnx", "bank": path, "read_layer": 1}
        ]})
        .to_string();
        SteerSpec::parse(&text, Path::new("."), "t").unwrap()
    }

    #[test]
    fn every_file_field_is_confined() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("r.onnx"), b"").unwrap();
        std::fs::write(dir.path().join("b.safetensors"), b"").unwrap();
        assert!(confine(&spec("b.safetensors"), dir.path()).is_ok());
        // The second file field of the entry escapes: caught although the first is fine.
        let err = confine(&spec("../../etc/passwd"), dir.path()).unwrap_err();
        assert!(err.message.contains("not a file inside"), "{}", err.message);
    }

    #[tokio::test]
    async fn an_inline_spec_is_resolved_once_per_content() {
        let dir = tempfile::tempdir().unwrap();
        crate::steer::vector::write_safetensors(
            &dir.path().join("v.safetensors"),
            &[("direction.1".into(), vec![1.0, 0.0, 0.0])],
        )
        .unwrap();
        let config: ModelConfig = serde_json::from_value(serde_json::json!({
            "architecture": "llama", "hidden_size": 3, "num_layers": 2, "num_attention_heads": 1,
            "num_key_value_heads": 1, "head_dim": 3, "vocab_size": 5, "max_position_embeddings": 8,
            "eos_token_ids": [0]
        }))
        .unwrap();
        let runtime = crate::runtime::test_runtime().clone();
        let registry =
            SteeringRegistry::new(config, runtime, Some(dir.path().to_path_buf()), 1 << 30)
                .unwrap();
        let spec = |scale: f32| {
            serde_json::json!({"interventions": [
                {"kind": "vector", "path": "v.safetensors", "scale": scale}
            ]})
        };
        let first = registry.inline(spec(1.0)).await.unwrap();
        let again = registry.inline(spec(1.0)).await.unwrap();
        let other = registry.inline(spec(2.0)).await.unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert!(!Arc::ptr_eq(&first, &other));
        let escape = serde_json::json!({"interventions": [
            {"kind": "vector", "path": "../v.safetensors", "scale": 1.0}
        ]});
        assert!(registry.inline(escape).await.is_err());
    }
}
