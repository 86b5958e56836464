//! The benchmark baseline: the original design's shape (a thread per connection, one
//! global lock, one file write per reading) speaking the same protocol, so the same
//! `sensor-client --bench` drives both. Deliberately simple, but not a straw man: it
//! flushes replies only when its input buffer is empty, so pipelining still batches
//! its writes. Validation is minimal (fields and types), not the full contract.
//!
//! `cargo run --release --example baseline-server -- --listen 127.0.0.1:0 --data-dir D
//! [--fsync always|never]`

use serde_json::Value;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

struct Shared {
    last_seq: HashMap<String, u64>,
    file: File,
    fsync: bool,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str, default: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_else(|| default.to_owned())
    };
    let dir = flag("--data-dir", "./baseline-data");
    std::fs::create_dir_all(&dir).expect("data dir");
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(format!("{dir}/baseline.jsonl"))
        .expect("store file");
    let shared = Arc::new(Mutex::new(Shared {
        last_seq: HashMap::new(),
        file,
        fsync: flag("--fsync", "always") == "always",
    }));
    let listener = TcpListener::bind(flag("--listen", "127.0.0.1:5000")).expect("bind");
    println!("listening on {}", listener.local_addr().expect("addr"));
    for stream in listener.incoming().flatten() {
        let shared = shared.clone();
        std::thread::spawn(move || serve(stream, &shared));
    }
}

fn serve(stream: TcpStream, shared: &Mutex<Shared>) {
    let _ = stream.set_nodelay(true);
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut writer = BufWriter::new(write_half);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.trim().is_empty() {
            continue;
        }
        let reply = handle(line.trim_end(), shared);
        if writer.write_all(reply.as_bytes()).is_err() {
            return;
        }
        if reader.buffer().is_empty() && writer.flush().is_err() {
            return;
        }
    }
}

fn handle(line: &str, shared: &Mutex<Shared>) -> String {
    let Ok(v) = serde_json::from_str::<Value>(line) else {
        return "{\"seq\":null,\"status\":\"error\",\"error\":\"invalid JSON\"}\n".into();
    };
    let (Some(sensor), Some(kind), Some(value), Some(seq)) = (
        v["sensor"].as_str(),
        v["kind"].as_str(),
        v["value"].as_f64(),
        v["seq"].as_u64(),
    ) else {
        return "{\"seq\":null,\"status\":\"error\",\"error\":\"missing field\"}\n".into();
    };
    let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
    if s.last_seq.get(sensor).is_some_and(|&last| seq <= last) {
        return format!("{{\"seq\":{seq},\"status\":\"duplicate\"}}\n");
    }
    s.last_seq.insert(sensor.to_owned(), seq);
    let record = format!(
        "{{\"sensor\":\"{sensor}\",\"kind\":\"{kind}\",\"value\":{value},\"seq\":{seq}}}\n"
    );
    let fsync = s.fsync;
    if s.file.write_all(record.as_bytes()).is_err() || (fsync && s.file.sync_data().is_err()) {
        return format!("{{\"seq\":{seq},\"status\":\"error\",\"error\":\"store failed\"}}\n");
    }
    format!("{{\"seq\":{seq},\"status\":\"ok\"}}\n")
}
