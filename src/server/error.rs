//! What stops `sensor-server` or one of its subcommands, by cause. `main` prints it and
//! exits 1; nothing below `main` ends the process.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag or an address that cannot work, and why.
    #[error("{0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("cannot open store in {}: {source}", dir.display())]
    OpenStore { dir: PathBuf, source: io::Error },
    /// The directory given to `ship` or `rebuild` is not a store.
    #[error("cannot {command}: {source}")]
    NotAStore {
        command: &'static str,
        source: io::Error,
    },
    /// The archive cannot be used, or did not finish: why.
    #[error("{0}")]
    Archive(String),
    /// A resource the server needs from the system (the poller, a thread, stdout).
    #[error("{what}: {source}")]
    System {
        what: &'static str,
        source: io::Error,
    },
    /// The store can no longer be trusted to hold what the ledger counts (an fsync
    /// failed, or a failed write could not be undone): the server stopped without
    /// acknowledging more; a restart rebuilds the ledger from the disk.
    #[error("{0}")]
    StoreBroken(String),
}

impl Error {
    /// A `System` error's constructor, for `map_err`.
    pub(crate) fn system(what: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::System { what, source }
    }
}
