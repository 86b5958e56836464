//! The server's single readiness loop: every sensor socket, the HTTP side port, the
//! worker results and the stop signals, multiplexed by one `mio::Poll`.
//!
//! Sockets are registered once for READABLE | WRITABLE, edge-triggered. The loop keeps
//! each connection's unconsumed readiness (`readable`, `writable`) itself, as tokio does,
//! so it can stop reading a connection early (a per-pass byte budget, backpressure) and
//! come back later without re-registering and without losing an edge.
//!
//! A connection is *serviced* whenever something changes for it (readiness, a completed
//! batch, a free worker queue): write what is owed, hand complete lines to the workers
//! while its limits allow, read while they still allow, and close when everything it is
//! owed has been written. Reading stops while a connection has `MAX_IN_FLIGHT` batches
//! out, `OUTPUT_HIGH_WATER` unsent reply bytes, or lines the full worker queue could not
//! take: that is the backpressure that keeps memory bounded whatever clients do.

use crate::server::archive::ArchiveMetrics;
use crate::server::connection::{ConnId, Connection, Fill, MAX_IN_FLIGHT, OUTPUT_HIGH_WATER};
use crate::server::db::Db;
use crate::server::http::{self, HttpConn, MAX_HTTP_CONNECTIONS, Progress, Route};
use crate::server::metrics::{Exposition, Histogram, LATENCY_BUCKETS};
use crate::server::store::{StoreMetrics, unix_millis};
use crate::server::worker::{Completion, Completions, Job};
use crate::wire::framing;
use crate::wire::reading::{BUSY_REPLY, OVERLONG_REPLY, Status};
use crossbeam_channel::{Sender, TrySendError};
use log::{debug, info, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

pub const LISTENER: Token = Token(0);
pub const HTTP_LISTENER: Token = Token(1);
pub const WAKER: Token = Token(2);
pub const SIGNALS: Token = Token(3);

/// Bytes read from one connection per pass before the others get their turn.
const READ_BUDGET: usize = 256 * 1024;
/// Lines per batch: bounds the replies one batch can produce (a 2-byte line can earn a
/// 60-byte error), hence memory per in-flight batch.
const MAX_BATCH_LINES: usize = 512;
/// How long a closed-for-writing connection is drained before it is dropped.
const LINGER: Duration = Duration::from_secs(2);
/// How long a stop waits for owed replies before closing what is left.
const STOP_DRAIN: Duration = Duration::from_secs(8);
/// Period of the housekeeping tick (idle timeouts, deadlines, the safety-net drain).
const TICK: Duration = Duration::from_secs(1);
/// Period of the one-line summary at info level.
const SUMMARY_EVERY: Duration = Duration::from_secs(10);
/// Connections accepted per pass; the rest wait for the next pass, so that 10,000
/// sensors arriving at once do not starve the ones already connected.
const ACCEPT_BATCH: usize = 256;
/// How long accepting pauses when file descriptors run out and no reserve is left.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Limits from the command line.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub idle_timeout: Option<Duration>,
    pub max_line_bytes: usize,
}

/// Counters the loop owns (it also serves `/metrics`, so no sharing is needed).
struct LoopStats {
    connections_total: u64,
    connections_refused: u64,
    bytes_received: u64,
    readings: [u64; 4],
    reply_seconds: Histogram,
}

impl LoopStats {
    fn count_replies(&mut self, status: Status, n: u64, since: Instant) {
        self.readings[status as usize] += n;
        self.reply_seconds
            .observe_n(since.elapsed().as_secs_f64(), n);
    }
}

/// What the loop should do with a connection after servicing it.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    Wait,
    /// Its read budget ran out with data left: service it again soon.
    Again,
    /// It cannot hand lines to the full worker queue: service it when workers progress.
    QueueFull,
    Close,
}

/// Everything a connection's servicing needs besides the connection itself, so that the
/// borrow of one slab entry and of this state can coexist.
struct Ctx {
    /// One queue per worker; a connection always uses `jobs[index % len]`.
    jobs: Vec<Sender<Job>>,
    stats: LoopStats,
    limits: Limits,
    scratch: Vec<u8>,
}

/// What the loop is built from; the `Poll`'s registry must already hold the completion
/// waker at `WAKER`.
pub struct LoopParts {
    pub poll: Poll,
    pub listener: TcpListener,
    pub http_listener: Option<TcpListener>,
    pub jobs: Vec<Sender<Job>>,
    pub completions: Completions,
    pub db: Arc<Db>,
    pub store: Arc<StoreMetrics>,
    /// The shipper's figures, when `--archive` is on.
    pub archive: Option<Arc<ArchiveMetrics>>,
}

pub struct EventLoop {
    poll: Poll,
    listener: Option<TcpListener>,
    http_listener: Option<TcpListener>,
    signals: Signals,
    conns: Slab<Connection>,
    https: Slab<(u32, HttpConn)>,
    generation: u32,
    completions: Completions,
    db: Arc<Db>,
    store: Arc<StoreMetrics>,
    archive: Option<Arc<ArchiveMetrics>>,
    ctx: Ctx,
    ready: VecDeque<ConnId>,
    queue_waiters: Vec<ConnId>,
    /// A spare descriptor given up when `accept` hits EMFILE, so the waiting connection
    /// can be accepted and told "server busy" instead of spinning on it.
    reserve_fd: Option<File>,
    accept_paused_until: Option<Instant>,
    /// The last pass stopped at `ACCEPT_BATCH` with the backlog not yet drained.
    accept_more: bool,
    stop_deadline: Option<Instant>,
    next_tick: Instant,
    summary_at: Instant,
    summary_replies: u64,
}

impl EventLoop {
    /// Builds the loop and registers the listeners and the stop signals.
    pub fn new(parts: LoopParts, limits: Limits) -> io::Result<EventLoop> {
        let LoopParts {
            poll,
            mut listener,
            mut http_listener,
            jobs,
            completions,
            db,
            store,
            archive,
        } = parts;
        let registry = poll.registry();
        registry.register(&mut listener, LISTENER, Interest::READABLE)?;
        if let Some(http) = &mut http_listener {
            registry.register(http, HTTP_LISTENER, Interest::READABLE)?;
        }
        let mut signals =
            Signals::new([signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT])?;
        registry.register(&mut signals, SIGNALS, Interest::READABLE)?;
        let now = Instant::now();
        Ok(EventLoop {
            poll,
            listener: Some(listener),
            http_listener,
            signals,
            conns: Slab::with_capacity(limits.max_connections.min(1024)),
            https: Slab::new(),
            generation: 0,
            completions,
            db,
            store,
            archive,
            ctx: Ctx {
                jobs,
                stats: LoopStats {
                    connections_total: 0,
                    connections_refused: 0,
                    bytes_received: 0,
                    readings: [0; 4],
                    reply_seconds: Histogram::new(LATENCY_BUCKETS),
                },
                limits,
                scratch: vec![0; 64 * 1024],
            },
            ready: VecDeque::new(),
            queue_waiters: Vec::new(),
            reserve_fd: File::open("/dev/null").ok(),
            accept_paused_until: None,
            accept_more: false,
            stop_deadline: None,
            next_tick: now + TICK,
            summary_at: now,
            summary_replies: 0,
        })
    }

    /// Runs until a stop signal has been handled: every complete line already read is
    /// answered and every connection's write side is shut (or the drain time ran out).
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_sensors(),
                    HTTP_LISTENER => self.accept_http(),
                    WAKER => self.drain_completions(),
                    SIGNALS => self.on_signals(),
                    token => {
                        let (id, is_http) = ConnId::from_token(token);
                        if is_http {
                            self.service_http(id);
                            continue;
                        }
                        if let Some(conn) = self.conn_mut(id) {
                            if event.is_readable() || event.is_read_closed() || event.is_error() {
                                conn.readable = true;
                            }
                            if event.is_read_closed() || event.is_error() {
                                conn.read_hup = true;
                            }
                            if event.is_writable() || event.is_write_closed() || event.is_error() {
                                conn.writable = true;
                            }
                            self.service(id);
                        }
                    }
                }
            }
            self.run_ready();
            if self.accept_more {
                self.accept_sensors();
            }
            let now = Instant::now();
            if now >= self.next_tick {
                self.tick(now);
            }
            if let Some(deadline) = self.stop_deadline
                && (self.conns.is_empty() || now >= deadline)
            {
                match self.conns.len() {
                    0 => info!("every connection answered and closed"),
                    n => warn!("stop deadline reached; closing {n} connections still owed replies"),
                };
                return Ok(());
            }
        }
    }

    fn poll_timeout(&self) -> Duration {
        if !self.ready.is_empty() || self.accept_more {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let mut until = self.next_tick;
        if let Some(t) = self.accept_paused_until {
            until = until.min(t);
        }
        until.saturating_duration_since(now)
    }

    fn conn_mut(&mut self, id: ConnId) -> Option<&mut Connection> {
        live(&mut self.conns, id)
    }

    /// Services `id` and acts on the outcome.
    fn service(&mut self, id: ConnId) {
        let Some(conn) = live(&mut self.conns, id) else {
            return;
        };
        match self.ctx.service(conn, Instant::now()) {
            Next::Wait => {}
            Next::Again => self.ready.push_back(id),
            Next::QueueFull => self.queue_waiters.push(id),
            Next::Close => self.close(id),
        }
    }

    fn run_ready(&mut self) {
        for _ in 0..self.ready.len() {
            if let Some(id) = self.ready.pop_front() {
                self.service(id);
            }
        }
    }

    fn close(&mut self, id: ConnId) {
        if self.conn_mut(id).is_some() {
            let mut conn = self.conns.remove(id.index);
            let _ = self.poll.registry().deregister(&mut conn.stream);
        }
    }

    // --- accepting ---------------------------------------------------------------

    fn accept_sensors(&mut self) {
        let now = Instant::now();
        self.accept_more = false;
        for _ in 0..ACCEPT_BATCH {
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok((stream, _)) => {
                    self.ctx.stats.connections_total += 1;
                    if self.conns.len() >= self.ctx.limits.max_connections {
                        self.refuse(stream);
                    } else {
                        self.admit(stream, now);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_transient_accept_error(&e) => {}
                Err(e) if is_out_of_descriptors(&e) => match self.shed_with_reserve(false) {
                    Shed::Refused => {}
                    // Linux reports EMFILE before looking at the backlog, so this is
                    // the usual way out of the loop while descriptors are short.
                    Shed::BacklogEmpty => return,
                    Shed::NoReserve => {
                        warn!("accept: {e}; pausing accepts for {ACCEPT_PAUSE:?}");
                        self.accept_paused_until = Some(now + ACCEPT_PAUSE);
                        return;
                    }
                },
                Err(e) => {
                    warn!("accept: {e}; pausing accepts for {ACCEPT_PAUSE:?}");
                    self.accept_paused_until = Some(now + ACCEPT_PAUSE);
                    return;
                }
            }
        }
        // The edge is consumed but the backlog may not be empty: come back next pass.
        self.accept_more = true;
    }

    /// Out of descriptors: frees the reserve to accept one waiting connection (on the
    /// HTTP port if `http`), tells it the server is busy, and takes the reserve back.
    fn shed_with_reserve(&mut self, http: bool) -> Shed {
        if self.reserve_fd.take().is_none() {
            return Shed::NoReserve;
        }
        let listener = if http {
            &self.http_listener
        } else {
            &self.listener
        };
        let shed = match listener.as_ref().map(TcpListener::accept) {
            Some(Ok((stream, _))) if http => {
                shed(&stream, &http::busy_response());
                Shed::Refused
            }
            Some(Ok((stream, _))) => {
                self.ctx.stats.connections_total += 1;
                self.refuse(stream);
                Shed::Refused
            }
            _ => Shed::BacklogEmpty,
        };
        self.reserve_fd = File::open("/dev/null").ok();
        shed
    }

    fn refuse(&mut self, stream: TcpStream) {
        let stats = &mut self.ctx.stats;
        stats.connections_refused += 1;
        stats.count_replies(Status::Error, 1, Instant::now());
        stats.bytes_received += shed(&stream, BUSY_REPLY) as u64;
    }

    fn admit(&mut self, mut stream: TcpStream, now: Instant) {
        self.generation = ConnId::next_generation(self.generation);
        let entry = self.conns.vacant_entry();
        let id = ConnId {
            index: entry.key(),
            generation: self.generation,
        };
        let _ = stream.set_nodelay(true);
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut stream, id.token(false), interest)
        {
            warn!("register connection: {e}");
            return;
        }
        debug!("connection {id:?} from {:?}", stream.peer_addr());
        entry.insert(Connection::new(stream, id, now));
    }

    fn accept_http(&mut self) {
        let now = Instant::now();
        loop {
            let Some(listener) = &self.http_listener else {
                return;
            };
            match listener.accept() {
                Ok((stream, _)) => self.admit_http(stream, now),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_transient_accept_error(&e) => {}
                Err(e) if is_out_of_descriptors(&e) => match self.shed_with_reserve(true) {
                    Shed::Refused => {}
                    Shed::BacklogEmpty | Shed::NoReserve => return,
                },
                Err(e) => {
                    warn!("http accept: {e}");
                    return;
                }
            }
        }
    }

    /// Serves `stream`, making room by closing the peer that has waited longest for its
    /// request head; answers 503 when every slot is busy writing a response.
    fn admit_http(&mut self, mut stream: TcpStream, now: Instant) {
        if self.https.len() >= MAX_HTTP_CONNECTIONS {
            let slowest = self
                .https
                .iter()
                .filter(|(_, (_, c))| c.waiting_for_request())
                .min_by_key(|(_, (_, c))| c.accepted)
                .map(|(key, _)| key);
            match slowest {
                Some(key) => self.close_http(key),
                None => {
                    shed(&stream, &http::busy_response());
                    return;
                }
            }
        }
        self.generation = ConnId::next_generation(self.generation);
        let entry = self.https.vacant_entry();
        let id = ConnId {
            index: entry.key(),
            generation: self.generation,
        };
        let interest = Interest::READABLE | Interest::WRITABLE;
        if self
            .poll
            .registry()
            .register(&mut stream, id.token(true), interest)
            .is_ok()
        {
            entry.insert((id.generation, HttpConn::new(stream, now)));
        }
    }

    fn close_http(&mut self, key: usize) {
        let (_, mut conn) = self.https.remove(key);
        let _ = self.poll.registry().deregister(&mut conn.stream);
    }

    // --- HTTP ----------------------------------------------------------------------

    fn service_http(&mut self, id: ConnId) {
        let Some((_, conn)) = self
            .https
            .get_mut(id.index)
            .filter(|(generation, _)| *generation == id.generation)
        else {
            return;
        };
        let progress = match conn.read() {
            Progress::Routed(route) => {
                let response = self.render(route);
                match self.https.get_mut(id.index) {
                    Some((_, conn)) => conn.respond(response),
                    None => Progress::Finished,
                }
            }
            other => other,
        };
        if progress == Progress::Finished {
            self.close_http(id.index);
        }
    }

    fn render(&self, route: Route) -> Vec<u8> {
        match route {
            // A load balancer's health check: a server that cannot store acknowledges
            // nothing, so sensors are better served elsewhere.
            Route::Healthz => match self.store.unavailable() {
                None => http::response(200, "text/plain; charset=utf-8", b"ok"),
                Some(why) => http::response(503, "text/plain; charset=utf-8", why.as_bytes()),
            },
            Route::Metrics => http::response(
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                self.metrics_text().as_bytes(),
            ),
            Route::Sensors => {
                http::response(200, "application/json", &http::sensors_body(&self.db))
            }
            Route::NotFound => http::response(404, "text/plain; charset=utf-8", b"not found\n"),
            Route::BadRequest => http::response(400, "text/plain; charset=utf-8", b"bad request\n"),
            Route::TooLarge => {
                http::response(431, "text/plain; charset=utf-8", b"request too large\n")
            }
        }
    }

    fn metrics_text(&self) -> String {
        let s = &self.ctx.stats;
        let mut e = Exposition::default();
        e.gauge(
            "sensorhub_connections_open",
            "Sensor connections currently open.",
            self.conns.len() as f64,
        );
        e.counter(
            "sensorhub_connections_total",
            "Sensor connections accepted, refused ones included.",
            s.connections_total,
        );
        e.counter(
            "sensorhub_connections_refused_total",
            "Sensor connections refused with \"server busy\".",
            s.connections_refused,
        );
        let samples: Vec<(&str, u64)> = Status::ALL
            .iter()
            .map(|st| (st.as_str(), s.readings[*st as usize]))
            .collect();
        e.labelled_counter(
            "sensorhub_readings_total",
            "Replies sent, by status.",
            "status",
            &samples,
        );
        e.counter(
            "sensorhub_bytes_received_total",
            "Bytes read from sensor connections.",
            s.bytes_received,
        );
        e.histogram(
            "sensorhub_reply_seconds",
            "Time from a line's arrival to its reply being queued for sending.",
            &s.reply_seconds,
        );
        e.gauge(
            "sensorhub_worker_queue_depth",
            "Batches waiting for a worker.",
            self.ctx.jobs.iter().map(Sender::len).sum::<usize>() as f64,
        );
        e.gauge(
            "sensorhub_sensors",
            "Sensors with at least one stored reading.",
            self.db.with_sensors(|m| m.len()) as f64,
        );
        e.counter(
            "sensorhub_store_records_total",
            "Records appended to the store since start.",
            self.store.records.load(Relaxed),
        );
        e.gauge(
            "sensorhub_store_bytes",
            "Bytes in the store's *.jsonl files.",
            self.store.bytes.load(Relaxed) as f64,
        );
        e.gauge(
            "sensorhub_store_segments",
            "Number of *.jsonl files in the store.",
            self.store.segments.load(Relaxed) as f64,
        );
        e.histogram(
            "sensorhub_fsync_seconds",
            "Duration of each store fsync.",
            &self.store.fsync_seconds,
        );
        e.gauge(
            "sensorhub_store_available",
            "1 while the store takes writes; 0 while it cannot (disk full, I/O error).",
            if self.store.unavailable().is_none() {
                1.0
            } else {
                0.0
            },
        );
        e.counter(
            "sensorhub_store_write_failures_total",
            "Store writes that failed; each batch was undone and retried.",
            self.store.write_failures.load(Relaxed),
        );
        e.counter(
            "sensorhub_store_segments_retired_total",
            "Shipped segments deleted by retention since start.",
            self.store.retired_segments.load(Relaxed),
        );
        if let Some(archive) = &self.archive {
            archive_metrics(&mut e, archive);
        }
        e.finish()
    }

    // --- completions, signals, housekeeping --------------------------------------------

    fn drain_completions(&mut self) {
        let mut touched = Vec::new();
        for completion in self.completions.drain() {
            let id = completion.conn;
            let Some(conn) = live(&mut self.conns, id) else {
                continue; // closed meanwhile; its readings are stored all the same
            };
            let stats = &mut self.ctx.stats;
            let output = &mut conn.output;
            conn.reorder
                .push(completion.batch, completion, |c: Completion| {
                    output.extend_from_slice(&c.replies);
                    for status in Status::ALL {
                        stats.count_replies(status, c.counts[status as usize], c.arrived);
                    }
                });
            touched.push(id);
        }
        // Workers made progress, so the queue has room again.
        touched.append(&mut self.queue_waiters);
        for id in touched {
            self.service(id);
        }
    }

    fn on_signals(&mut self) {
        let received: Vec<i32> = self.signals.pending().collect();
        if received.is_empty() {
            return;
        }
        let now = Instant::now();
        if self.stop_deadline.is_some() {
            info!("second stop signal: closing now");
            self.stop_deadline = Some(now);
            return;
        }
        info!(
            "stop signal: answering {} connections' read lines, then exiting",
            self.conns.len()
        );
        self.stop_deadline = Some(now + STOP_DRAIN);
        for listener in [self.listener.take(), self.http_listener.take()]
            .into_iter()
            .flatten()
        {
            drop(listener); // closing it refuses new connections at once
        }
        let ids: Vec<ConnId> = self.conns.iter().map(|(_, c)| c.id).collect();
        for id in ids {
            if let Some(conn) = self.conn_mut(id) {
                close_input(conn);
            }
            self.service(id);
        }
    }

    fn tick(&mut self, now: Instant) {
        self.next_tick = now + TICK;
        self.drain_completions();
        if self.accept_paused_until.is_some_and(|t| now >= t) {
            self.accept_paused_until = None;
            self.accept_sensors();
        }
        let mut expired = Vec::new();
        let idle_timeout = self.ctx.limits.idle_timeout;
        for (_, conn) in self.conns.iter_mut() {
            if let Some(until) = conn.lingering_until {
                if now >= until {
                    expired.push(conn.id);
                }
                continue;
            }
            // Paused or busy connections are not idle: their clock restarts.
            if conn.in_flight() > 0 || conn.unsent() > 0 || has_complete_line(&conn.input) {
                conn.last_input = now;
            } else if idle_timeout
                .is_some_and(|t| now.saturating_duration_since(conn.last_input) >= t)
            {
                debug!("connection {:?} idle, closing", conn.id);
                expired.push(conn.id);
            }
        }
        for id in expired {
            self.close(id);
        }
        let stale: Vec<usize> = self
            .https
            .iter()
            .filter(|(_, (_, c))| now >= c.deadline)
            .map(|(k, _)| k)
            .collect();
        for key in stale {
            self.close_http(key);
        }
        if now - self.summary_at >= SUMMARY_EVERY {
            self.log_summary(now);
        }
    }

    fn log_summary(&mut self, now: Instant) {
        let replies: u64 = self.ctx.stats.readings.iter().sum();
        let rate = (replies - self.summary_replies) as f64 / (now - self.summary_at).as_secs_f64();
        info!(
            "{} connections, {rate:.0} readings/s, {} sensors, store {} bytes in {} files",
            self.conns.len(),
            self.db.with_sensors(|m| m.len()),
            self.store.bytes.load(Relaxed),
            self.store.segments.load(Relaxed),
        );
        self.summary_at = now;
        self.summary_replies = replies;
    }
}

impl Ctx {
    /// Moves one connection forward as far as it can go now. See the module doc.
    fn service(&mut self, conn: &mut Connection, now: Instant) -> Next {
        if conn.lingering_until.is_some() {
            return self.drain_lingering(conn);
        }
        if conn.flush().is_err() {
            return Next::Close;
        }
        let mut budget = READ_BUDGET;
        loop {
            if self.dispatch(conn, now) == Dispatch::QueueFull {
                return Next::QueueFull;
            }
            if !conn.readable || !self.may_read(conn) {
                break;
            }
            if budget == 0 {
                return Next::Again;
            }
            match conn.fill(&mut self.scratch) {
                Ok(Fill::Data(n)) => {
                    self.stats.bytes_received += n as u64;
                    budget = budget.saturating_sub(n);
                    conn.last_input = now;
                    conn.input.extend_from_slice(&self.scratch[..n]);
                }
                Ok(Fill::Eof) => {
                    conn.peer_closed = true;
                    close_input(conn);
                }
                Ok(Fill::WouldBlock) => break,
                Err(_) => return Next::Close,
            }
        }
        if let Some(at) = conn.overlong_at
            && conn.in_flight() == 0
        {
            conn.overlong_at = None;
            conn.output.extend_from_slice(OVERLONG_REPLY);
            self.stats.count_replies(Status::Error, 1, at);
        }
        if conn.flush().is_err() {
            return Next::Close;
        }
        let owed_nothing = conn.input_closed
            && conn.overlong_at.is_none()
            && conn.in_flight() == 0
            && conn.unsent() == 0
            && !has_complete_line(&conn.input);
        if !owed_nothing {
            return Next::Wait;
        }
        // Everything owed is written: end our side. A peer that already sent EOF is
        // done; otherwise drain its input until it closes too.
        let _ = conn.stream.shutdown(Shutdown::Write);
        if conn.peer_closed {
            return Next::Close;
        }
        conn.lingering_until = Some(now + LINGER);
        self.drain_lingering(conn)
    }

    fn may_read(&self, conn: &Connection) -> bool {
        !conn.input_closed
            && conn.in_flight() < MAX_IN_FLIGHT
            && conn.unsent() < OUTPUT_HIGH_WATER
            && !has_complete_line(&conn.input)
    }

    /// Hands complete lines to the workers while the connection's limits allow.
    fn dispatch(&mut self, conn: &mut Connection, now: Instant) -> Dispatch {
        while conn.in_flight() < MAX_IN_FLIGHT && conn.unsent() < OUTPUT_HIGH_WATER {
            let scan = framing::scan(&conn.input, self.limits.max_line_bytes, MAX_BATCH_LINES);
            if scan.lines == 0 {
                if scan.overlong {
                    // Nothing after an over-long line is processed; its error reply
                    // follows the replies owed to the lines before it.
                    conn.overlong_at.get_or_insert(now);
                    conn.input = Vec::new();
                    conn.input_closed = true;
                }
                return Dispatch::Done;
            }
            let job = Job {
                conn: conn.id,
                batch: conn.batches_sent,
                lines: conn.input[..scan.end].to_vec(),
                arrived: now,
                recv_ms: unix_millis(),
            };
            let queue = &self.jobs[conn.id.index % self.jobs.len()];
            match queue.try_send(job) {
                Ok(()) => {
                    conn.batches_sent += 1;
                    conn.input.drain(..scan.end);
                    if conn.input.capacity() > 4 * READ_BUDGET.max(self.limits.max_line_bytes) {
                        conn.input.shrink_to_fit();
                    }
                }
                Err(TrySendError::Full(_)) => return Dispatch::QueueFull,
                // The workers are gone only after the loop has returned.
                Err(TrySendError::Disconnected(_)) => return Dispatch::Done,
            }
        }
        Dispatch::Done
    }

    fn drain_lingering(&mut self, conn: &mut Connection) -> Next {
        loop {
            match conn.fill(&mut self.scratch) {
                Ok(Fill::Data(n)) => self.stats.bytes_received += n as u64,
                Ok(Fill::WouldBlock) => return Next::Wait,
                Ok(Fill::Eof) | Err(_) => return Next::Close,
            }
        }
    }
}

/// What giving up the reserve descriptor achieved.
enum Shed {
    Refused,
    BacklogEmpty,
    NoReserve,
}

#[derive(Debug, PartialEq, Eq)]
enum Dispatch {
    Done,
    QueueFull,
}

/// The connection `id` names, if it is still open: a slot reused by a newer
/// connection has another generation. A free function over the slab, so callers can
/// hold it alongside a borrow of `Ctx`.
fn live(conns: &mut Slab<Connection>, id: ConnId) -> Option<&mut Connection> {
    conns
        .get_mut(id.index)
        .filter(|c| c.id.generation == id.generation)
}

/// Stops taking input: complete lines already read are still answered, the partial line
/// after them is dropped without a reply.
fn close_input(conn: &mut Connection) {
    conn.input_closed = true;
    let keep = memchr::memrchr(b'\n', &conn.input).map_or(0, |i| i + 1);
    conn.input.truncate(keep);
}

fn archive_metrics(e: &mut Exposition, a: &ArchiveMetrics) {
    let counters = [
        (
            "sensorhub_archive_segments_shipped_total",
            "Sealed segments S3 confirmed since start.",
            &a.shipped_segments,
        ),
        (
            "sensorhub_archive_bytes_shipped_total",
            "Segment bytes shipped since start (before gzip).",
            &a.shipped_bytes,
        ),
        (
            "sensorhub_archive_bytes_uploaded_total",
            "Bytes uploaded since start (gzip).",
            &a.uploaded_bytes,
        ),
        (
            "sensorhub_archive_failures_total",
            "Uploads that failed (each is retried).",
            &a.failures,
        ),
    ];
    for (name, help, value) in counters {
        e.counter(name, help, value.load(Relaxed));
    }
    let gauges = [
        (
            "sensorhub_archive_pending_segments",
            "Sealed segments not yet shipped.",
            a.pending_segments.load(Relaxed) as f64,
        ),
        (
            "sensorhub_archive_pending_bytes",
            "Bytes in sealed segments not yet shipped.",
            a.pending_bytes.load(Relaxed) as f64,
        ),
        (
            "sensorhub_archive_lag_seconds",
            "Age of the oldest sealed segment not yet shipped (0 when none).",
            a.lag_seconds(),
        ),
    ];
    for (name, help, value) in gauges {
        e.gauge(name, help, value);
    }
}

fn has_complete_line(input: &[u8]) -> bool {
    memchr::memchr(b'\n', input).is_some()
}

/// Answers a connection that will not be served with `reply` and closes it; returns
/// how many bytes the peer had sent. A fresh socket's send buffer is empty, so the
/// short reply fits at once; what the peer sent is read and discarded so that the close
/// is a FIN, not a reset that could destroy the reply before the peer reads it.
fn shed(stream: &TcpStream, reply: &[u8]) -> usize {
    let _ = (&*stream).write(reply);
    let _ = stream.shutdown(Shutdown::Write);
    let mut sink = [0u8; 4096];
    (&*stream).read(&mut sink).unwrap_or(0)
}

fn is_out_of_descriptors(e: &io::Error) -> bool {
    // EMFILE (per process) and ENFILE (system-wide).
    matches!(e.raw_os_error(), Some(24) | Some(23))
}

/// Errors about one connection that died in the backlog: skip it and keep accepting.
fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    ) || matches!(
        e.raw_os_error(),
        Some(71) | Some(113) | Some(101) | Some(110)
    ) // EPROTO, EHOSTUNREACH, ENETUNREACH, ETIMEDOUT
}
