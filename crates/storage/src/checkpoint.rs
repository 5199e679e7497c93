//! Small files that must change atomically: written to a temporary file, fsynced, renamed over
//! the old one, and the directory fsynced. A reader sees the old contents or the new, never a
//! mix.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use crate::error::StorageError;

pub fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), StorageError> {
    let tmp = path.with_extension("tmp");
    let mut file = File::create(&tmp).map_err(|source| StorageError::io("create", &tmp, source))?;
    file.write_all(contents)
        .map_err(|source| StorageError::io("write", &tmp, source))?;
    crate::sync::all(&file).map_err(|source| StorageError::io("sync", &tmp, source))?;
    std::fs::rename(&tmp, path).map_err(|source| StorageError::io("rename", &tmp, source))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

pub fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    crate::sync::dir(dir)
}

/// Reads a checkpoint holding one decimal number. `Ok(None)` if the file does not exist.
pub fn read_u64(path: &Path) -> Result<Option<u64>, StorageError> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| StorageError::Corrupt {
                path: path.to_owned(),
                position: 0,
                reason: format!("expected a number, found {:?}", text.trim()),
            }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StorageError::io("read", path, source)),
    }
}
