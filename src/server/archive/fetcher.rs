//! `sensor-server rebuild`'s side of the archive: the segments a store lost, fetched
//! back from S3.

use crate::server::archive::aws_cli::{self, Alarm};
use crate::server::archive::bucket::{ArchiveConfig, cli_command};
use crate::server::archive::error::ArchiveError;
use crate::server::store::files::segment_name;
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Instant;

/// The archived segments of one store, fetched back from S3 (`sensor-server rebuild`).
pub(crate) struct Fetcher {
    config: ArchiveConfig,
    /// Segment number -> object key, for every object of the store under the prefix.
    keys: BTreeMap<u64, String>,
    scratch: PathBuf,
}

impl Fetcher {
    /// Lists the objects of store `store_id` under the archive's prefix (any host);
    /// fetched segments go through `scratch`.
    pub(crate) fn list(
        config: ArchiveConfig,
        store_id: &str,
        scratch: PathBuf,
    ) -> Result<Fetcher, ArchiveError> {
        let readings = if config.prefix.is_empty() {
            "readings/".to_owned()
        } else {
            format!("{}/readings/", config.prefix)
        };
        let mut command = cli_command(&config);
        command
            .args(["s3api", "list-objects-v2", "--bucket", &config.bucket])
            .args(["--prefix", &readings, "--query", "Contents[].Key"]);
        let deadline = Instant::now() + config.upload_timeout;
        let out = aws_cli::run(command, Stdio::null(), || deadline, &Alarm::default())
            .map_err(|e| ArchiveError::of_cli(&config.cli, e))?;
        if !out.status.success() {
            return Err(ArchiveError::S3(format!(
                "listing the archive: {}",
                out.error_line()
            )));
        }
        let listed: Option<Vec<String>> = serde_json::from_slice(&out.stdout).map_err(|e| {
            ArchiveError::S3(format!("listing the archive: unreadable answer ({e})"))
        })?;
        let suffix = format!("-{store_id}.jsonl.gz");
        let keys = listed
            .unwrap_or_default()
            .into_iter()
            .filter_map(|key| {
                let name = key.rsplit('/').next()?.strip_suffix(&suffix)?;
                let number = name.strip_prefix("segment-")?.parse().ok()?;
                Some((number, key))
            })
            .collect();
        Ok(Fetcher {
            config,
            keys,
            scratch,
        })
    }

    /// Segment `number`'s bytes as S3 holds them (its checksum checked on the way), in a
    /// file, and its key.
    pub(crate) fn fetch(&self, number: u64) -> io::Result<(PathBuf, String)> {
        let key = self.keys.get(&number).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{} is gone from the store and not in s3://{}/{}",
                    segment_name(number),
                    self.config.bucket,
                    self.config.prefix
                ),
            )
        })?;
        let gz = self.scratch.join("download.gz");
        let mut command = cli_command(&self.config);
        command
            .args(["s3api", "get-object", "--bucket", &self.config.bucket])
            .args(["--key", key, "--checksum-mode", "ENABLED"])
            .arg(&gz);
        let deadline = Instant::now() + self.config.upload_timeout;
        let out = aws_cli::run(command, Stdio::null(), || deadline, &Alarm::default())
            .map_err(|e| io::Error::other(format!("fetching {key}: the AWS CLI: {e}")))?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "fetching {key}: {}",
                out.error_line()
            )));
        }
        let path = self.scratch.join(segment_name(number));
        let mut segment = File::create(&path)?;
        io::copy(
            &mut flate2::read::GzDecoder::new(File::open(&gz)?),
            &mut segment,
        )?;
        let _ = fs::remove_file(&gz);
        Ok((path, key.clone()))
    }
}
