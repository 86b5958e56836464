use clap::Parser;
use sensorhub::config::{ServerConfig, ShipConfig};

fn main() {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let result = if args.get(1).is_some_and(|a| a == "ship") {
        args.remove(1);
        let config = ShipConfig::parse_from(args);
        sensorhub::init_logging(config.log_level);
        sensorhub::server::ship(config)
    } else {
        let config = ServerConfig::parse_from(args);
        sensorhub::init_logging(config.log_level);
        sensorhub::server::run(config)
    };
    if let Err(e) = result {
        eprintln!("sensor-server: {e}");
        std::process::exit(1);
    }
}
