use clap::Parser;
use sensorhub::client::{Client, ClientConfig};

fn main() {
    let config = ClientConfig::parse();
    sensorhub::init_logging(config.log_level);
    let result = Client::new(config).and_then(Client::run);
    if let Err(e) = result {
        eprintln!("sensor-client: {e}");
        std::process::exit(1);
    }
}
