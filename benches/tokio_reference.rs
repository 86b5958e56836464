//! The reference an outsider compares with: what a competent Rust developer writes
//! first with tokio. A task per connection, `BufReader` lines, serde_json into a
//! struct, the protocol's validation, duplicates in a `Mutex<HashMap>`, and no store.
//! Same wire protocol, so the same `sensor-client --bench` drives it.
//!
//! `cargo run --release --example tokio-reference -- --listen 127.0.0.1:0`

use serde::Deserialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};

#[derive(Deserialize)]
struct Reading {
    sensor: String,
    kind: String,
    value: f64,
    seq: u64,
    #[allow(dead_code)] // validated by its type, not used
    ts: Option<u64>,
}

type Ledger = Arc<Mutex<HashMap<String, (String, u64)>>>;

fn valid_name(name: &str, max: usize, extra: &[u8], lowercase_only: bool) -> bool {
    (1..=max).contains(&name.len())
        && name.bytes().all(|b| {
            b.is_ascii_digit()
                || b.is_ascii_lowercase()
                || (!lowercase_only && b.is_ascii_uppercase())
                || extra.contains(&b)
        })
}

fn check(r: &Reading) -> Result<(), String> {
    if !valid_name(&r.sensor, 64, b"._:-", false) {
        return Err("bad sensor id".into());
    }
    if !valid_name(&r.kind, 32, b"_", true) {
        return Err("bad kind".into());
    }
    let range = match r.kind.as_str() {
        "temperature" => -273.15..=1000.0,
        "humidity" => 0.0..=100.0,
        _ => f64::MIN..=f64::MAX,
    };
    if !r.value.is_finite() || !range.contains(&r.value) {
        return Err("value out of range".into());
    }
    if r.seq > (1 << 53) - 1 {
        return Err("seq out of range".into());
    }
    Ok(())
}

fn answer(line: &str, ledger: &Ledger) -> String {
    let reading: Reading = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => {
            return format!(
                "{{\"seq\":null,\"status\":\"error\",\"error\":{:?}}}\n",
                e.to_string()
            );
        }
    };
    if let Err(e) = check(&reading) {
        return format!(
            "{{\"seq\":{},\"status\":\"rejected\",\"error\":{e:?}}}\n",
            reading.seq
        );
    }
    let mut ledger = ledger.lock().unwrap_or_else(|e| e.into_inner());
    let status = match ledger.get_mut(&reading.sensor) {
        Some((kind, _)) if *kind != reading.kind => "rejected",
        Some((_, last)) if reading.seq <= *last => "duplicate",
        Some((_, last)) => {
            *last = reading.seq;
            "ok"
        }
        None => {
            ledger.insert(reading.sensor, (reading.kind, reading.seq));
            "ok"
        }
    };
    format!("{{\"seq\":{},\"status\":\"{status}\"}}\n", reading.seq)
}

async fn serve(stream: TcpStream, ledger: Ledger) -> std::io::Result<()> {
    let (read, write) = stream.into_split();
    let mut write = BufWriter::new(write);
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        if !line.trim().is_empty() {
            write.write_all(answer(&line, &ledger).as_bytes()).await?;
        }
        // Flush once the lines already read are answered: pipelined readings share a
        // write, and a lone one is not held back.
        if lines.get_ref().buffer().is_empty() {
            write.flush().await?;
        }
    }
    write.flush().await
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let listen = args
        .iter()
        .position(|a| a == "--listen")
        .and_then(|i| args.get(i + 1))
        .map_or("127.0.0.1:5000", String::as_str);
    let listener = TcpListener::bind(listen).await?;
    println!("listening on {}", listener.local_addr()?);
    let ledger = Ledger::default();
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let ledger = ledger.clone();
        tokio::spawn(async move {
            let _ = serve(stream, ledger).await;
        });
    }
}
