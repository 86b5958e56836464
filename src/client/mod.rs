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
//! threads. With `--stdin` the one sensor's values come from standard input instead
//! (`input.rs`: a thread reads them and wakes the loop), kept in a spool until answered
//! with `--spool` (`spool.rs`).

mod config;
mod input;
mod link;
mod report;
pub mod simulate;
mod spool;

pub use config::ClientConfig;
pub use report::Totals;

use crate::client::config::validate_names;
use crate::client::input::Feed;
use crate::client::link::{Link, LinkState, Pending};
use crate::client::report::Report;
use crate::client::simulate::{RandomWalk, SeqClock, unix_micros};
use crate::client::spool::{Spool, Spooled};
use crate::tls::{TlsStream, Transport};
use crate::wire::reply::{Answer, Status, read_reply};
use log::{debug, info, warn};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};
use rand::RngExt;
use rustls::pki_types::ServerName;
use signal_hook_mio::v1_0::Signals;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io::{self, IsTerminal};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SIGNALS: Token = Token(usize::MAX);
/// Rung by the thread reading standard input (`--stdin`).
const INPUT: Token = Token(usize::MAX - 1);
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

/// One simulated sensor.
struct Sensor {
    id: String,
    walk: RandomWalk,
    clock: SeqClock,
    link: usize,
}

/// The client: its sensors, its links and the loop that drives them.
pub struct Client {
    config: ClientConfig,
    poll: Poll,
    signals: Signals,
    addrs: Vec<SocketAddr>,
    sensors: Vec<Sensor>,
    links: Vec<Link>,
    /// `--stdin`: where the one sensor's readings come from instead of its random walk.
    feed: Option<Feed>,
    /// `--tls-ca`: connections speak TLS with this configuration, to this name.
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    /// TLS failures already explained (`explain_tls_failure`).
    tls_warned: Vec<&'static str>,
    /// Sensors by due time; all share one interval, so a FIFO stays sorted.
    due: VecDeque<(Instant, usize)>,
    /// Links waiting to reconnect, earliest first.
    retries: BinaryHeap<Reverse<(Instant, usize)>>,
    /// Links with something new since the last pass, so a pass costs what changed, not
    /// the number of links (15,000 in the memory benchmark).
    touched: Vec<usize>,
    /// Readings generated and not yet answered, over all links.
    unanswered: usize,
    report: Report,
    generated: u64,
    generating: bool,
    started: Instant,
    stop_at: Option<Instant>,
    finish_by: Option<Instant>,
    down_since: Option<Instant>,
    interval: Duration,
    reply_timeout: Duration,
    next_stall_check: Instant,
}

impl Client {
    pub fn new(config: ClientConfig) -> Result<Client, String> {
        validate_names(&config)?;
        let addrs = resolve(&config.server)?;
        let tls = tls_config(&config)?;
        let ids = sensor_ids(&config)?;
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
        let due = match config.stdin {
            true => VecDeque::new(),
            false => (0..sensors.len())
                .map(|i| (now + interval * i as u32 / n, i))
                .collect(),
        };
        let feed = match config.stdin {
            true => Some(start_feed(&config, &poll)?),
            false => None,
        };
        let links = (0..links_count)
            .map(|l| Link::new((l..sensors.len()).step_by(links_count).collect()))
            .collect();
        Ok(Client {
            retries: (0..links_count).map(|i| Reverse((now, i))).collect(),
            touched: (0..links_count).collect(),
            unanswered: 0,
            report: Report::new(config.record.as_deref())?,
            stop_at: config
                .duration
                .map(|s| now + Duration::from_secs_f64(s.max(0.0))),
            reply_timeout: Duration::from_secs_f64(config.reply_timeout),
            config,
            poll,
            signals,
            addrs,
            sensors,
            links,
            feed,
            tls,
            tls_warned: Vec::new(),
            due,
            generated: 0,
            generating: true,
            started: now,
            finish_by: None,
            down_since: Some(now),
            interval,
            next_stall_check: now + STALL_CHECK_EVERY,
        })
    }

    /// Runs until `--count` readings are answered, `--duration` is over, or a signal;
    /// returns the totals, or an error unless every reading was stored.
    pub fn run(mut self) -> Result<Totals, String> {
        let mut events = Events::with_capacity(1024);
        let mut next_progress = self.started + PROGRESS_EVERY;
        let show_progress = io::stderr().is_terminal() && !self.config.quiet;
        let mut progress_from = (self.started, 0);
        loop {
            let now = Instant::now();
            self.step(now);
            if self.finished() {
                break;
            }
            self.check_give_up(now)?;
            if show_progress && now >= next_progress {
                next_progress = now + PROGRESS_EVERY;
                let who = match &self.config.sensor {
                    Some(id) => id.clone(),
                    None => format!("{} sensors", self.sensors.len()),
                };
                let line = self
                    .report
                    .progress_line(&who, progress_from, now, self.unanswered);
                eprintln!("{line}");
                progress_from = (now, self.report.totals.acknowledged());
            }
            let timeout = self.poll_timeout(now);
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(format!("poll: {e}"));
            }
            for event in events.iter() {
                self.on_event(event);
            }
        }
        self.print_summary();
        self.report
            .finish()
            .map_err(|e| format!("record file: {e}"))?;
        if let Some(ended) = self.feed.as_mut().and_then(Feed::ended) {
            if let Some(spool) = &mut ended.spool {
                // Everything read was answered: nothing to send again next time.
                spool
                    .clear()
                    .map_err(|e| format!("spool {}: {e}", spool.dir().display()))?;
            }
            if let Some(e) = &ended.error {
                return Err(format!("reading standard input failed: {e}"));
            }
            if ended.bad_lines > 0 {
                let lines = match ended.bad_lines {
                    1 => "1 input line was not a value".to_string(),
                    n => format!("{n} input lines were not values"),
                };
                return Err(format!(
                    "{lines} (see the warnings above); every other value was answered"
                ));
            }
        }
        let t = &self.report.totals;
        if t.rejected > 0 || t.error > 0 {
            return Err(format!(
                "{} readings rejected and {} answered error",
                t.rejected, t.error
            ));
        }
        Ok(t.clone())
    }

    /// One pass of work that does not wait for the poller: generate, drop stalled
    /// links, reconnect, send.
    fn step(&mut self, now: Instant) {
        self.generate(now);
        if now >= self.next_stall_check {
            self.next_stall_check = now + STALL_CHECK_EVERY;
            self.drop_stalled(now);
        }
        self.reconnect_due(now);
        for i in std::mem::take(&mut self.touched) {
            self.links[i].touched = false;
            self.pump(i, now);
        }
    }

    /// Gives up once the server was unreachable for `--give-up-after`, or a stop's wait
    /// for answers is over.
    fn check_give_up(&mut self, now: Instant) -> Result<(), String> {
        if let Some(since) = self.down_since
            && now - since > Duration::from_secs(self.config.give_up_after)
        {
            self.print_summary();
            return Err(format!(
                "server {} unreachable for {} s; giving up with {} readings unanswered",
                self.config.server, self.config.give_up_after, self.unanswered
            ));
        }
        if self.finish_by.is_some_and(|t| now >= t) {
            self.print_summary();
            return Err(format!(
                "stopped with {} readings unanswered",
                self.unanswered
            ));
        }
        Ok(())
    }

    fn on_event(&mut self, event: &mio::event::Event) {
        if event.token() == SIGNALS {
            if self.signals.pending().next().is_some() {
                self.stop_generating(Instant::now());
            }
            return;
        }
        if event.token() == INPUT {
            return; // the next pass takes what was read
        }
        let i = event.token().0;
        let Some(link) = self.links.get_mut(i) else {
            return;
        };
        // A TLS read can make room for writes (the handshake finishing releases the
        // readings queued meanwhile), so any event counts as writable for TLS.
        let tls = matches!(&link.state, LinkState::Up(t) if t.is_tls());
        if event.is_writable() || event.is_error() || event.is_write_closed() || tls {
            link.writable = true;
        }
        if event.is_read_closed() || event.is_error() {
            link.hup = true;
        }
        self.on_ready(i);
    }

    fn finished(&self) -> bool {
        match self.config.count {
            Some(count) if self.report.totals.answered() >= count => true,
            _ => !self.generating && self.unanswered == 0,
        }
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
            self.generate_bench(now);
            return;
        }
        if self.feed.is_some() {
            self.take_input(now);
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
                self.report.totals.generation_waits += 1;
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

    /// Keeps each touched link's queue one window ahead of its replies, taking its
    /// sensors in turn.
    fn generate_bench(&mut self, now: Instant) {
        let window = self.config.window as usize;
        for &l in &self.touched.clone() {
            while self.links[l].queue.len() < window && self.may_generate() {
                let link = &mut self.links[l];
                let s = link.sensors[link.next_sensor % link.sensors.len()];
                link.next_sensor += 1;
                self.push_reading(s, now);
            }
        }
        if !self.may_generate() {
            self.generating = false;
        }
    }

    /// Queues what standard input gave, while the link has room (`--buffer`); the
    /// reading thread waits meanwhile, and so does the writer of the pipe.
    fn take_input(&mut self, now: Instant) {
        let Some(feed) = &mut self.feed else {
            return;
        };
        let link = self.sensors[0].link;
        let mut taken = Vec::new();
        let room = (self.config.buffer as usize).saturating_sub(self.links[link].queue.len());
        while taken.len() < room
            && let Some(reading) = feed.next()
        {
            taken.push(reading);
        }
        if feed.ended().is_some() {
            self.generating = false;
        }
        for reading in taken {
            self.queue_reading(0, reading, now);
        }
    }

    fn may_generate(&self) -> bool {
        self.config.count.is_none_or(|c| self.generated < c)
    }

    fn push_reading(&mut self, s: usize, now: Instant) {
        let micros = unix_micros();
        let sensor = &mut self.sensors[s];
        let reading = Spooled {
            seq: sensor.clock.next(micros),
            ts_ms: micros / 1000,
            value: sensor.walk.next_value(),
        };
        self.queue_reading(s, reading, now);
    }

    /// Queues a reading of sensor `s` on its link, to be sent and kept until answered.
    fn queue_reading(&mut self, s: usize, reading: Spooled, now: Instant) {
        let pending = Pending {
            sensor: s as u32,
            seq: reading.seq,
            ts_ms: reading.ts_ms,
            value: reading.value,
            sent_at: now,
            resend: false,
        };
        let link = self.sensors[s].link;
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
                self.report.totals.stalls += 1;
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
        let mut stream = match TcpStream::connect(addr) {
            Ok(stream) => stream,
            Err(e) => return self.lose(i, now, &format_args!("connect {addr}: {e}")),
        };
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
            return self.lose(i, now, &format_args!("register: {e}"));
        }
        self.links[i].state = LinkState::Connecting(stream, now);
    }

    /// The connection is gone: everything unanswered will be resent after a backoff.
    fn lose(&mut self, i: usize, now: Instant, why: &dyn std::fmt::Display) {
        let link = &mut self.links[i];
        let server = &self.config.server;
        match std::mem::replace(&mut link.state, LinkState::Down) {
            LinkState::Up(mut s) => {
                let _ = self.poll.registry().deregister(s.tcp_mut());
                self.report.totals.reconnects += 1;
                info!(
                    "connection {i} to {server} lost ({why}); resending {} unanswered after a backoff",
                    link.queue.len()
                );
            }
            // Never established: not a reconnect.
            LinkState::Connecting(mut s, _) => {
                let _ = self.poll.registry().deregister(&mut s);
                info!("cannot connect to {server} ({why}); retrying");
            }
            LinkState::Down => info!("cannot connect to {server} ({why}); retrying"),
        }
        let jitter = rand::rng().random_range(0.5..=1.0);
        let delay = link.reset(BACKOFF_FIRST, BACKOFF_MAX, jitter);
        self.retries.push(Reverse((now + delay, i)));
        self.down_since.get_or_insert(now);
    }

    fn on_ready(&mut self, i: usize) {
        let now = Instant::now();
        if let LinkState::Connecting(stream, _) = &self.links[i].state {
            match stream.take_error() {
                Ok(None) if stream.peer_addr().is_ok() => {}
                Ok(None) => return, // not connected yet: wait for the next edge
                Ok(Some(e)) | Err(e) => return self.lose(i, now, &format_args!("connect: {e}")),
            }
            let link = &mut self.links[i];
            if let LinkState::Connecting(stream, _) =
                std::mem::replace(&mut link.state, LinkState::Down)
            {
                let _ = stream.set_nodelay(true);
                link.state = LinkState::Up(match &self.tls {
                    None => Transport::Plain(stream),
                    Some((config, name)) => {
                        match rustls::ClientConnection::new(config.clone(), name.clone()) {
                            Ok(session) => {
                                Transport::Tls(Box::new(TlsStream::new(stream, session)))
                            }
                            Err(e) => return self.lose(i, now, &format_args!("TLS: {e}")),
                        }
                    }
                });
                link.writable = true;
                if link.queue.is_empty() {
                    self.down_since = None;
                }
            }
        }
        if !matches!(self.links[i].state, LinkState::Up(_)) {
            return;
        }
        // Taken out for the call (an empty link allocates nothing), so that `answer` can
        // update the client's totals while it works on the link.
        let mut link = std::mem::replace(&mut self.links[i], Link::new(Vec::new()));
        let received = link.receive(|link, line| self.answer(link, line, now));
        self.links[i] = link;
        if let Err(e) = received {
            self.explain_tls_failure(&e);
            return self.lose(i, now, &e);
        }
        // Replies made room: refill (bench) and send on the next pass.
        self.touch(i);
    }

    /// A TLS failure that retrying will not cure by itself gets a warning saying what to
    /// check, once per kind of failure (the reconnects that follow log at info).
    fn explain_tls_failure(&mut self, e: &io::Error) {
        let Some(reason) = crate::tls::failure_reason(e) else {
            return;
        };
        let hint = match reason {
            "unknown_ca" | "bad_certificate" | "expired" | "not_yet_valid" => {
                "the server's certificate is not trusted: check --tls-ca and --tls-server-name"
            }
            "peer_alert" => {
                "the server refused this client: check that --tls-cert comes from the CA the \
                 server trusts and is still valid"
            }
            "not_tls" => "the server does not speak TLS on this port (drop --tls-ca?)",
            _ => return,
        };
        if !self.tls_warned.contains(&reason) {
            self.tls_warned.push(reason);
            warn!("{e}: {hint}; retrying until --give-up-after");
        }
    }

    /// Encodes what the window allows and writes what the socket takes.
    fn pump(&mut self, i: usize, now: Instant) {
        let sensors = &self.sensors;
        let id_of = |s: u32| sensors[s as usize].id.as_str();
        let window = self.config.window as usize;
        let (sent, flushed) = self.links[i].send(window, &self.config.kind, id_of, now);
        self.report.totals.sent += sent.first_time;
        self.report.totals.resent += sent.again;
        if let Err(e) = flushed {
            self.lose(i, now, &format_args!("write: {e}"));
        }
    }

    /// One reply line on `link`: it must answer the oldest reading sent.
    fn answer(&mut self, link: &mut Link, line: &[u8], now: Instant) -> io::Result<()> {
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
            self.report.totals.violations += 1;
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
        link.failures = 0;
        self.unanswered -= 1;
        if let Some(feed) = &self.feed {
            feed.answered(p.seq);
        }
        self.down_since = None;
        let sensor = &self.sensors[p.sensor as usize].id;
        let waited = now.saturating_duration_since(p.sent_at);
        self.report.answer(status, sensor, p.seq, waited)?;
        if self.report.totals.acknowledged() == 1
            && matches!(status, Status::Ok | Status::Duplicate)
        {
            // What a deployment's health check waits for (infra/bootstrap.sh).
            info!("first reading acknowledged by {}", self.config.server);
        }
        Ok(())
    }

    fn print_summary(&self) {
        println!("{}", self.report.summary_line());
        let waits = self.report.totals.generation_waits;
        if waits > 0 {
            println!("generation waited {waits} times on a full buffer");
        }
        if self.config.bench {
            println!("{}", self.report.bench_line(self.started));
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

/// `--stdin`: opens the spool (`--spool`), whose readings go first, and starts the
/// thread reading standard input.
fn start_feed(config: &ClientConfig, poll: &Poll) -> Result<Feed, String> {
    let sensor = config.sensor.as_deref().unwrap_or_default();
    let (spool, replay) = match &config.spool {
        Some(dir) => {
            let (spool, replay) =
                Spool::open(dir, sensor, &config.kind).map_err(|e| e.to_string())?;
            if !replay.is_empty() {
                info!(
                    "spool {}: sending {} readings again that may be unanswered",
                    dir.display(),
                    replay.len()
                );
            }
            (Some(spool), replay)
        }
        None => (None, Vec::new()),
    };
    let waker = Waker::new(poll.registry(), INPUT).map_err(|e| format!("waker: {e}"))?;
    Feed::start(io::stdin(), replay, spool, waker)
        .map_err(|e| format!("cannot start reading standard input: {e}"))
}

/// `--tls-ca`: the client's TLS configuration and the name the server must prove.
fn tls_config(
    config: &ClientConfig,
) -> Result<Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>, String> {
    let Some(ca) = &config.tls_ca else {
        return Ok(None);
    };
    let identity = config.tls_cert.as_deref().zip(config.tls_key.as_deref());
    let tls = crate::tls::client_config(ca, identity)?;
    let host = match &config.tls_server_name {
        Some(name) => name.as_str(),
        None => config
            .server
            .rsplit_once(':')
            .map_or(config.server.as_str(), |(host, _)| host)
            .trim_start_matches('[')
            .trim_end_matches(']'),
    };
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| format!("--tls-server-name {host:?}: not a DNS name or IP address ({e})"))?;
    Ok(Some((tls, name)))
}

fn resolve(server: &str) -> Result<Vec<SocketAddr>, String> {
    let has_port = server
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !has_port {
        return Err(format!(
            "--server {server}: give HOST:PORT, the port is missing or not a number \
             (sensor-server listens on port 5000 unless its --listen says otherwise)"
        ));
    }
    let addrs: Vec<SocketAddr> = server
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {server}: {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("{server} resolves to no address"));
    }
    Ok(addrs)
}

/// `--sensor ID`, or `--sensors N` named PREFIX-0 ... PREFIX-(N-1).
fn sensor_ids(config: &ClientConfig) -> Result<Vec<String>, String> {
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
    Ok(ids)
}
