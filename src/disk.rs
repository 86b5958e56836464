//! Making files durable: syncing a directory so that new names survive a crash, and
//! replacing a file so that a crash leaves the old or the new content, never a mix. Used
//! by the server's store and the client's spool.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Replaces `dir/name` with `bytes` so that a crash leaves the old or the new content,
/// never a mix: a synced temporary file renamed over it, then the directory synced.
pub(crate) fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    write_atomically_with_mode(dir, name, bytes, DEFAULT_MODE)
}

/// `write_atomically` creating the file with permissions `mode` (a private key: 0o600).
pub(crate) fn write_atomically_with_mode(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    mode: u32,
) -> io::Result<()> {
    let tmp = synced_tmp(dir, name, bytes, mode)?;
    fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

/// What `File::create` asks for (the umask then applies).
const DEFAULT_MODE: u32 = 0o666;

/// `dir/name.tmp` holding `bytes`, synced; removed again when that fails (a full disk
/// must not be left with empty temporary files).
pub(crate) fn write_synced_tmp(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<PathBuf> {
    synced_tmp(dir, name, bytes, DEFAULT_MODE)
}

fn synced_tmp(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> io::Result<PathBuf> {
    let tmp = dir.join(format!("{name}.tmp"));
    let written = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_all()
        });
    match written {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Makes the names created, renamed or removed in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
