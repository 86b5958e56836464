//! sensorhub: sensor-telemetry ingest.
//!
//! - `wire`: the format both binaries and the store share: framing, what a reading line
//!   must hold, replies and records. The contract is `docs/protocol.md`.
//! - `server`: `sensor-server`, one mio event loop (`event_loop`) over every sensor
//!   connection (`connection`), a pool of workers (`worker`) that validate lines and
//!   decide them against a shared ledger (`db`) made durable by group commit to an
//!   append-only store (`store`, `recovery`) whose sealed segments ship to S3
//!   (`archive`), plus an HTTP side port (`http`, `metrics`).
//! - `client`: `sensor-client`, which simulates sensors and never loses a reading.
//! - `net`: socket reads and writes both binaries share.

#![forbid(unsafe_code)]
#![warn(unreachable_pub)]

pub mod certs;
pub mod client;
mod disk;
mod net;
pub mod server;
mod tls;
pub mod wire;

/// `--log-level`: one of the levels, named; a mistyped one lists them all.
pub fn parse_log_level(text: &str) -> Result<log::LevelFilter, String> {
    text.parse().map_err(|_| {
        format!("unknown log level {text:?}: use one of off, error, warn, info, debug, trace")
    })
}

/// Logs go to stderr, so that stdout carries only what scripts read (the bound
/// addresses, the client's summary).
pub fn init_logging(level: log::LevelFilter) {
    // Fails only if a logger is already set, which leaves that one in place.
    let _ = simple_logger::SimpleLogger::new()
        .with_level(level)
        .with_utc_timestamps()
        .init();
}
