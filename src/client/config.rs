//! `sensor-client`'s command line, and the checks it gets before anything connects.

use crate::wire::reading::{valid_kind, valid_sensor};
use clap::Parser;

/// Simulates sensors that send readings to a sensor-server (or, with --stdin, sends
/// real values read from standard input).
#[derive(Debug, Clone, Parser)]
#[command(name = "sensor-client", version = env!("SENSORHUB_VERSION"))]
pub struct ClientConfig {
    /// Server address, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:5000")]
    pub server: String,

    /// Id of the one simulated sensor (1 to 64 of A-Z a-z 0-9 . _ : -).
    #[arg(long, conflicts_with = "sensors")]
    pub sensor: Option<String>,

    /// Kind of the simulated sensors: temperature, humidity, or another [a-z0-9_] name.
    #[arg(long, default_value = "temperature")]
    pub kind: String,

    /// Simulate this many sensors instead, named PREFIX-0, PREFIX-1, ...
    #[arg(long)]
    pub sensors: Option<u32>,

    /// Id prefix for --sensors.
    #[arg(long, default_value = "sim")]
    pub sensor_prefix: String,

    /// Connections the sensors are spread over.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub connections: u32,

    /// One reading per sensor every this many milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,

    /// Stop after this many readings (over all sensors) have been answered.
    #[arg(long)]
    pub count: Option<u64>,

    /// Stop generating after this many seconds, then wait for the answers.
    #[arg(long)]
    pub duration: Option<f64>,

    /// Unanswered readings in flight per connection.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub window: u32,

    /// Readings kept per connection while unanswered or unsent; generation waits when full.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub buffer: u32,

    /// Benchmark: send as fast as the window allows and print throughput and latency.
    #[arg(long)]
    pub bench: bool,

    /// Send real values instead of simulated ones: each line of standard input is a
    /// number, or a JSON object {"value": NUMBER, "ts": UNIX_MS} (ts optional), for
    /// --sensor and --kind. The client adds seq (and ts), and exits at the end of input
    /// once every value is answered.
    #[arg(long, requires = "sensor", conflicts_with_all = ["sensors", "bench", "count", "duration"])]
    pub stdin: bool,

    /// With --stdin: keep every value read in this directory until it is answered
    /// (synced before it is sent), so a restarted client sends it again.
    #[arg(long, requires = "stdin", value_name = "DIR")]
    pub spool: Option<std::path::PathBuf>,

    /// Exit non-zero after the server has been unreachable, or has left readings
    /// unanswered, this long (seconds).
    #[arg(long, default_value_t = 60)]
    pub give_up_after: u64,

    /// Drop and re-establish a connection whose oldest unanswered reading (or whose
    /// connect) is older than this many seconds, then resend.
    #[arg(long, default_value_t = 10.0, value_parser = positive_seconds)]
    pub reply_timeout: f64,

    /// No progress line on stderr (printed every 2 s when stderr is a terminal).
    #[arg(long)]
    pub quiet: bool,

    /// Append "SENSOR SEQ STATUS" for every answered reading to this file (also from
    /// $SENSOR_CLIENT_RECORD, which a systemd drop-in can set without repeating ExecStart).
    #[arg(long, env = "SENSOR_CLIENT_RECORD")]
    pub record: Option<std::path::PathBuf>,

    /// Connect with TLS, trusting server certificates that chain to this CA (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<std::path::PathBuf>,

    /// The client certificate (PEM) that names this client's sensors, for a server
    /// that requires one.
    #[arg(long, value_name = "FILE", requires_all = ["tls_ca", "tls_key"])]
    pub tls_cert: Option<std::path::PathBuf>,

    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,

    /// The name the server's certificate must carry [default: the host of --server].
    #[arg(long, value_name = "NAME", requires = "tls_ca")]
    pub tls_server_name: Option<String>,

    /// Log level: error, warn, info, debug, trace or off.
    #[arg(long, default_value = "info", value_parser = crate::parse_log_level)]
    pub log_level: log::LevelFilter,
}

fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 => Ok(s),
        _ => Err(format!("{text:?} is not a positive number of seconds")),
    }
}

/// Sensor ids and the kind are checked before connecting: a bad name would otherwise
/// be answered `rejected` for every reading.
pub(super) fn validate_names(config: &ClientConfig) -> Result<(), String> {
    if let Some(id) = &config.sensor
        && !valid_sensor(id)
    {
        return Err(format!(
            "--sensor {id:?}: use 1 to 64 characters of A-Z a-z 0-9 . _ : -"
        ));
    }
    if config.sensor.is_none() && !valid_sensor(&format!("{}-{}", config.sensor_prefix, u32::MAX)) {
        return Err(format!(
            "--sensor-prefix {:?}: ids would not be valid sensor names",
            config.sensor_prefix
        ));
    }
    if !valid_kind(&config.kind) {
        return Err(format!(
            "--kind {:?}: use temperature, humidity or 1 to 32 of a-z 0-9 _",
            config.kind
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused_before_connecting() {
        let config = |args: &[&str]| {
            let mut argv = vec!["sensor-client"];
            argv.extend_from_slice(args);
            ClientConfig::parse_from(argv)
        };
        assert!(validate_names(&config(&["--sensor", "bad name"])).is_err());
        assert!(validate_names(&config(&["--sensor", "ok", "--kind", "Temp"])).is_err());
        assert!(validate_names(&config(&["--sensor", "client1-temperature"])).is_ok());
        assert!(validate_names(&config(&["--sensors", "3", "--sensor-prefix", "a b"])).is_err());
    }
}
