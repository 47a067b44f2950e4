//! Reading the files a spec names: pinned sha256 checks, and loading a learned net with the
//! interface it must have.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ort::session::Session;
use sha2::{Digest, Sha256};

use super::SteerError;
use crate::runtime::Runtime;

/// Largest learned net or rewrite graph read. The biggest a real one gets is a refusal head's
/// `d x d` matrix: 268 MB at d = 8192 (a 70B model); a file of gigabytes is refused by its size
/// before any of it is read.
pub const MAX_NET_FILE_BYTES: u64 = 512 << 20;

/// Read a regular file of at most `limit` bytes. Its type and size are checked on the open handle
/// before anything is read, so a directory, FIFO or device is refused with its real reason (and a
/// FIFO is opened without blocking), and an oversize file costs no memory.
pub fn read_regular(path: &Path, limit: u64) -> Result<Vec<u8>, SteerError> {
    let not_regular = |what: &str| {
        refusal(
            path,
            std::io::ErrorKind::InvalidInput,
            format!("is {what}, not a regular file"),
        )
    };
    let metadata = std::fs::metadata(path).map_err(SteerError::io(path))?;
    if !metadata.is_file() {
        return Err(not_regular(file_kind(&metadata.file_type())));
    }
    let mut file = open_nonblocking(path).map_err(SteerError::io(path))?;
    let metadata = file.metadata().map_err(SteerError::io(path))?;
    if !metadata.is_file() {
        return Err(not_regular(file_kind(&metadata.file_type())));
    }
    if metadata.len() > limit {
        return Err(refusal(
            path,
            std::io::ErrorKind::FileTooLarge,
            format!(
                "is {} bytes, more than the limit of {limit}",
                metadata.len()
            ),
        ));
    }
    let mut bytes = Vec::with_capacity(metadata.len() as usize);
    (&mut file)
        .take(limit)
        .read_to_end(&mut bytes)
        .map_err(SteerError::io(path))?;
    Ok(bytes)
}

/// A file refused for what it is (its type, its size), as an I/O error of `kind` on `path`.
fn refusal(path: &Path, kind: std::io::ErrorKind, message: String) -> SteerError {
    SteerError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(kind, message),
    }
}

/// Open for reading without blocking on a FIFO (the file may be swapped between the two checks).
fn open_nonblocking(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    options.open(path)
}

/// What a non-regular file is, in words.
pub(crate) fn file_kind(kind: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if kind.is_fifo() {
            return "a FIFO";
        }
        if kind.is_socket() {
            return "a socket";
        }
        if kind.is_block_device() || kind.is_char_device() {
            return "a device";
        }
    }
    if kind.is_dir() {
        "a directory"
    } else if kind.is_symlink() {
        "a symbolic link"
    } else {
        "not a regular file"
    }
}

/// Write `bytes` to `path` as a new regular file (mode 0644, so a container user other than the
/// writer can read it), through a temporary file renamed into place. A symbolic link, device or
/// anything else that is not a regular file at `path` is refused, never replaced.
pub fn write_regular(path: &Path, bytes: &[u8]) -> Result<(), SteerError> {
    match std::fs::symlink_metadata(path) {
        Ok(existing) if !existing.is_file() => {
            return Err(refusal(
                path,
                std::io::ErrorKind::AlreadyExists,
                format!(
                    "is {}; refusing to replace it with a file",
                    file_kind(&existing.file_type())
                ),
            ))
        }
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(SteerError::io(path)(e)),
        _ => {}
    }
    let name = path.file_name().ok_or_else(|| {
        refusal(
            path,
            std::io::ErrorKind::InvalidInput,
            "has no file name".into(),
        )
    })?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    // A temporary name of its own (a crashed writer's leftover never blocks the next one), and
    // the mode set on the open file, so that no umask narrows it.
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(name);
    let temp = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(SteerError::io(dir))?;
    let written = (|| {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            temp.as_file()
                .set_permissions(std::fs::Permissions::from_mode(0o644))?;
        }
        temp.as_file().write_all(bytes)?;
        temp.as_file().sync_all()
    })();
    written.map_err(SteerError::io(temp.path()))?;
    temp.persist(path)
        .map_err(|e| SteerError::io(path)(e.error))?;
    Ok(())
}

/// Read a file named by a spec (at most `limit` bytes), checking the pinned sha256 when there is
/// one.
pub(crate) fn read_pinned(
    path: &Path,
    sha256: Option<&str>,
    limit: u64,
) -> Result<Vec<u8>, SteerError> {
    let bytes = read_regular(path, limit)?;
    if let Some(expected) = sha256 {
        let actual = hex::encode(Sha256::digest(&bytes));
        if !actual.eq_ignore_ascii_case(expected) {
            return Err(SteerError::HashMismatch {
                path: path.to_path_buf(),
                expected: expected.to_string(),
                actual,
            });
        }
    }
    Ok(bytes)
}

/// A net a spec names: its file, pinned hash, and the `[batch, width]` output it must have.
pub(crate) struct NetFile<'a> {
    pub(crate) path: PathBuf,
    pub(crate) sha256: Option<&'a str>,
    pub(crate) output: &'static str,
    pub(crate) width: usize,
}

impl NetFile<'_> {
    /// Verify and load the net (its session shared with other specs that load the same bytes),
    /// and check it declares `state [B, hidden]` to `output [B, width]`; returns the session and
    /// the file's size.
    pub(crate) fn load(
        &self,
        runtime: &Runtime,
        hidden: usize,
    ) -> Result<(Arc<Mutex<Session>>, usize), SteerError> {
        let bytes = read_pinned(&self.path, self.sha256, MAX_NET_FILE_BYTES)?;
        let bad = |message: String| SteerError::Net {
            path: self.path.clone(),
            message,
        };
        let shared = runtime
            .shared_session(&bytes, &self.path.display().to_string())
            .map_err(|e| bad(e.to_string()))?;
        let session = shared
            .lock()
            .map_err(|_| bad("session lock poisoned".into()))?;
        let shape_of =
            |outlets: &[ort::value::Outlet], name: &str| -> Result<Vec<i64>, SteerError> {
                let outlet = outlets
                    .iter()
                    .find(|o| o.name() == name)
                    .ok_or_else(|| bad(format!("the graph has no tensor named {name:?}")))?;
                outlet
                    .dtype()
                    .tensor_shape()
                    .map(|shape| shape.to_vec())
                    .ok_or_else(|| bad(format!("{name:?} is not a tensor")))
            };
        for (name, shape, want) in [
            ("state", shape_of(session.inputs(), "state")?, hidden),
            (
                self.output,
                shape_of(session.outputs(), self.output)?,
                self.width,
            ),
        ] {
            if shape.len() != 2 || shape[1] != want as i64 {
                return Err(bad(format!(
                "{name:?} has shape {shape:?}, expected [batch, {want}] (is it for another model?)"
            )));
            }
        }
        drop(session);
        Ok((shared, bytes.len()))
    }
}
