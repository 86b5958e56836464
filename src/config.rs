//! `sensor-server`'s command line (PROTOCOL.md's contract, plus operator knobs).

use clap::{Parser, ValueEnum};
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
#[command(name = "sensor-server", version, about)]
pub struct ServerConfig {
    /// Address for sensor connections; port 0 picks a free port (printed on stdout).
    #[arg(long, default_value = "0.0.0.0:5000")]
    pub listen: String,

    /// Address for the HTTP side port (/healthz, /metrics, /sensors); off when absent.
    #[arg(long)]
    pub http_listen: Option<String>,

    /// Directory holding the store (*.jsonl segments and a checkpoint).
    #[arg(long, default_value = "./data")]
    pub data_dir: PathBuf,

    /// Worker threads for validation and storage [default: available cores].
    #[arg(long)]
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

    /// Write a checkpoint of per-sensor state at least this often (seconds), so restart
    /// replays only recent data.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub checkpoint_interval: u64,

    /// Log level: error, warn, info, debug, trace or off.
    #[arg(long, default_value = "info")]
    pub log_level: log::LevelFilter,
}
