//! `sensor-client`: simulated sensors that pipeline readings over one or many connections
//! and never lose one.
//!
//! Each connection (`Link`) keeps, in order, every reading it has generated and not yet
//! seen answered. The first `sent` of them are on the wire; up to `--window` may be.
//! Replies arrive in order, so each one answers the oldest sent reading. When a
//! connection is lost (EOF, error, or "server busy"), `sent` drops to zero: after a
//! backoff with jitter the link reconnects and resends the whole queue in order. The
//! server answers resends of stored readings `duplicate`, which the client counts as
//! delivered. The queue is bounded (`--buffer`); while it is full, generation waits.
//!
//! One mio loop drives every link, so 15,000 connections cost 15,000 sockets and no
//! threads.

pub mod simulate;

use crate::client::simulate::{RandomWalk, SeqClock, unix_micros};
use crate::wire::reading::{valid_kind, valid_sensor};
use crate::wire::record::encode_reading;
use crate::wire::reply::{Answer, Status, read_reply};
use clap::Parser;
use hdrhistogram::Histogram;
use log::{debug, info, warn};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use rand::RngExt;
use signal_hook_mio::v1_0::Signals;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::fs::File;
use std::io::{self, BufWriter, IsTerminal, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Simulates sensors that send readings to a sensor-server.
#[derive(Debug, Clone, Parser)]
#[command(name = "sensor-client", version = env!("SENSORHUB_VERSION"), about)]
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

    /// Append "SENSOR SEQ STATUS" for every answered reading to this file.
    #[arg(long)]
    pub record: Option<std::path::PathBuf>,

    /// Log level: error, warn, info, debug, trace or off.
    #[arg(long, default_value = "info")]
    pub log_level: log::LevelFilter,
}

const SIGNALS: Token = Token(usize::MAX);
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long a stopping client waits for answers to what it has sent.
const FINAL_WAIT: Duration = Duration::from_secs(10);
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// How often links are checked against the reply timeout.
const STALL_CHECK_EVERY: Duration = Duration::from_millis(250);
/// TCP keepalive: a peer gone without a FIN or RST (a cut link, a dead host) is found
/// after about 5 + 3 x 2 s of silence even while nothing is unanswered.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_PROBES: u32 = 3;

fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 => Ok(s),
        _ => Err(format!("{text:?} is not a positive number of seconds")),
    }
}

/// One simulated sensor.
struct Sensor {
    id: String,
    walk: RandomWalk,
    clock: SeqClock,
    link: usize,
}

/// A generated reading, kept until answered (re-encoded on every send).
struct Pending {
    sensor: u32,
    seq: u64,
    ts_ms: u64,
    value: f64,
    sent_at: Instant,
    /// Written at least once before (this send is a resend).
    resend: bool,
}

enum LinkState {
    /// Waiting for its retry (queued in `Client::retries`).
    Down,
    /// Connecting since the given time.
    Connecting(TcpStream, Instant),
    Up(TcpStream),
}

/// One connection and the readings it carries.
struct Link {
    state: LinkState,
    queue: VecDeque<Pending>,
    /// `queue[..sent]` are written on the current connection and await replies.
    sent: usize,
    out: Vec<u8>,
    written: usize,
    input: Vec<u8>,
    failures: u32,
    writable: bool,
    /// The poller reported the server's FIN: read until EOF (see `read_replies`).
    hup: bool,
    /// The sensors this link carries, and which one's turn it is (bench mode).
    sensors: Vec<usize>,
    next_sensor: usize,
    /// Listed in `Client::touched`: it has new readings to send or room to refill.
    touched: bool,
}

/// Totals printed at exit.
#[derive(Debug, Default, Clone)]
pub struct Totals {
    pub sent: u64,
    pub resent: u64,
    pub ok: u64,
    pub duplicate: u64,
    pub rejected: u64,
    pub error: u64,
    pub reconnects: u64,
    pub generation_waits: u64,
    /// Replies whose seq did not match the reading they answer.
    pub violations: u64,
    /// Connections dropped for exceeding the reply timeout.
    pub stalls: u64,
}

impl Totals {
    fn answered(&self) -> u64 {
        self.ok + self.duplicate + self.rejected + self.error
    }
}

/// The client: its sensors, its links and the loop that drives them.
pub struct Client {
    config: ClientConfig,
    poll: Poll,
    signals: Signals,
    addrs: Vec<SocketAddr>,
    sensors: Vec<Sensor>,
    links: Vec<Link>,
    /// Sensors by due time; all share one interval, so a FIFO stays sorted.
    due: VecDeque<(Instant, usize)>,
    /// Links waiting to reconnect, earliest first.
    retries: BinaryHeap<Reverse<(Instant, usize)>>,
    /// Links with something new since the last pass, so a pass costs what changed, not
    /// the number of links (15,000 in the memory benchmark).
    touched: Vec<usize>,
    /// Readings generated and not yet answered, over all links.
    unanswered: usize,
    totals: Totals,
    latency: Histogram<u64>,
    generated: u64,
    generating: bool,
    started: Instant,
    stop_at: Option<Instant>,
    finish_by: Option<Instant>,
    down_since: Option<Instant>,
    record: Option<BufWriter<File>>,
    interval: Duration,
    reply_timeout: Duration,
    next_stall_check: Instant,
}

impl Client {
    pub fn new(config: ClientConfig) -> Result<Client, String> {
        validate_names(&config)?;
        let addrs: Vec<SocketAddr> = config
            .server
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {}: {e}", config.server))?
            .collect();
        if addrs.is_empty() {
            return Err(format!("{} resolves to no address", config.server));
        }
        let ids: Vec<String> = match (&config.sensor, config.sensors) {
            (Some(id), _) => vec![id.clone()],
            (None, Some(n)) => (0..n)
                .map(|i| format!("{}-{i}", config.sensor_prefix))
                .collect(),
            (None, None) => return Err("give --sensor ID or --sensors N".into()),
        };
        if ids.is_empty() {
            return Err("--sensors must be at least 1".into());
        }
        let links_count = (config.connections as usize).min(ids.len());
        let poll = Poll::new().map_err(|e| e.to_string())?;
        let mut signals = Signals::new([signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT])
            .map_err(|e| e.to_string())?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)
            .map_err(|e| e.to_string())?;
        let now = Instant::now();
        let interval = Duration::from_millis(config.interval_ms.max(1));
        let sensors: Vec<Sensor> = ids
            .into_iter()
            .enumerate()
            .map(|(i, id)| Sensor {
                id,
                walk: RandomWalk::new(&config.kind),
                clock: SeqClock::default(),
                link: i % links_count,
            })
            .collect();
        // Spread first readings over one interval so thousands of sensors do not fire
        // in the same instant.
        let n = sensors.len() as u32;
        let due = (0..sensors.len())
            .map(|i| (now + interval * i as u32 / n, i))
            .collect();
        let links = (0..links_count)
            .map(|l| Link {
                state: LinkState::Down,
                queue: VecDeque::new(),
                sent: 0,
                out: Vec::new(),
                written: 0,
                input: Vec::new(),
                failures: 0,
                writable: false,
                hup: false,
                sensors: (l..sensors.len()).step_by(links_count).collect(),
                next_sensor: 0,
                touched: true,
            })
            .collect();
        let record = match &config.record {
            Some(path) => Some(BufWriter::new(
                File::options()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| format!("cannot open {}: {e}", path.display()))?,
            )),
            None => None,
        };
        let stop_at = config
            .duration
            .map(|s| now + Duration::from_secs_f64(s.max(0.0)));
        let config_reply_timeout = config.reply_timeout;
        Ok(Client {
            retries: (0..links_count).map(|i| Reverse((now, i))).collect(),
            touched: (0..links_count).collect(),
            unanswered: 0,
            config,
            poll,
            signals,
            addrs,
            sensors,
            links,
            due,
            totals: Totals::default(),
            latency: Histogram::new_with_bounds(1, 600_000_000, 3).map_err(|e| e.to_string())?,
            generated: 0,
            generating: true,
            started: now,
            stop_at,
            finish_by: None,
            down_since: Some(now),
            record,
            interval,
            reply_timeout: Duration::from_secs_f64(config_reply_timeout),
            next_stall_check: now + STALL_CHECK_EVERY,
        })
    }

    /// Runs until `--count` readings are answered, `--duration` is over, or a signal;
    /// returns the totals and whether every reading was delivered.
    pub fn run(mut self) -> Result<Totals, String> {
        let mut events = Events::with_capacity(1024);
        let mut next_progress = self.started + PROGRESS_EVERY;
        let show_progress = io::stderr().is_terminal() && !self.config.quiet;
        let mut progress_from = (self.started, 0);
        loop {
            let now = Instant::now();
            self.generate(now);
            if now >= self.next_stall_check {
                self.next_stall_check = now + STALL_CHECK_EVERY;
                self.drop_stalled(now);
            }
            self.reconnect_due(now);
            for i in std::mem::take(&mut self.touched) {
                self.links[i].touched = false;
                self.pump(i);
            }
            if self.finished() {
                break;
            }
            if let Some(since) = self.down_since
                && now - since > Duration::from_secs(self.config.give_up_after)
            {
                self.print_summary();
                return Err(format!(
                    "server {} unreachable for {} s; giving up with {} readings unanswered",
                    self.config.server,
                    self.config.give_up_after,
                    self.unanswered()
                ));
            }
            if self.finish_by.is_some_and(|t| now >= t) {
                self.print_summary();
                return Err(format!(
                    "stopped with {} readings unanswered",
                    self.unanswered()
                ));
            }
            if show_progress && now >= next_progress {
                next_progress = now + PROGRESS_EVERY;
                eprintln!("{}", self.progress_line(progress_from, now));
                progress_from = (now, self.totals.ok + self.totals.duplicate);
            }
            let timeout = self.poll_timeout(now);
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(format!("poll: {e}"));
            }
            for event in events.iter() {
                if event.token() == SIGNALS {
                    if self.signals.pending().next().is_some() {
                        self.stop_generating(Instant::now());
                    }
                    continue;
                }
                let i = event.token().0;
                if i >= self.links.len() {
                    continue;
                }
                if event.is_writable() || event.is_error() || event.is_write_closed() {
                    self.links[i].writable = true;
                }
                if event.is_read_closed() || event.is_error() {
                    self.links[i].hup = true;
                }
                self.on_ready(i);
            }
        }
        self.print_summary();
        if let Some(record) = &mut self.record {
            record.flush().map_err(|e| format!("record file: {e}"))?;
        }
        let t = &self.totals;
        if t.rejected > 0 || t.error > 0 {
            return Err(format!(
                "{} readings rejected and {} answered error",
                t.rejected, t.error
            ));
        }
        Ok(self.totals.clone())
    }

    fn finished(&self) -> bool {
        let all_answered = self.unanswered() == 0;
        match self.config.count {
            Some(count) if self.totals.answered() >= count => true,
            _ => !self.generating && all_answered,
        }
    }

    fn unanswered(&self) -> usize {
        self.unanswered
    }

    fn touch(&mut self, link: usize) {
        if !self.links[link].touched {
            self.links[link].touched = true;
            self.touched.push(link);
        }
    }

    fn stop_generating(&mut self, now: Instant) {
        if self.generating {
            self.generating = false;
            self.finish_by = Some(now + FINAL_WAIT);
        } else {
            // A second signal: stop waiting.
            self.finish_by = Some(now);
        }
    }

    fn poll_timeout(&self, now: Instant) -> Duration {
        let mut until = (now + PROGRESS_EVERY).min(self.next_stall_check);
        if self.generating
            && !self.config.bench
            && let Some((t, _)) = self.due.front()
        {
            until = until.min(*t);
        }
        if let Some(Reverse((t, _))) = self.retries.peek() {
            until = until.min(*t);
        }
        for t in [self.stop_at, self.finish_by].into_iter().flatten() {
            until = until.min(t);
        }
        until.saturating_duration_since(now)
    }

    // --- generation ------------------------------------------------------------------

    fn generate(&mut self, now: Instant) {
        if self.stop_at.is_some_and(|t| now >= t) {
            self.stop_generating(now);
            self.stop_at = None;
        }
        if !self.generating {
            return;
        }
        if self.config.bench {
            // Keep each touched link's queue one window ahead of its replies, taking
            // its sensors in turn.
            let window = self.config.window as usize;
            for &l in &self.touched.clone() {
                while self.links[l].queue.len() < window && self.may_generate() {
                    let link = &mut self.links[l];
                    let s = link.sensors[link.next_sensor % link.sensors.len()];
                    link.next_sensor += 1;
                    self.push_reading(s, now);
                }
            }
            return;
        }
        while let Some(&(at, s)) = self.due.front() {
            if at > now || !self.may_generate() {
                break;
            }
            self.due.pop_front();
            let link = self.sensors[s].link;
            if self.links[link].queue.len() < self.config.buffer as usize {
                self.push_reading(s, now);
            } else {
                self.totals.generation_waits += 1;
            }
            // The next reading keeps the sensor's cadence; a late loop does not
            // produce a burst of catch-up readings.
            let next = (at + self.interval).max(now);
            self.due.push_back((next, s));
        }
        if !self.may_generate() {
            self.generating = false;
        }
    }

    fn may_generate(&self) -> bool {
        self.config.count.is_none_or(|c| self.generated < c)
    }

    fn push_reading(&mut self, s: usize, now: Instant) {
        let micros = unix_micros();
        let sensor = &mut self.sensors[s];
        let pending = Pending {
            sensor: s as u32,
            seq: sensor.clock.next(micros),
            ts_ms: micros / 1000,
            value: sensor.walk.next_value(),
            sent_at: now,
            resend: false,
        };
        let link = sensor.link;
        self.links[link].queue.push_back(pending);
        self.generated += 1;
        self.unanswered += 1;
        self.touch(link);
    }

    // --- connections -----------------------------------------------------------------

    fn reconnect_due(&mut self, now: Instant) {
        while let Some(&Reverse((at, i))) = self.retries.peek() {
            if at > now {
                break;
            }
            self.retries.pop();
            if matches!(self.links[i].state, LinkState::Down) {
                self.connect(i, now);
            }
        }
    }

    /// Drops every connection whose oldest unanswered reading, or whose connect, is
    /// older than the reply timeout: a stopped or half-open server would otherwise hold
    /// its readings forever. Their readings are resent on the next connection.
    fn drop_stalled(&mut self, now: Instant) {
        for i in 0..self.links.len() {
            let link = &self.links[i];
            let since = match &link.state {
                LinkState::Up(_) if link.sent > 0 => link.queue[0].sent_at,
                LinkState::Connecting(_, since) => *since,
                _ => continue,
            };
            let waited = now.saturating_duration_since(since);
            if waited > self.reply_timeout {
                self.totals.stalls += 1;
                // Unanswered since `since`: that is how long it has been unreachable.
                self.down_since = Some(self.down_since.map_or(since, |d| d.min(since)));
                self.lose(
                    i,
                    now,
                    &format_args!("nothing answered for {:.1} s", waited.as_secs_f64()),
                );
            }
        }
    }

    fn connect(&mut self, i: usize, now: Instant) {
        let addr = self.addrs[(self.links[i].failures as usize) % self.addrs.len()];
        match TcpStream::connect(addr) {
            Ok(mut stream) => {
                let keepalive = socket2::TcpKeepalive::new()
                    .with_time(KEEPALIVE_IDLE)
                    .with_interval(KEEPALIVE_INTERVAL)
                    .with_retries(KEEPALIVE_PROBES);
                if let Err(e) = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive) {
                    debug!("connection {i}: keepalive: {e}");
                }
                let interest = Interest::READABLE | Interest::WRITABLE;
                if let Err(e) = self
                    .poll
                    .registry()
                    .register(&mut stream, Token(i), interest)
                {
                    self.lose(i, now, &format_args!("register: {e}"));
                    return;
                }
                self.links[i].state = LinkState::Connecting(stream, now);
            }
            Err(e) => self.lose(i, now, &format_args!("connect {addr}: {e}")),
        }
    }

    /// The connection is gone: everything unanswered will be resent after a backoff.
    fn lose(&mut self, i: usize, now: Instant, why: &dyn std::fmt::Display) {
        let link = &mut self.links[i];
        match std::mem::replace(&mut link.state, LinkState::Down) {
            LinkState::Up(mut s) => {
                let _ = self.poll.registry().deregister(&mut s);
                self.totals.reconnects += 1;
                info!(
                    "connection {i} to {} lost ({why}); resending {} unanswered after a backoff",
                    self.config.server,
                    link.queue.len()
                );
            }
            // Never established: not a reconnect.
            LinkState::Connecting(mut s, _) => {
                let _ = self.poll.registry().deregister(&mut s);
                info!("cannot connect to {} ({why}); retrying", self.config.server);
            }
            LinkState::Down => info!("cannot connect to {} ({why}); retrying", self.config.server),
        }
        link.sent = 0;
        link.out.clear();
        link.written = 0;
        link.input.clear();
        link.writable = false;
        link.hup = false;
        link.failures = link.failures.saturating_add(1);
        let exp = BACKOFF_FIRST
            .saturating_mul(1 << link.failures.min(8))
            .min(BACKOFF_MAX);
        let jitter = rand::rng().random_range(0.5..=1.0);
        let retry_at = now + exp.mul_f64(jitter);
        self.retries.push(Reverse((retry_at, i)));
        self.down_since.get_or_insert(now);
    }

    fn on_ready(&mut self, i: usize) {
        let now = Instant::now();
        if let LinkState::Connecting(stream, _) = &self.links[i].state {
            match stream.take_error() {
                Ok(None) if stream.peer_addr().is_ok() => {}
                Ok(None) => return, // not connected yet: wait for the next edge
                Ok(Some(e)) | Err(e) => {
                    self.lose(i, now, &format_args!("connect: {e}"));
                    return;
                }
            }
            let LinkState::Connecting(stream, _) =
                std::mem::replace(&mut self.links[i].state, LinkState::Down)
            else {
                return;
            };
            let _ = stream.set_nodelay(true);
            self.links[i].state = LinkState::Up(stream);
            self.links[i].writable = true;
            if self.links[i].queue.is_empty() {
                self.down_since = None;
            }
        }
        if !matches!(self.links[i].state, LinkState::Up(_)) {
            return;
        }
        if let Err(e) = self.read_replies(i, now) {
            self.lose(i, now, &e);
            return;
        }
        // Replies made room: refill (bench) and send on the next pass.
        self.touch(i);
    }

    /// Encodes what the window allows and writes what the socket takes.
    fn pump(&mut self, i: usize) {
        let now = Instant::now();
        let window = self.config.window as usize;
        let link = &mut self.links[i];
        let LinkState::Up(stream) = &link.state else {
            return;
        };
        while link.sent < link.queue.len() && link.sent < window {
            let p = &mut link.queue[link.sent];
            let sensor = &self.sensors[p.sensor as usize];
            encode_reading(
                &mut link.out,
                &sensor.id,
                &self.config.kind,
                p.value,
                p.seq,
                p.ts_ms,
            );
            if p.resend {
                self.totals.resent += 1;
            } else {
                self.totals.sent += 1;
                p.resend = true;
            }
            p.sent_at = now;
            link.sent += 1;
        }
        let mut stream = stream;
        while link.writable && link.written < link.out.len() {
            match stream.write(&link.out[link.written..]) {
                Ok(n) => link.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => link.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.lose(i, now, &format_args!("write: {e}"));
                    return;
                }
            }
        }
        if link.written == link.out.len() {
            link.out.clear();
            link.written = 0;
        }
    }

    fn read_replies(&mut self, i: usize, now: Instant) -> io::Result<()> {
        let mut buf = [0u8; 16 * 1024];
        loop {
            let LinkState::Up(stream) = &self.links[i].state else {
                return Ok(());
            };
            let mut stream = stream;
            match stream.read(&mut buf) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "server closed",
                    ));
                }
                Ok(n) => {
                    self.links[i].input.extend_from_slice(&buf[..n]);
                    self.handle_replies(i, now)?;
                    if n < buf.len() && !self.links[i].hup {
                        return Ok(()); // drained; see `Connection::fill` in the server
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn handle_replies(&mut self, i: usize, now: Instant) -> io::Result<()> {
        let input = std::mem::take(&mut self.links[i].input);
        let mut start = 0;
        let mut result = Ok(());
        for end in memchr::memchr_iter(b'\n', &input) {
            let line = &input[start..end];
            start = end + 1;
            if let Err(e) = self.handle_reply(i, line, now) {
                result = Err(e);
                break;
            }
        }
        if result.is_ok() {
            self.links[i].input = input[start..].to_vec();
        }
        result
    }

    fn handle_reply(&mut self, i: usize, line: &[u8], now: Instant) -> io::Result<()> {
        let Answer { seq, status, error } =
            read_reply(line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if seq.is_none() && error.as_deref() == Some("server busy") {
            return Err(io::Error::other("server busy"));
        }
        if !matches!(status, Status::Ok | Status::Duplicate) {
            warn!(
                "reading answered {}: {}",
                status.as_str(),
                error.as_deref().unwrap_or("")
            );
        }
        let link = &mut self.links[i];
        if link.sent == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "reply to nothing sent",
            ));
        }
        let Some(expected) = link.queue.front().map(|p| p.seq) else {
            return Ok(());
        };
        // Every reading this client sends is valid JSON with a seq, so every reply must
        // echo it: anything else answers some other reading, and counting it would
        // drop this one unstored.
        if seq != Some(expected) {
            self.totals.violations += 1;
            let got = String::from_utf8_lossy(line);
            warn!("protocol violation: reply {got:?} to the reading with seq {expected}");
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("reply {got:?} does not answer seq {expected}"),
            ));
        }
        let Some(p) = link.queue.pop_front() else {
            return Ok(());
        };
        link.sent -= 1;
        self.unanswered -= 1;
        link.failures = 0;
        self.down_since = None;
        let t = &mut self.totals;
        match status {
            Status::Ok => t.ok += 1,
            Status::Duplicate => t.duplicate += 1,
            Status::Rejected => t.rejected += 1,
            Status::Error => t.error += 1,
        }
        if t.ok + t.duplicate == 1 && matches!(status, Status::Ok | Status::Duplicate) {
            // What a deployment's health check waits for (infra/bootstrap.sh).
            info!("first reading acknowledged by {}", self.config.server);
        }
        let micros = now.saturating_duration_since(p.sent_at).as_micros() as u64;
        let _ = self.latency.record(micros.max(1));
        if let Some(record) = &mut self.record {
            let sensor = &self.sensors[p.sensor as usize].id;
            writeln!(record, "{sensor} {} {}", p.seq, status.as_str())?;
        }
        Ok(())
    }

    // --- reporting -------------------------------------------------------------------

    fn summary_line(&self) -> String {
        let t = &self.totals;
        let ms = |q: f64| self.latency.value_at_quantile(q) as f64 / 1000.0;
        let mut line = format!(
            "sent {} resent {} ok {} duplicate {} rejected {} error {} reconnects {} latency p50 {:.3} ms p99 {:.3} ms",
            t.sent,
            t.resent,
            t.ok,
            t.duplicate,
            t.rejected,
            t.error,
            t.reconnects,
            ms(0.5),
            ms(0.99)
        );
        if t.stalls > 0 || t.violations > 0 {
            line.push_str(&format!(
                " stalled-connections {} protocol-violations {}",
                t.stalls, t.violations
            ));
        }
        line
    }

    /// What a person watching the terminal wants: who, how many stored, how fast, how
    /// many waiting for an answer, how often the connection was lost.
    fn progress_line(&self, (since, acked_then): (Instant, u64), now: Instant) -> String {
        let t = &self.totals;
        let acked = t.ok + t.duplicate;
        let secs = now.saturating_duration_since(since).as_secs_f64().max(1e-3);
        let who = match &self.config.sensor {
            Some(id) => id.clone(),
            None => format!("{} sensors", self.sensors.len()),
        };
        format!(
            "{who}: {acked} stored ({:.1}/s), {} in flight, {} reconnects",
            (acked - acked_then) as f64 / secs,
            self.unanswered(),
            t.reconnects
        )
    }

    fn print_summary(&self) {
        println!("{}", self.summary_line());
        if self.totals.generation_waits > 0 {
            println!(
                "generation waited {} times on a full buffer",
                self.totals.generation_waits
            );
        }
        if self.config.bench {
            let secs = self.started.elapsed().as_secs_f64();
            let answered = self.totals.answered();
            let ms = |q: f64| self.latency.value_at_quantile(q) as f64 / 1000.0;
            println!(
                "bench: {answered} readings in {secs:.2} s = {:.0} readings/s; latency p50 {:.3} ms p99 {:.3} ms p99.9 {:.3} ms max {:.3} ms",
                answered as f64 / secs,
                ms(0.5),
                ms(0.99),
                ms(0.999),
                self.latency.max() as f64 / 1000.0
            );
            let ahead = self
                .sensors
                .iter()
                .map(|s| s.clock.ahead_of(unix_micros()))
                .max()
                .unwrap_or(0);
            if ahead > 0 {
                info!("seqs ran {ahead} µs ahead of the clock (over 1M readings/s per sensor)");
            }
        }
    }
}

fn validate_names(config: &ClientConfig) -> Result<(), String> {
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
