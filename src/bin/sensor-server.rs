use clap::Parser;
use sensorhub::config::ServerConfig;

fn main() {
    let config = ServerConfig::parse();
    sensorhub::init_logging(config.log_level);
    if let Err(e) = sensorhub::server::run(config) {
        eprintln!("sensor-server: {e}");
        std::process::exit(1);
    }
}
