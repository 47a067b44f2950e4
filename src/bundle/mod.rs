//! The bundle directory written by `export/`: `manifest.json` plus the files it lists.
//!
//! [`Manifest`] mirrors the JSON that `onnx_steer_export.bundle` writes; [`Bundle::open`] parses and
//! validates it so that everything after it can trust the shapes and file names.

pub mod manifest;
mod stamps;
pub mod validate;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use sha2::{Digest, Sha256};

pub use manifest::*;
pub use stamps::STAMPS_FILE;
pub use validate::ManifestError;

use stamps::{Stamp, Stamps};

/// Why a bundle could not be opened or one of its files could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The bundle directory does not exist.
    #[error("bundle directory {0} does not exist; export one with `python -m onnx_steer_export export --source default --out {0}`")]
    MissingDir(PathBuf),
    /// The directory has no `manifest.json`.
    #[error(
        "{0} has no manifest.json; is it a bundle directory written by `onnx_steer_export export`?"
    )]
    MissingManifest(PathBuf),
    /// `manifest.json` is not valid JSON or does not match the [`Manifest`] schema.
    #[error("manifest {path} is not valid: {source}")]
    ManifestSyntax {
        /// The manifest's path.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The manifest parsed but is inconsistent ([`Manifest::validate`]), or a file that was read
    /// is not listed in it.
    #[error("manifest {path}: {source}")]
    Invalid {
        /// The manifest's path.
        path: PathBuf,
        /// The first problem found.
        #[source]
        source: ManifestError,
    },
    /// A file the manifest lists is not in the bundle directory.
    #[error("bundle file {0} is missing; re-export the bundle")]
    MissingFile(PathBuf),
    /// A file's contents do not hash to the sha256 the manifest lists.
    #[error("bundle file {path} is corrupt: sha256 is {actual}, manifest says {expected}; re-export the bundle")]
    Sha256Mismatch {
        /// The file.
        path: PathBuf,
        /// The sha256 the manifest lists (hex).
        expected: String,
        /// The sha256 of the bytes read (hex).
        actual: String,
    },
    /// A listed file's size differs from the manifest's.
    #[error(
        "bundle file {path} is {actual} bytes, the manifest says {expected}; re-export the bundle"
    )]
    SizeMismatch {
        /// The file.
        path: PathBuf,
        /// The size the manifest lists.
        expected: u64,
        /// The file's size.
        actual: u64,
    },
    /// A listed file is a link that leaves the bundle directory, or not a regular file.
    #[error("bundle file {0} is not a regular file inside the bundle directory")]
    NotInside(PathBuf),
    /// A file exists but could not be read.
    #[error("could not read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// How [`Bundle::verified_path`] makes sure of a file's sha256.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verification {
    /// Trust a file that has not changed since it last hashed right (same size, modification and
    /// change times); hash it otherwise. What every start does.
    Stamped,
    /// Hash the file whatever its stamp says (`onnx-steer inspect --verify`).
    Full,
}

/// An opened, validated bundle directory.
///
/// Use [`Bundle::open`] before anything else touches a bundle; [`Bundle::verified_path`] (graphs
/// and weights, which ONNX Runtime reads itself) and [`Bundle::read_verified`] (small files) are
/// how the runtime gets at a file, so a corrupt file is reported before ONNX Runtime sees it.
#[derive(Debug, Clone)]
pub struct Bundle {
    dir: PathBuf,
    manifest: Manifest,
    stamps: Arc<Mutex<Stamps>>,
}

impl Bundle {
    /// Parse `DIR/manifest.json` and check that it is complete and consistent.
    ///
    /// File contents are hashed later, when they are read ([`Bundle::read_verified`]).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, BundleError> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(BundleError::MissingDir(dir));
        }
        let path = dir.join("manifest.json");
        if !path.is_file() {
            return Err(BundleError::MissingManifest(dir));
        }
        let text = std::fs::read_to_string(&path).map_err(|source| BundleError::Io {
            path: path.clone(),
            source,
        })?;
        let manifest: Manifest =
            serde_json::from_str(&text).map_err(|source| BundleError::ManifestSyntax {
                path: path.clone(),
                source,
            })?;
        manifest
            .validate()
            .map_err(|source| BundleError::Invalid { path, source })?;
        let stamps = Arc::new(Mutex::new(Stamps::load(&dir)));
        let bundle = Self {
            dir,
            manifest,
            stamps,
        };
        for (name, entry) in &bundle.manifest.files {
            let size = bundle.listed_file(name)?.len();
            if size != entry.bytes {
                return Err(BundleError::SizeMismatch {
                    path: bundle.path(name),
                    expected: entry.bytes,
                    actual: size,
                });
            }
        }
        Ok(bundle)
    }

    /// The bundle directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Model hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.manifest.model
    }

    /// Absolute path of a file named in the manifest.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// The segment of `kind` (the first one, for kinds that occur once).
    pub fn segment(&self, kind: SegmentKind) -> Option<&Segment> {
        self.manifest.segments.iter().find(|s| s.kind == kind)
    }

    /// Decoder layer segments, ordered by index.
    pub fn layers(&self) -> Vec<&Segment> {
        let mut layers: Vec<&Segment> = self
            .manifest
            .segments
            .iter()
            .filter(|s| s.kind == SegmentKind::Layer)
            .collect();
        layers.sort_by_key(|s| s.index);
        layers
    }

    /// Bytes of the graphs a decode step streams in full (layers, final norm, head): the weight
    /// traffic per token at batch 1. The embedding is left out, as a step reads one row of it.
    pub fn decode_weight_bytes(&self) -> u64 {
        let streamed = [SegmentKind::Layer, SegmentKind::Norm, SegmentKind::Head];
        self.manifest
            .segments
            .iter()
            .filter(|s| streamed.contains(&s.kind))
            .flat_map(|s| s.files())
            .filter_map(|file| self.manifest.files.get(file))
            .map(|entry| entry.bytes)
            .sum()
    }

    /// The metadata of listed file `name`, which must be a regular file inside the bundle
    /// directory once links are followed (the manifest's names are already plain relative paths).
    fn listed_file(&self, name: &str) -> Result<std::fs::Metadata, BundleError> {
        let path = self.path(name);
        let io = Self::io_error(&path);
        let real = path.canonicalize().map_err(&io)?;
        let root = self.dir.canonicalize().map_err(&io)?;
        let metadata = std::fs::metadata(&real).map_err(&io)?;
        if !real.starts_with(&root) || !metadata.is_file() {
            return Err(BundleError::NotInside(path.clone()));
        }
        Ok(metadata)
    }

    fn entry(&self, file: &str) -> Result<&FileEntry, BundleError> {
        self.manifest
            .files
            .get(file)
            .ok_or_else(|| BundleError::Invalid {
                path: self.dir.join("manifest.json"),
                source: ManifestError::Unlisted {
                    what: "bundle",
                    file: file.to_string(),
                },
            })
    }

    fn io_error(path: &Path) -> impl Fn(std::io::Error) -> BundleError + '_ {
        move |source| match source.kind() {
            std::io::ErrorKind::NotFound => BundleError::MissingFile(path.to_path_buf()),
            _ => BundleError::Io {
                path: path.to_path_buf(),
                source,
            },
        }
    }

    fn check_digest(path: PathBuf, entry: &FileEntry, digest: Sha256) -> Result<(), BundleError> {
        let actual = hex::encode(digest.finalize());
        if !actual.eq_ignore_ascii_case(&entry.sha256) {
            return Err(BundleError::Sha256Mismatch {
                path,
                expected: entry.sha256.clone(),
                actual,
            });
        }
        Ok(())
    }

    /// Read a small manifest-listed file (tokenizer, chat template) and check its sha256.
    pub fn read_verified(&self, file: &str) -> Result<Vec<u8>, BundleError> {
        let path = self.path(file);
        let entry = self.entry(file)?;
        // Sized from the file itself, not from the manifest's claim, and never read past it.
        let size = self.listed_file(file)?.len();
        let mut bytes = Vec::with_capacity(size as usize);
        std::fs::File::open(&path)
            .and_then(|f| f.take(size).read_to_end(&mut bytes))
            .map_err(Self::io_error(&path))?;
        Self::check_digest(path, entry, Sha256::new_with_prefix(&bytes))?;
        Ok(bytes)
    }

    /// The path of a manifest-listed file whose sha256 is checked as `how` says, for ONNX Runtime
    /// to read (and map) itself: nothing of it is held in this process's memory. A file that
    /// hashes right is stamped ([`STAMPS_FILE`]), so the next start need not hash it again.
    pub fn verified_path(&self, file: &str, how: Verification) -> Result<PathBuf, BundleError> {
        let path = self.path(file);
        let entry = self.entry(file)?;
        let metadata = self.listed_file(file)?;
        let stamp = Stamp::of(&metadata, &entry.sha256);
        let stamps = || self.stamps.lock().unwrap_or_else(PoisonError::into_inner);
        if how == Verification::Stamped && stamps().vouches_for(file, &stamp) {
            return Ok(path);
        }
        let mut digest = Sha256::new();
        std::fs::File::open(&path)
            .and_then(|f| std::io::copy(&mut f.take(metadata.len()), &mut digest))
            .map_err(Self::io_error(&path))?;
        Self::check_digest(path.clone(), entry, digest)?;
        stamps().record(file, stamp);
        Ok(path)
    }

    /// The path of `segment`'s graph, once it and its weights file are verified as `how` says.
    pub fn verified_segment(
        &self,
        segment: &Segment,
        how: Verification,
    ) -> Result<PathBuf, BundleError> {
        for file in segment.files() {
            self.verified_path(file, how)?;
        }
        Ok(self.path(&segment.file))
    }
}
