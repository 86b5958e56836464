//! Test harness: runs the real binaries on 127.0.0.1:0 and talks to them over loopback.
//! Every wait is bounded; a helper that times out panics with what it was waiting for.
#![allow(dead_code)] // each test file uses a different part of the harness

pub mod s3;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const SERVER: &str = env!("CARGO_BIN_EXE_sensor-server");
pub const CLIENT: &str = env!("CARGO_BIN_EXE_sensor-client");
/// Upper bound for any single wait in a test.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A fresh, empty directory for one test.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sensorhub-it-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// One reading line (with its `\n`).
pub fn reading(sensor: &str, kind: &str, value: f64, seq: u64) -> String {
    format!("{{\"sensor\":\"{sensor}\",\"kind\":\"{kind}\",\"value\":{value},\"seq\":{seq}}}\n")
}

/// Polls `done` until it holds or `PATIENCE` passes (then panics naming `what`).
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A small tmpfs mounted for one test (root only), unmounted when dropped.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("mount point");
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "sensorhub-test",
            ])
            .arg(dir)
            .status()
            .expect("mount")
            .success();
        assert!(ok, "mount tmpfs on {}", dir.display());
        Tmpfs(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system holding `dir` with one file; returns its path.
pub fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).expect("filler");
    let chunk = vec![0u8; 64 * 1024];
    let mut small = vec![0u8; 512];
    loop {
        match file.write(&chunk) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) => panic!("filling: {e}"),
        }
    }
    // The last few blocks.
    while file.write(&small).is_ok() {
        small.truncate(small.len().max(2) / 2);
        if small.len() == 1 {
            break;
        }
    }
    path
}

/// A running `sensor-server`, killed when dropped.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub http: SocketAddr,
    pub dir: PathBuf,
}

impl Server {
    /// Starts a server on ephemeral ports storing in `dir`, with `extra` flags.
    pub fn start(dir: &Path, extra: &[&str]) -> Server {
        Server::start_wrapped(&[], dir, extra)
    }

    /// Starts a server listening on `addr` (to restart one on the same port).
    pub fn start_on(addr: SocketAddr, dir: &Path, extra: &[&str]) -> Server {
        let listen = addr.to_string();
        let mut args = vec!["--listen", listen.as_str()];
        args.extend_from_slice(extra);
        Server::start_wrapped(&[], dir, &args)
    }

    /// Like `start`, run through `wrapper` (a command that execs its arguments, such as
    /// `prlimit --nofile=64`), so the wrapper's pid is the server's.
    pub fn start_wrapped(wrapper: &[&str], dir: &Path, extra: &[&str]) -> Server {
        let log = std::fs::File::create(dir.with_extension("server.log")).expect("log file");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(SERVER);
                c
            }
            None => Command::new(SERVER),
        };
        if !extra.contains(&"--listen") {
            command.args(["--listen", "127.0.0.1:0"]);
        }
        let mut child = command
            .args(["--http-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn sensor-server");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            for _ in 0..2 {
                let line = lines.next().and_then(Result::ok).unwrap_or_default();
                if tx.send(line).is_err() {
                    return;
                }
            }
            // Keep draining so the server never blocks on a full pipe.
            for _ in lines {}
        });
        let next = || {
            rx.recv_timeout(PATIENCE)
                .expect("server printed its addresses")
        };
        let first = next();
        let second = next();
        let addr = first
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("first stdout line: {first:?}"))
            .parse()
            .expect("address");
        let http = second
            .strip_prefix("http on ")
            .unwrap_or_else(|| panic!("second stdout line: {second:?}"))
            .parse()
            .expect("address");
        Server {
            child,
            addr,
            http,
            dir: dir.to_owned(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn connect(&self) -> Conn {
        Conn::open(self.addr)
    }

    /// One HTTP GET: status code and body.
    pub fn get(&self, path: &str) -> (u16, String) {
        http_request(
            self.http,
            &format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n"),
        )
    }

    /// The value of one metric sample line, e.g. `sensorhub_readings_total{status="ok"}`.
    pub fn metric(&self, sample: &str) -> f64 {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200);
        body.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no sample {sample} in\n{body}"))
    }

    pub fn sensors(&self) -> serde_json::Value {
        let (status, body) = self.get("/sensors");
        assert_eq!(status, 200);
        serde_json::from_str(&body).expect("sensors JSON")
    }

    /// Resident memory of the server process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{signal}");
    }

    /// Waits (bounded) for the server to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9, as a crash.
    pub fn crash(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Every record in the store, as JSON values.
    pub fn stored(&self) -> Vec<serde_json::Value> {
        stored_records(&self.dir)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every complete record line of every `*.jsonl` file in `dir`.
pub fn stored_records(dir: &Path) -> Vec<serde_json::Value> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read data dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    names.sort();
    names
        .iter()
        .flat_map(|p| {
            std::fs::read_to_string(p)
                .expect("read segment")
                .lines()
                .map(|l| serde_json::from_str(l).expect("record is JSON"))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Sends a raw HTTP request and returns the status and body.
pub fn http_request(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect http");
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.write_all(request.as_bytes()).expect("send request");
    let mut response = String::new();
    s.read_to_string(&mut response).expect("read response");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad response {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A raw sensor connection with bounded reads.
pub struct Conn {
    pub stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Conn {
    pub fn open(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Conn { stream, reader }
    }

    pub fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.stream.write_all(bytes.as_ref()).expect("send");
    }

    /// The next reply line (without `\n`); panics on EOF or timeout.
    pub fn reply(&mut self) -> String {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read reply");
        assert!(n > 0, "connection closed while a reply was expected");
        assert!(line.ends_with('\n'), "reply without newline: {line:?}");
        line.pop();
        line
    }

    /// The next reply, waiting up to `limit` for it (a store that cannot write holds
    /// replies for as long as that lasts).
    pub fn reply_within(&mut self, limit: Duration) -> String {
        self.stream.set_read_timeout(Some(limit)).expect("timeout");
        let line = self.reply();
        self.stream
            .set_read_timeout(Some(PATIENCE))
            .expect("timeout");
        line
    }

    /// The next reply, parsed.
    pub fn reply_json(&mut self) -> serde_json::Value {
        let line = self.reply();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply {line:?}: {e}"))
    }

    /// Asserts the server closes the connection with nothing more to say.
    pub fn expect_eof(&mut self) {
        let mut rest = String::new();
        match self.reader.read_to_string(&mut rest) {
            Ok(_) => assert!(rest.is_empty(), "unexpected bytes before EOF: {rest:?}"),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        }
    }

    pub fn half_close(&self) {
        self.stream.shutdown(Shutdown::Write).expect("shutdown");
    }
}
