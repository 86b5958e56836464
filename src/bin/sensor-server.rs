use clap::Parser;
use sensorhub::server::config::{RebuildConfig, ServerConfig, ShipConfig, VerifyConfig};

fn main() {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let command = args.get(1).and_then(|a| a.to_str()).unwrap_or_default();
    let result = match command {
        "ship" => {
            args.remove(1);
            let config = ShipConfig::parse_from(args);
            sensorhub::init_logging(config.log_level);
            sensorhub::server::ship(config).map_err(|e| e.to_string())
        }
        "rebuild" => {
            args.remove(1);
            let config = RebuildConfig::parse_from(args);
            sensorhub::init_logging(config.log_level);
            sensorhub::server::rebuild(config).map_err(|e| e.to_string())
        }
        "certs" => {
            args.remove(1);
            let config = sensorhub::certs::CertsConfig::parse_from(args);
            sensorhub::certs::make(&config).map(|written| {
                for path in written {
                    println!("wrote {}", path.display());
                }
            })
        }
        "verify" => {
            args.remove(1);
            let config = VerifyConfig::parse_from(args);
            sensorhub::init_logging(log::LevelFilter::Warn);
            match sensorhub::server::verify(&config.data_dir, &mut std::io::stdout()) {
                Ok(report) if report.problems == 0 => Ok(()),
                Ok(_) => std::process::exit(1),
                Err(e) => Err(format!("cannot verify {}: {e}", config.data_dir.display())),
            }
        }
        _ => {
            let config = ServerConfig::parse_from(args);
            sensorhub::init_logging(config.log_level);
            sensorhub::server::run(config).map_err(|e| e.to_string())
        }
    };
    if let Err(e) = result {
        eprintln!("sensor-server: {e}");
        std::process::exit(1);
    }
}
