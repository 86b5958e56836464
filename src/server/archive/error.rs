//! Why the archive could not do something (this time): the shipper logs it, counts it in
//! `sensorhub_archive_failures_total` and retries; `ship`, `rebuild` and the start-up
//! check report it.

use crate::server::archive::aws_cli::CliError;
use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ArchiveError {
    /// A sealed segment's file is gone and S3 does not hold it: never passed over, since
    /// its readings were acknowledged and retention must not go past it.
    #[error(
        "{} is missing from the store; put it back (nothing after it ships until it is)",
        .0.display()
    )]
    Missing(PathBuf),
    /// The segment is not what was stored: not shipped as if it were the readings.
    #[error(
        "{} is not what was stored (CRC-32 {found:08x}, stored {stored:08x}): corrupt on \
         disk, and not shipped as if it were the readings; `sensor-server verify` lists \
         the damaged lines",
        path.display()
    )]
    Corrupt {
        path: PathBuf,
        found: u32,
        stored: u32,
    },
    /// A local step (reading the segment, compressing, staging the upload) failed.
    #[error("{what}: {error}")]
    Local { what: String, error: io::Error },
    #[error("the AWS CLI did not finish in time; killed it and its children")]
    TimedOut,
    #[error("the AWS CLI {}: {error}", cli.display())]
    Cli { cli: PathBuf, error: CliError },
    /// S3, through the CLI, refused, or showed something other than the bytes sent: why.
    #[error("{0}")]
    S3(String),
}

impl ArchiveError {
    /// What a failed run of the CLI at `cli` amounts to.
    pub(crate) fn of_cli(cli: &std::path::Path, error: CliError) -> ArchiveError {
        match error {
            CliError::TimedOut => ArchiveError::TimedOut,
            error => ArchiveError::Cli {
                cli: cli.to_path_buf(),
                error,
            },
        }
    }

    /// A local step's failure, for `map_err`.
    pub(crate) fn local(what: impl Into<String>) -> impl FnOnce(io::Error) -> ArchiveError {
        let what = what.into();
        move |error| ArchiveError::Local { what, error }
    }
}
