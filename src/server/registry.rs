//! Steering specs the server knows: the registered ones by name (`--steer-dir`, `POST
//! /v1/steering`), and inline specs resolved once per distinct content. Inline specs may only name
//! files inside the steering directory ([`confine`]). Resolution reads files, hashes them and
//! builds ONNX sessions, so it always runs on a blocking thread.
//!
//! The steering directory is the replicas' one source of truth: [`SteeringRegistry::sync_dir`]
//! (at start, then every `--steer-dir-poll-ms` on a thread of its own) registers, replaces or
//! removes each `NAME.json` as it appears, changes or goes away, checking a changed spec before
//! it replaces the running one. Specs posted to one replica stay that replica's own.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

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
        let files: std::collections::BTreeSet<PathBuf> = parsed.files().collect();
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

/// What a spec file and the files it names looked like when read: a spec is read again only when
/// this changes (a Kubernetes ConfigMap update swaps every file for a new one).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint(Vec<(PathBuf, Option<(u64, SystemTime)>)>);

impl Fingerprint {
    fn of(files: impl IntoIterator<Item = PathBuf>) -> Self {
        Self(
            files
                .into_iter()
                .map(|path| {
                    let seen = std::fs::metadata(&path)
                        .ok()
                        .and_then(|m| Some((m.len(), m.modified().ok()?)));
                    (path, seen)
                })
                .collect(),
        )
    }

    /// The same files looked at again.
    fn again(&self) -> Self {
        Self::of(self.0.iter().map(|(path, _)| path.clone()))
    }
}

/// Where a registered spec came from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Origin {
    /// `NAME.json` of the steering directory, shared by every replica that mounts it.
    SteerDir(Fingerprint),
    /// `POST /v1/steering` on this replica.
    Api,
}

/// A registered spec, with the digest replicas compare.
struct Registered {
    spec: Arc<ResolvedSteering>,
    sha256: String,
    origin: Origin,
}

/// One registered spec as `GET /v1/steering` lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Listing {
    /// The name requests use.
    pub id: String,
    /// The sha256 of the spec's JSON followed by every file it names ([`spec_digest`]): equal on
    /// replicas that serve the same spec.
    pub sha256: String,
    /// `steer_dir` (the shared directory) or `api` (posted to this replica).
    pub source: &'static str,
}

/// The sha256 of a spec's JSON `text` followed by the contents of each file it names, in order.
fn spec_digest(text: &[u8], spec: &SteerSpec) -> Result<String, SteerError> {
    let mut digest = Sha256::new_with_prefix(text);
    for path in spec.files() {
        std::fs::File::open(&path)
            .and_then(|file| {
                std::io::copy(
                    &mut std::io::Read::take(file, MAX_NET_FILE_BYTES),
                    &mut digest,
                )
            })
            .map_err(SteerError::io(&path))?;
    }
    Ok(hex::encode(digest.finalize()))
}

/// What one [`SteeringRegistry::sync_dir`] changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DirSync {
    /// Names registered for the first time.
    pub added: Vec<String>,
    /// Names whose spec was replaced by a changed file.
    pub replaced: Vec<String>,
    /// Names whose file went away.
    pub removed: Vec<String>,
    /// Names whose new or changed file was refused (the running version, if any, stays).
    pub refused: Vec<String>,
}

/// Named and inline steering specs, resolved and ready to share across requests.
pub struct SteeringRegistry {
    resolver: Arc<Resolver>,
    /// Bytes registered and cached specs may hold together ([`ResolvedSteering::memory_bytes`]).
    memory_budget: usize,
    /// Permits to resolve an inline spec ([`RESOLVING`]).
    resolving: tokio::sync::Semaphore,
    named: RwLock<HashMap<String, Registered>>,
    /// Spec files that were refused, as they looked then: not tried again until they change.
    refused: Mutex<HashMap<String, Fingerprint>>,
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
            refused: Mutex::new(HashMap::new()),
            inline: Mutex::new(VecDeque::new()),
        };
        if let Some(dir) = &registry.resolver.steer_dir {
            // An unreadable directory is an error at start; later, a warning (a remount, say).
            std::fs::read_dir(dir).map_err(SteerError::io(dir))?;
        }
        registry
            .sync_dir()
            .map_err(|e| SteerError::Rule(e.message))?;
        Ok(registry)
    }

    /// Bring the registered specs in line with the steering directory: each `NAME.json` that is
    /// new or changed (by its size and modification time, or those of a file it names) is
    /// loaded, checked and resolved, then swapped in; a name whose file went away is removed. A
    /// spec that fails to load is reported and refused, the running version of it kept. Specs
    /// posted through the API are left alone. Blocking: it reads files and builds sessions.
    pub fn sync_dir(&self) -> Result<DirSync, ApiError> {
        let mut sync = DirSync::default();
        let Some(dir) = self.resolver.steer_dir.clone() else {
            return Ok(sync);
        };
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
            Ok(entries) => entries
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|path| path.extension().is_some_and(|e| e == "json"))
                .collect(),
            Err(error) => {
                tracing::warn!(dir = %dir.display(), %error, "cannot read the steering directory; specs unchanged");
                return Ok(sync);
            }
        };
        files.sort();
        let mut present = HashSet::new();
        for path in files {
            let Some(name) = path.file_stem().map(|s| s.to_string_lossy().into_owned()) else {
                continue;
            };
            present.insert(name.clone());
            let unchanged = |seen: &Fingerprint| *seen == seen.again();
            let registered_unchanged = {
                let named = self.named.read().map_err(|_| poisoned())?;
                matches!(named.get(&name).map(|r| &r.origin),
                         Some(Origin::SteerDir(seen)) if unchanged(seen))
            };
            if registered_unchanged {
                continue;
            }
            let refused_before = {
                let refused = self.refused.lock().map_err(|_| poisoned())?;
                refused.get(&name).is_some_and(unchanged)
            };
            if refused_before {
                continue;
            }
            match self.load_file(&path) {
                Ok(registered) => {
                    let replaced = self.register_as(name.clone(), registered)?;
                    self.refused.lock().map_err(|_| poisoned())?.remove(&name);
                    tracing::info!(
                        name,
                        replaced,
                        "steering spec loaded from the steering directory"
                    );
                    if replaced {
                        sync.replaced.push(name);
                    } else {
                        sync.added.push(name);
                    }
                }
                Err((message, fingerprint)) => {
                    tracing::warn!("not registering {}: {message}", path.display());
                    self.refused
                        .lock()
                        .map_err(|_| poisoned())?
                        .insert(name.clone(), fingerprint);
                    sync.refused.push(name);
                }
            }
        }
        let mut named = self.named.write().map_err(|_| poisoned())?;
        let gone: Vec<String> = named
            .iter()
            .filter(|(name, r)| matches!(r.origin, Origin::SteerDir(_)) && !present.contains(*name))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            named.remove(&name);
            tracing::info!(
                name,
                "steering spec removed: its file left the steering directory"
            );
            sync.removed.push(name);
        }
        self.refused
            .lock()
            .map_err(|_| poisoned())?
            .retain(|name, _| present.contains(name));
        Ok(sync)
    }

    /// Load, resolve and digest the spec file at `path`; on failure, the message and what the
    /// file looked like.
    fn load_file(&self, path: &Path) -> Result<Registered, (String, Fingerprint)> {
        let failed = |message: String| (message, Fingerprint::of([path.to_path_buf()]));
        let (spec, text) = SteerSpec::load_text(path).map_err(|e| failed(e.to_string()))?;
        // The files as they were before reading them: a change while they are read shows next time.
        let fingerprint = Fingerprint::of(std::iter::once(path.to_path_buf()).chain(spec.files()));
        let outcome = spec_digest(text.as_bytes(), &spec).and_then(|sha256| {
            let resolved = spec.resolve(&self.resolver.config, &self.resolver.runtime)?;
            Ok((resolved, sha256))
        });
        match outcome {
            Ok((resolved, sha256)) => Ok(Registered {
                spec: Arc::new(resolved),
                sha256,
                origin: Origin::SteerDir(fingerprint),
            }),
            Err(e) => Err((e.to_string(), fingerprint)),
        }
    }

    /// Run [`SteeringRegistry::sync_dir`] every `every` on a thread of its own, until the
    /// registry is dropped. Does nothing without a steering directory.
    pub fn watch(registry: &Arc<Self>, every: Duration) -> std::io::Result<()> {
        if registry.resolver.steer_dir.is_none() {
            return Ok(());
        }
        let weak = Arc::downgrade(registry);
        std::thread::Builder::new()
            .name("steer-dir-watch".into())
            .spawn(move || loop {
                std::thread::sleep(every);
                let Some(registry) = weak.upgrade() else {
                    return;
                };
                if let Err(error) = registry.sync_dir() {
                    tracing::warn!(error = %error.message, "steering directory sync failed");
                }
            })?;
        Ok(())
    }

    /// Every registered spec with its digest and origin, by name.
    pub fn list(&self) -> Result<Vec<Listing>, ApiError> {
        let named = self.named.read().map_err(|_| poisoned())?;
        let mut listed: Vec<Listing> = named
            .iter()
            .map(|(name, r)| Listing {
                id: name.clone(),
                sha256: r.sha256.clone(),
                source: match r.origin {
                    Origin::SteerDir(_) => "steer_dir",
                    Origin::Api => "api",
                },
            })
            .collect();
        listed.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(listed)
    }

    /// The spec registered as `name`.
    pub fn named(&self, name: &str) -> Result<Arc<ResolvedSteering>, ApiError> {
        let named = self.named.read().map_err(|_| poisoned())?;
        named.get(name).map(|r| r.spec.clone()).ok_or_else(|| {
            ApiError::not_found(format!(
                "no steering spec named {name:?} is registered (GET /v1/steering lists them)"
            ))
        })
    }

    /// Register (or replace) `name` with the spec posted as `spec` (JSON), resolved as an inline
    /// spec is; returns whether it replaced one. Requests in flight keep the version they started
    /// with. Refused (507) beyond [`MAX_REGISTERED`] specs or the steering memory budget.
    pub async fn register_posted(
        &self,
        name: String,
        spec: serde_json::Value,
    ) -> Result<bool, ApiError> {
        let text = spec.to_string();
        let resolved = self.inline(spec).await?;
        let dir = self.resolver.steer_dir.clone().unwrap_or_default();
        let sha256 = tokio::task::spawn_blocking(move || {
            let parsed = SteerSpec::parse(&text, &dir, "request steering")?;
            spec_digest(text.as_bytes(), &parsed)
        })
        .await
        .map_err(|e| ApiError::internal(format!("steering digest failed: {e}")))?
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
        self.register_as(
            name,
            Registered {
                spec: resolved,
                sha256,
                origin: Origin::Api,
            },
        )
    }

    fn register_as(&self, name: String, registered: Registered) -> Result<bool, ApiError> {
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
            .map(|(_, r)| r.spec.memory_bytes())
            .sum();
        let total = others + registered.spec.memory_bytes();
        if total > self.memory_budget {
            return Err(insufficient(format!(
                "registering this spec would hold {total} bytes of steering, more than the \
                 budget of {} (serve --steering-memory-mb)",
                self.memory_budget
            )));
        }
        Ok(named.insert(name, registered).is_some())
    }

    /// Bytes the registered specs hold.
    fn registered_bytes(&self) -> Result<usize, ApiError> {
        let named = self.named.read().map_err(|_| poisoned())?;
        Ok(named.values().map(|r| r.spec.memory_bytes()).sum())
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

    /// A steering directory holding `v.safetensors`, a direction for layer 1 of `tiny_config(2)`.
    fn steer_dir_with_a_vector() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        crate::steer::vector::write_safetensors(
            &dir.path().join("v.safetensors"),
            &[("direction.1".into(), vec![1.0, 0.0, 0.0])],
        )
        .unwrap();
        dir
    }

    #[tokio::test]
    async fn the_steering_directory_is_followed_and_posted_specs_stay() {
        let dir = steer_dir_with_a_vector();
        let write = |name: &str, scale: f32| {
            let spec = serde_json::json!({"interventions": [
                {"kind": "vector", "path": "v.safetensors", "scale": scale}
            ]});
            std::fs::write(dir.path().join(name), spec.to_string()).unwrap();
        };
        write("a.json", 1.0);
        let runtime = crate::runtime::test_runtime().clone();
        let registry = SteeringRegistry::new(
            crate::bundle::manifest::tiny_config(2),
            runtime,
            Some(dir.path().to_path_buf()),
            1 << 30,
        )
        .unwrap();
        let listed = registry.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (listed[0].id.as_str(), listed[0].source),
            ("a", "steer_dir")
        );
        let first = listed[0].sha256.clone();
        assert_eq!(
            registry.sync_dir().unwrap(),
            DirSync::default(),
            "nothing changed"
        );

        write("a.json", 12.5);
        let sync = registry.sync_dir().unwrap();
        assert_eq!(sync.replaced, ["a"]);
        let second = registry.list().unwrap()[0].sha256.clone();
        assert_ne!(first, second);

        // A broken spec is refused once and the running version stays.
        std::fs::write(dir.path().join("a.json"), "{ not a spec").unwrap();
        assert_eq!(registry.sync_dir().unwrap().refused, ["a"]);
        assert_eq!(registry.sync_dir().unwrap(), DirSync::default());
        assert_eq!(registry.list().unwrap()[0].sha256, second);
        assert!(registry.named("a").is_ok());

        registry
            .register_posted(
                "posted".into(),
                serde_json::json!({"interventions": [
                    {"kind": "vector", "path": "v.safetensors", "scale": 2.0}
                ]}),
            )
            .await
            .unwrap();
        write("b.json", 1.0);
        std::fs::remove_file(dir.path().join("a.json")).unwrap();
        let sync = registry.sync_dir().unwrap();
        assert_eq!(
            (sync.added, sync.removed),
            (vec!["b".to_string()], vec!["a".to_string()])
        );
        let listed = registry.list().unwrap();
        let ids: Vec<(&str, &str)> = listed.iter().map(|l| (l.id.as_str(), l.source)).collect();
        assert_eq!(ids, [("b", "steer_dir"), ("posted", "api")]);
        // The same spec gives the same digest wherever it is read.
        assert_eq!(listed[0].sha256, first);
        assert!(registry.named("a").is_err());
    }

    #[tokio::test]
    async fn an_inline_spec_is_resolved_once_per_content() {
        let dir = steer_dir_with_a_vector();
        let config = crate::bundle::manifest::tiny_config(2);
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
