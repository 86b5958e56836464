//! Where the archive is and what its objects are called: the bucket URL, the host id,
//! the endpoint, the AWS CLI command line, the start-up check of the bucket, and the
//! Hive-partitioned object keys.

use crate::server::archive::aws_cli::{self, Alarm};
use crate::server::archive::error::ArchiveError;
use crate::server::store::files::segment_name;
use log::warn;
use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How often an idle shipper looks for newly sealed segments.
/// How long the start-up checks may take, each.
pub(super) const CHECK_TIMEOUT: Duration = Duration::from_secs(20);

/// Where and how sealed segments are shipped (`--archive` and friends).
#[derive(Debug, Clone)]
pub(crate) struct ArchiveConfig {
    pub bucket: String,
    /// Key prefix without leading or trailing `/`; may be empty.
    pub prefix: String,
    /// S3 endpoint override (a local S3 such as moto or MinIO); `None` for AWS.
    pub endpoint: Option<String>,
    /// The server's stable id in object keys (`host=HOST`).
    pub host: String,
    /// The AWS CLI to run.
    pub cli: PathBuf,
    /// One upload taking longer than this is killed and retried.
    pub upload_timeout: Duration,
    /// How long a graceful stop keeps shipping what is pending (for `ship`: how long
    /// it ships at all).
    pub stop_timeout: Duration,
}

/// Parses `s3://BUCKET[/PREFIX]` into bucket and prefix. The prefix must be a plain S3
/// prefix: `/`-separated parts of S3's safe characters (letters, digits, `!-_.*'()`,
/// and `=` for Hive-style parts), none empty, `.` or `..`.
pub(crate) fn parse_s3_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| format!("archive {url:?} must look like s3://BUCKET/PREFIX"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let valid_bucket = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    if !valid_bucket {
        return Err(format!(
            "archive bucket {bucket:?} is not a valid S3 bucket name (3 to 63 of a-z 0-9 . -)"
        ));
    }
    let prefix = prefix.trim_end_matches('/');
    let plain_part = |part: &str| {
        !part.is_empty()
            && part != "."
            && part != ".."
            && part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!-_.*'()=".contains(&b))
    };
    if !prefix.is_empty() && !prefix.split('/').all(plain_part) {
        return Err(format!(
            "archive prefix {prefix:?} is not a plain S3 prefix: use /-separated parts of \
             A-Z a-z 0-9 ! - _ . * ' ( ) =, none empty, . or .."
        ));
    }
    Ok((bucket.to_owned(), prefix.to_owned()))
}

/// Checks a host id for use in keys and partition values: 1 to 64 of `[A-Za-z0-9._-]`.
pub(crate) fn check_host_id(host: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&host.len())
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "host id {host:?} must be 1 to 64 of A-Z a-z 0-9 . _ - (it names the archive partition)"
        ))
    }
}

/// Checks an S3 endpoint override: `http://` or `https://`, a host, nothing else odd
/// (the CLI would only fail on it at the first upload).
pub(crate) fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let host = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
        .map(|rest| rest.split('/').next().unwrap_or_default());
    match host {
        Some(host) if !host.is_empty() && !host.contains(char::is_whitespace) => Ok(()),
        _ => Err(format!(
            "archive endpoint {endpoint:?} must be a URL like http://127.0.0.1:9000 or https://s3.example.com"
        )),
    }
}

/// The machine's hostname, the default host id.
pub(crate) fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// What the start-up check found of the bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bucket {
    Answers,
    /// It did not answer (an outage, a network still coming up): shipping retries.
    Silent,
}

/// Checks, before anything is shipped, that the CLI runs and the bucket answers. A
/// missing CLI, or a bucket S3 says is missing or forbidden, is an error; a bucket that
/// does not answer is a warning (and `Bucket::Silent`).
pub(crate) fn check_start(config: &ArchiveConfig) -> Result<Bucket, ArchiveError> {
    let mut version = Command::new(&config.cli);
    version.arg("--version");
    let deadline = Instant::now() + CHECK_TIMEOUT;
    match aws_cli::run(version, Stdio::null(), || deadline, &Alarm::default()) {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            return Err(ArchiveError::S3(format!(
                "the AWS CLI {} does not run ({}: {})",
                config.cli.display(),
                out.status,
                out.error_line()
            )));
        }
        Err(e) => return Err(ArchiveError::of_cli(&config.cli, e)),
    }
    let mut head = cli_command(config);
    head.env("AWS_MAX_ATTEMPTS", "1")
        .args(["s3api", "head-bucket", "--bucket", &config.bucket]);
    let deadline = Instant::now() + CHECK_TIMEOUT;
    let why = match aws_cli::run(head, Stdio::null(), || deadline, &Alarm::default()) {
        Ok(out) if out.status.success() => return Ok(Bucket::Answers),
        Ok(out) => out.error_line(),
        Err(e) => e.to_string(),
    };
    if why.contains("404") || why.contains("Not Found") || why.contains("NoSuchBucket") {
        return Err(ArchiveError::S3(format!(
            "archive bucket {} does not exist ({why})",
            config.bucket
        )));
    }
    if why.contains("403") || why.contains("Forbidden") || why.contains("AccessDenied") {
        return Err(ArchiveError::S3(format!(
            "archive bucket {} refuses these credentials ({why})",
            config.bucket
        )));
    }
    warn!(
        "archive: bucket {} does not answer now ({why}); shipping retries until it does",
        config.bucket
    );
    Ok(Bucket::Silent)
}

/// The CLI with the options every call shares.
pub(super) fn cli_command(config: &ArchiveConfig) -> Command {
    let mut command = Command::new(&config.cli);
    if let Some(endpoint) = &config.endpoint {
        command.args(["--endpoint-url", endpoint]);
    }
    // The shipper retries with its own backoff; the CLI's own retries (5 attempts,
    // each up to the connect timeout) would hide an outage for a minute.
    if std::env::var_os("AWS_MAX_ATTEMPTS").is_none() {
        command.env("AWS_MAX_ATTEMPTS", "2");
    }
    command.args(["--cli-connect-timeout", "5", "--output", "json"]);
    command
}

/// The object key of segment `number` of store `store_id` whose first record was
/// received at `first_ms`.
pub(crate) fn object_key(
    config: &ArchiveConfig,
    store_id: &str,
    number: u64,
    first_ms: u64,
) -> String {
    let (y, m, d) = civil_date(first_ms);
    let name = segment_name(number);
    let stem = name.strip_suffix(".jsonl").unwrap_or(&name);
    let path = format!(
        "readings/dt={y:04}-{m:02}-{d:02}/host={}/{stem}-{store_id}.jsonl.gz",
        config.host
    );
    if config.prefix.is_empty() {
        path
    } else {
        format!("{}/{path}", config.prefix)
    }
}

/// (year, month, day) of a Unix time in ms, UTC (Howard Hinnant's `civil_from_days`).
fn civil_date(unix_ms: u64) -> (i64, u32, u32) {
    let z = (unix_ms / 86_400_000) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(prefix: &str) -> ArchiveConfig {
        ArchiveConfig {
            bucket: "b".into(),
            prefix: prefix.into(),
            endpoint: None,
            host: "server-a".into(),
            cli: "aws".into(),
            upload_timeout: Duration::from_secs(1),
            stop_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn keys_are_hive_partitioned_by_the_first_records_day_and_the_host() {
        // 2026-11-30T23:59:59.999Z and one millisecond later.
        assert_eq!(
            object_key(
                &config("fleet/archive"),
                "0123456789abcdef",
                7,
                1_796_083_199_999
            ),
            "fleet/archive/readings/dt=2026-11-30/host=server-a/segment-0000000007-0123456789abcdef.jsonl.gz"
        );
        assert_eq!(
            object_key(&config(""), "0123456789abcdef", 12, 1_796_083_200_000),
            "readings/dt=2026-12-01/host=server-a/segment-0000000012-0123456789abcdef.jsonl.gz"
        );
    }

    #[test]
    fn civil_dates_match_known_days() {
        assert_eq!(civil_date(0), (1970, 1, 1));
        assert_eq!(civil_date(951_782_400_000), (2000, 2, 29));
        assert_eq!(civil_date(4_107_542_400_000), (2100, 3, 1));
    }

    #[test]
    fn s3_urls_and_host_ids_are_checked() {
        assert_eq!(
            parse_s3_url("s3://my-bucket/fleet/a/").unwrap(),
            ("my-bucket".into(), "fleet/a".into())
        );
        assert_eq!(
            parse_s3_url("s3://my.bucket").unwrap(),
            ("my.bucket".into(), "".into())
        );
        assert!(parse_s3_url("my-bucket/x").is_err());
        assert!(parse_s3_url("s3://My_Bucket/x").is_err());
        assert!(parse_s3_url("s3://ab").is_err());
        for bad_prefix in ["../../etc", "a//b", "a/./b", "a b", "a\\b", "a\nb"] {
            assert!(
                parse_s3_url(&format!("s3://my-bucket/{bad_prefix}")).is_err(),
                "{bad_prefix:?}"
            );
        }
        assert_eq!(
            parse_s3_url("s3://my-bucket/year=2026/(raw)").unwrap().1,
            "year=2026/(raw)"
        );
        assert!(check_endpoint("http://127.0.0.1:5000").is_ok());
        assert!(check_endpoint("https://s3.eu-west-1.amazonaws.com/").is_ok());
        for bad in [
            "127.0.0.1:5000",
            "http://",
            "ftp://x",
            "http://a b",
            "garbage",
        ] {
            assert!(check_endpoint(bad).is_err(), "{bad}");
        }
        assert!(check_host_id("ip-10-0-1-23.ec2.internal").is_ok());
        assert!(check_host_id("").is_err());
        assert!(check_host_id("a/b").is_err());
        assert!(check_host_id("a=b").is_err());
    }
}
