//! A local S3 (moto_server) and the AWS CLI for the archive tests, and stand-in CLIs
//! that misbehave the ways a real one can.

use super::*;
use flate2::read::GzDecoder;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const BUCKET: &str = "sensorhub-archive";
pub const CREDENTIALS: &[&str] = &[
    "env",
    "AWS_ACCESS_KEY_ID=test",
    "AWS_SECRET_ACCESS_KEY=test",
    "AWS_DEFAULT_REGION=us-east-1",
];

/// A program on PATH, or a panic saying how to get it.
pub fn on_path(program: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(program))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "{program} is not on PATH: run the tests with scripts/test.sh, which installs it"
            )
        })
}

/// A moto_server on a free loopback port, killed when dropped.
pub struct S3 {
    child: Option<Child>,
    pub port: u16,
    /// Holds the port while the S3 is down.
    reserved: Option<socket2::Socket>,
}

impl S3 {
    /// The endpoint a server is told about, with nothing listening yet (an outage).
    /// The port stays bound (not listening: connections are refused) until `start`, so
    /// no other test's S3 can take it meanwhile.
    pub fn down() -> S3 {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("bind");
        let port = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .expect("addr")
            .port();
        S3 {
            child: None,
            port,
            reserved: Some(socket),
        }
    }

    pub fn up() -> S3 {
        let mut s3 = S3::down();
        s3.start();
        s3
    }

    pub fn start(&mut self) {
        self.reserved = None;
        let child = Command::new(on_path("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn moto_server");
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        wait_until("moto_server to listen", || TcpStream::connect(addr).is_ok());
        self.aws(&["s3api", "create-bucket", "--bucket", BUCKET]);
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Runs the AWS CLI against this S3 and returns its stdout.
    pub fn aws(&self, args: &[&str]) -> Vec<u8> {
        let out = Command::new(CREDENTIALS[0])
            .args(&CREDENTIALS[1..])
            .arg(on_path("aws"))
            .args(["--endpoint-url", &self.endpoint()])
            .args(args)
            .output()
            .expect("run aws");
        assert!(
            out.status.success(),
            "aws {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    pub fn keys(&self) -> Vec<String> {
        let out = self.aws(&[
            "s3api",
            "list-objects-v2",
            "--bucket",
            BUCKET,
            "--output",
            "json",
        ]);
        let listing: serde_json::Value = serde_json::from_slice(&out).expect("listing");
        let mut keys: Vec<String> = listing["Contents"]
            .as_array()
            .map(|objects| {
                objects
                    .iter()
                    .map(|o| o["Key"].as_str().expect("key").to_owned())
                    .collect()
            })
            .unwrap_or_default();
        keys.sort();
        keys
    }

    /// The object's bytes, gunzipped.
    pub fn object(&self, key: &str, scratch: &Path) -> Vec<u8> {
        let file = scratch.join("download.gz");
        let path = file.to_str().expect("utf-8 path");
        self.aws(&[
            "s3api",
            "get-object",
            "--bucket",
            BUCKET,
            "--key",
            key,
            path,
        ]);
        let mut text = Vec::new();
        GzDecoder::new(std::fs::File::open(&file).expect("download"))
            .read_to_end(&mut text)
            .expect("gzip");
        text
    }
}

impl S3 {
    /// Every object, gunzipped, by key: one CLI call however many there are.
    pub fn objects(&self, scratch: &Path) -> Vec<(String, Vec<u8>)> {
        let root = scratch.join("download");
        let _ = std::fs::remove_dir_all(&root);
        let target = root.to_str().expect("utf-8 path");
        self.aws(&[
            "s3",
            "cp",
            "--recursive",
            "--quiet",
            &format!("s3://{BUCKET}/"),
            target,
        ]);
        self.keys()
            .into_iter()
            .map(|key| {
                let mut text = Vec::new();
                GzDecoder::new(std::fs::File::open(root.join(&key)).expect("downloaded"))
                    .read_to_end(&mut text)
                    .expect("gzip");
                (key, text)
            })
            .collect()
    }

    /// How often each seq of sensor `sensor` is in the archive.
    pub fn seq_counts(
        &self,
        sensor: &str,
        scratch: &Path,
    ) -> std::collections::BTreeMap<u64, usize> {
        let mut counts = std::collections::BTreeMap::new();
        for (_, text) in self.objects(scratch) {
            for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                let record: serde_json::Value = serde_json::from_slice(line).expect("record");
                if record["sensor"] == sensor {
                    *counts
                        .entry(record["seq"].as_u64().expect("seq"))
                        .or_default() += 1;
                }
            }
        }
        counts
    }

    /// Puts `bytes` under `key` (to play another writer).
    pub fn put(&self, key: &str, bytes: &[u8], scratch: &Path) {
        let file = scratch.join("upload");
        std::fs::write(&file, bytes).expect("write upload");
        let body = file.to_str().expect("utf-8 path");
        self.aws(&[
            "s3api",
            "put-object",
            "--bucket",
            BUCKET,
            "--key",
            key,
            "--body",
            body,
        ]);
    }

    pub fn delete(&self, key: &str) {
        self.aws(&["s3api", "delete-object", "--bucket", BUCKET, "--key", key]);
    }
}

/// Polls `done` until it holds or `limit` passes (then panics naming `what`): for the
/// waits that include the shipper's backoff, longer than `PATIENCE`.
pub fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// An executable script standing in for the AWS CLI: `body` runs first, then it execs
/// the real CLI with the same arguments. Every call's arguments go to `calls.log`.
pub fn cli_wrapper(dir: &Path, body: &str) -> PathBuf {
    let path = dir.with_extension("aws-wrapper.sh");
    let script = format!(
        "#!/usr/bin/env bash\nset -u\nprintf '%s\\n' \"$*\" >> {log}\n{body}\nexec {aws} \"$@\"\n",
        log = calls_log(dir).display(),
        aws = on_path("aws").display(),
    );
    std::fs::write(&path, script).expect("write wrapper");
    let status = Command::new("chmod")
        .arg("+x")
        .arg(&path)
        .status()
        .expect("chmod");
    assert!(status.success());
    path
}

pub fn calls_log(dir: &Path) -> PathBuf {
    dir.with_extension("aws-calls.log")
}

/// How many uploads (`put-object`) the wrapper saw for segment `number`.
pub fn uploads_of(dir: &Path, number: u64) -> usize {
    let needle = format!("segment-{number:010}-");
    std::fs::read_to_string(calls_log(dir))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("put-object") && l.contains(&needle))
        .count()
}

pub fn archived_server(dir: &Path, s3: &S3, extra: &[&str]) -> Server {
    let endpoint = s3.endpoint();
    let mut args = vec![
        "--archive",
        "s3://sensorhub-archive/fleet",
        "--archive-endpoint",
        endpoint.as_str(),
        "--host-id",
        "server-a",
        "--segment-max-age",
        "1",
    ];
    args.extend_from_slice(extra);
    Server::start_wrapped(CREDENTIALS, dir, &args)
}

/// Sends readings `seqs` of sensor `a` and checks each is answered `ok`.
pub fn store_readings(server: &Server, seqs: std::ops::RangeInclusive<u64>) {
    let mut c = server.connect();
    let lines: String = seqs
        .clone()
        .map(|seq| reading("a", "temperature", 20.5, seq))
        .collect();
    c.send(lines);
    for seq in seqs {
        assert_eq!(c.reply(), format!(r#"{{"seq":{seq},"status":"ok"}}"#));
    }
}

/// Seq `stored` of sensor `a` is answered `duplicate` and seq `new` is stored `ok`:
/// the statistics know what was stored, and nothing more.
pub fn assert_duplicate_then_ok(server: &Server, stored: u64, new: u64) {
    let mut c = server.connect();
    c.send(reading("a", "temperature", 20.5, stored));
    assert_eq!(
        c.reply(),
        format!(r#"{{"seq":{stored},"status":"duplicate"}}"#)
    );
    c.send(reading("a", "temperature", 20.5, new));
    assert_eq!(c.reply(), format!(r#"{{"seq":{new},"status":"ok"}}"#));
}

pub fn segment_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("segment-") && n.ends_with(".jsonl"))
        .collect();
    names.sort();
    names
}

/// The store's id, which every object key names.
pub fn store_id(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("store-id"))
        .expect("store-id")
        .trim()
        .to_owned()
}

pub fn shipped_everything(server: &Server) -> bool {
    server.metric("sensorhub_archive_pending_segments") == 0.0
        && server.metric("sensorhub_archive_segments_shipped_total") >= 1.0
}
