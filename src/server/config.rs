//! `sensor-server`'s command line (the contract's, `docs/protocol.md`, plus operator
//! knobs).

use clap::{Args, Parser, ValueEnum};
use std::num::NonZeroUsize;
use std::path::PathBuf;

/// When an `ok` may be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Fsync {
    /// After the record is fsynced (group commit): survives power loss.
    Always,
    /// After the record is written to the OS: survives a crash of the server only.
    Never,
}

/// Ingests sensor readings over TCP, stores them durably and acknowledges each one.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "sensor-server",
    version = env!("SENSORHUB_VERSION"),
    after_help = "Other commands (each has --help):\n  \
        sensor-server verify --data-dir D      read a store without changing it; exit 1 on problems\n  \
        sensor-server ship --data-dir D ...    ship every sealed segment to the archive, then exit\n  \
        sensor-server rebuild --data-dir D ... fetch the segments a store lost back from the archive\n  \
        sensor-server certs --dir D ...        make a CA, a server certificate and sensor certificates"
)]
pub struct ServerConfig {
    /// Address for sensor connections; port 0 picks a free port (printed on stdout).
    #[arg(long, default_value = "0.0.0.0:5000")]
    pub listen: String,

    /// Address for the HTTP side port (/healthz, /metrics, /sensors); off when absent.
    #[arg(long)]
    pub http_listen: Option<String>,

    /// Also serve a page at / on the HTTP port: a live chart per sensor, drawn by the
    /// browser (off by default: the protocol answers 404 for any other path).
    #[arg(long, requires = "http_listen")]
    pub http_page: bool,

    /// Directory holding the store (*.jsonl segments and a checkpoint).
    #[arg(long, default_value = "./data")]
    pub data_dir: PathBuf,

    /// Worker threads for validation and storage [default: available cores - 1, at
    /// least 1: the event loop keeps a core of its own].
    #[arg(long, value_parser = at_least_one_worker)]
    pub workers: Option<NonZeroUsize>,

    /// When readings are acknowledged relative to reaching the disk.
    #[arg(long, value_enum, default_value_t = Fsync::Always)]
    pub fsync: Fsync,

    /// Connections served at once; past it new ones get "server busy".
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,

    /// Close a connection that sends nothing for this many seconds (0 = never).
    #[arg(long, default_value_t = 300)]
    pub idle_timeout: u64,

    /// Longest accepted line, terminator excluded.
    #[arg(long, default_value_t = 16_384, value_parser = clap::value_parser!(u32).range(1..=64 * 1024 * 1024))]
    pub max_line_bytes: u32,

    /// Start a new store segment past this size.
    #[arg(long, default_value_t = 64 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1024..))]
    pub segment_bytes: u64,

    /// Seal the active store segment once its first record is this many seconds old
    /// (sealed segments never change; they are what the archive ships).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub segment_max_age: u64,

    #[command(flatten)]
    pub archive: ArchiveArgs,

    /// Write a checkpoint of per-sensor state at least this often (seconds), so restart
    /// replays only recent data.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub checkpoint_interval: u64,

    /// Log level: error, warn, info, debug, trace or off.
    #[arg(long, default_value = "info", value_parser = crate::parse_log_level)]
    pub log_level: log::LevelFilter,

    #[command(flatten)]
    pub tls: TlsArgs,
}

/// TLS on the sensor port (PROTOCOL.md v1.2). SIGHUP re-reads the three files.
#[derive(Debug, Clone, Args)]
pub struct TlsArgs {
    /// Speak TLS on the sensor port with this certificate chain (PEM, leaf first).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Require a client certificate chaining to this CA (PEM); its DNS names are the
    /// sensor ids the connection may write for (a name ending in * covers a prefix).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Close a connection that has not finished its TLS handshake after this many
    /// seconds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..), value_name = "SECS")]
    pub tls_handshake_timeout: u64,

    /// TLS handshakes worked on at once (peers that have started theirs); while this
    /// many are, new connections wait in the kernel's backlog, so a reconnect storm is
    /// served in turns instead of every handshake missing its deadline.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=100_000), value_name = "N")]
    pub tls_max_handshakes: u64,
}

fn at_least_one_worker(text: &str) -> Result<NonZeroUsize, String> {
    match text.parse::<usize>() {
        Ok(n) => NonZeroUsize::new(n).ok_or_else(|| "must be at least 1 (worker threads)".into()),
        Err(e) => Err(format!("{e}: give a number of worker threads, at least 1")),
    }
}

/// Where sealed segments go; shared by the server and `sensor-server ship`.
#[derive(Debug, Clone, Args)]
pub struct ArchiveArgs {
    /// Ship sealed segments to S3 at s3://BUCKET/PREFIX (with the AWS CLI; credentials
    /// and region from the standard AWS chain).
    #[arg(long, value_name = "S3_URL")]
    pub archive: Option<String>,

    /// S3 endpoint override, for a local S3 (moto, MinIO).
    #[arg(long, value_name = "URL", requires = "archive")]
    pub archive_endpoint: Option<String>,

    /// This server's stable id in archive keys (host=ID) [default: the hostname].
    #[arg(long)]
    pub host_id: Option<String>,

    /// Shipped segments kept on local disk; the oldest are deleted past this. Unshipped
    /// segments are never deleted.
    #[arg(long, default_value_t = 1 << 30, requires = "archive")]
    pub keep_shipped_bytes: u64,

    /// The AWS CLI used for uploads.
    #[arg(long, default_value = "aws", requires = "archive")]
    pub archive_cli: PathBuf,

    /// Kill and retry one upload that takes longer than this (seconds).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..), requires = "archive")]
    pub archive_upload_timeout: u64,

    /// On SIGTERM, keep shipping pending segments for up to this long (seconds) before
    /// exiting; what is left ships at the next start (`ship` uses --deadline instead).
    #[arg(long, default_value_t = 8, requires = "archive")]
    pub archive_stop_timeout: u64,
}

/// `sensor-server ship`: ships every sealed segment of a store that no server runs on
/// (a data volume adopted from a dead instance), then exits: 0 once everything is in
/// S3, 1 otherwise. The active segment a crash left is sealed first.
#[derive(Debug, Clone, Parser)]
#[command(name = "sensor-server ship", version = env!("SENSORHUB_VERSION"), about)]
pub struct ShipConfig {
    /// Directory holding the store.
    #[arg(long)]
    pub data_dir: PathBuf,

    #[command(flatten)]
    pub archive: ArchiveArgs,

    /// Give up (exit 1) when not everything is shipped after this many seconds;
    /// what is left ships at the next try.
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    pub deadline: u64,

    /// Log level: error, warn, info, debug, trace or off.
    #[arg(long, default_value = "info", value_parser = crate::parse_log_level)]
    pub log_level: log::LevelFilter,
}

/// `sensor-server rebuild`: makes a store whose statistics are incomplete (segments
/// gone and no usable checkpoint counting them: the server refuses readings and says so)
/// whole again from the archive: every gone segment is fetched back from S3 and
/// replayed with the files on disk, and a checkpoint counting all of them is written.
/// Run it with no server on the store; exits 0 once the next start is complete.
#[derive(Debug, Clone, Parser)]
#[command(name = "sensor-server rebuild", version = env!("SENSORHUB_VERSION"), about)]
pub struct RebuildConfig {
    /// Directory holding the store.
    #[arg(long)]
    pub data_dir: PathBuf,

    #[command(flatten)]
    pub archive: ArchiveArgs,

    /// Log level: error, warn, info, debug, trace or off.
    #[arg(long, default_value = "info", value_parser = crate::parse_log_level)]
    pub log_level: log::LevelFilter,
}

/// `sensor-server verify`: reads a store without changing it and reports every corrupt
/// or torn line (file and byte offset) and any checkpoint that does not match the
/// files; exits 0 when clean, 1 otherwise.
#[derive(Debug, Clone, Parser)]
#[command(name = "sensor-server verify", version = env!("SENSORHUB_VERSION"), about)]
pub struct VerifyConfig {
    /// Directory holding the store.
    #[arg(long)]
    pub data_dir: PathBuf,
}
