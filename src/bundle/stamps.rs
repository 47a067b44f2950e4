//! A record, kept in the bundle directory, of the files whose sha256 was checked: a start-up
//! trusts a file whose size, modification and change times are as they were when it was hashed,
//! instead of rehashing every gigabyte (`onnx-steer inspect --verify` rehashes all).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The record's file name in the bundle directory.
pub const STAMPS_FILE: &str = ".onnx-steer-verified.json";

/// What a file looked like when its contents hashed to `sha256`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Stamp {
    sha256: String,
    bytes: u64,
    modified_ns: i128,
    /// The inode change time, which no ordinary user can set back (unlike the modification time).
    changed_ns: i128,
}

impl Stamp {
    /// The stamp of a file with `metadata` whose contents hash to `sha256`.
    pub(crate) fn of(metadata: &std::fs::Metadata, sha256: &str) -> Self {
        use std::os::unix::fs::MetadataExt;
        let ns = |secs: i64, nanos: i64| i128::from(secs) * 1_000_000_000 + i128::from(nanos);
        Self {
            sha256: sha256.to_ascii_lowercase(),
            bytes: metadata.len(),
            modified_ns: ns(metadata.mtime(), metadata.mtime_nsec()),
            changed_ns: ns(metadata.ctime(), metadata.ctime_nsec()),
        }
    }
}

/// Every stamp of one bundle directory, by file name.
#[derive(Debug, Default)]
pub(crate) struct Stamps {
    path: PathBuf,
    files: BTreeMap<String, Stamp>,
}

impl Stamps {
    /// The stamps recorded in `dir`; none when there is no record or it cannot be read (then every
    /// file is hashed, as if the bundle were new).
    pub(crate) fn load(dir: &Path) -> Self {
        let path = dir.join(STAMPS_FILE);
        let files = std::fs::read(&path)
            .ok()
            .and_then(|bytes| match serde_json::from_slice(&bytes) {
                Ok(files) => Some(files),
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "ignoring an unreadable verification record");
                    None
                }
            })
            .unwrap_or_default();
        Self { path, files }
    }

    /// Whether `file` was hashed when it looked as `current` does.
    pub(crate) fn vouches_for(&self, file: &str, current: &Stamp) -> bool {
        self.files.get(file) == Some(current)
    }

    /// Record `stamp` for `file` and rewrite the record (atomically: a temporary file renamed over
    /// it). A directory that cannot be written keeps no record, and each start hashes again.
    pub(crate) fn record(&mut self, file: &str, stamp: Stamp) {
        self.files.insert(file.to_string(), stamp);
        let write = || -> std::io::Result<()> {
            let dir = self.path.parent().unwrap_or(Path::new("."));
            let mut temporary = tempfile::NamedTempFile::new_in(dir)?;
            serde_json::to_writer_pretty(&mut temporary, &self.files)?;
            temporary.persist(&self.path)?;
            Ok(())
        };
        if let Err(error) = write() {
            tracing::debug!(path = %self.path.display(), %error, "cannot record the verification; files will be hashed at every start");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_vouches_only_for_the_same_size_times_and_digest() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("a.bin");
        std::fs::write(&file, b"abc").expect("write");
        let stamp = Stamp::of(&std::fs::metadata(&file).expect("metadata"), "AB");
        let mut stamps = Stamps::load(dir.path());
        assert!(!stamps.vouches_for("a.bin", &stamp));
        stamps.record("a.bin", stamp.clone());
        let reloaded = Stamps::load(dir.path());
        assert!(reloaded.vouches_for("a.bin", &stamp));
        // Another digest in the manifest, or the file rewritten, and the stamp no longer holds.
        let metadata = std::fs::metadata(&file).expect("metadata");
        assert!(!reloaded.vouches_for("a.bin", &Stamp::of(&metadata, "cd")));
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&file, b"abd").expect("rewrite");
        let rewritten = Stamp::of(&std::fs::metadata(&file).expect("metadata"), "ab");
        assert!(!reloaded.vouches_for("a.bin", &rewritten));
    }

    #[test]
    fn a_malformed_record_is_ignored() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join(STAMPS_FILE), b"{not json").expect("write");
        assert!(Stamps::load(dir.path()).files.is_empty());
    }
}
