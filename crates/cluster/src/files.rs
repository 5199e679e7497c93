//! The one way this crate replaces a small file (a vote, a snapshot, a node's identity): written
//! beside it, synced, renamed over it, and the directory synced, so after a crash the file is
//! the old one or the new one, whole. Blocking: call it from the blocking pool.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

/// Replaces `dir/name` with `bytes` atomically and durably.
pub(crate) fn replace_atomically(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    let mut file = File::create(&tmp).map_err(|e| context(e, "create", &tmp))?;
    file.write_all(bytes)
        .map_err(|e| context(e, "write", &tmp))?;
    file.sync_all().map_err(|e| context(e, "sync", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(|e| context(e, "rename", &tmp))?;
    sync_dir(dir)
}

/// Syncs a directory, so a rename or a new file in it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| context(e, "sync", dir))
}

/// An I/O error that names the operation and the path.
pub(crate) fn context(e: io::Error, op: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{op} {}: {e}", path.display()))
}
