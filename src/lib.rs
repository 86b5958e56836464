//! sensorhub: sensor-telemetry ingest.
//!
//! `sensor-server` is one mio event loop (`event_loop`) over every sensor connection
//! (`connection`, `framing`), a pool of workers (`worker`) that validate lines
//! (`protocol`) and decide them against a shared ledger (`db`) made durable by group
//! commit to an append-only store (`store`) whose sealed segments ship to S3 (`archive`),
//! plus an HTTP side port (`http`, `metrics`).
//! `sensor-client` (`client`, `simulate`) simulates sensors and never loses a reading.
//! The wire contract is `docs/protocol.md`.

pub mod archive;
pub mod client;
pub mod config;
pub mod connection;
pub mod db;
pub mod event_loop;
pub mod framing;
pub mod http;
pub mod metrics;
pub mod protocol;
pub mod recovery;
pub mod server;
pub mod simulate;
pub mod stats;
pub mod store;
pub mod worker;

/// Logs go to stderr, so that stdout carries only what scripts read (the bound
/// addresses, the client's summary).
pub fn init_logging(level: log::LevelFilter) {
    // Fails only if a logger is already set, which leaves that one in place.
    let _ = simple_logger::SimpleLogger::new()
        .with_level(level)
        .with_utc_timestamps()
        .init();
}
