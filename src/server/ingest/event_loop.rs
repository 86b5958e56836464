//! The server's single readiness loop: every sensor socket, the HTTP side port, the
//! worker results and the stop signals, multiplexed by one `mio::Poll`.
//!
//! Sockets are registered once for READABLE | WRITABLE, edge-triggered. Each connection
//! keeps its unconsumed readiness itself, as tokio does, so it can stop reading early (a
//! per-pass byte budget, backpressure) and come back later without re-registering and
//! without losing an edge. What a connection does when serviced is in `connection.rs`;
//! this file decides *when*: on readiness, when its batch completes, when the worker
//! queue it waits for has room, and on the next pass when its budget ran out.

use crate::server::Error;
use crate::server::archive::shipper::ArchiveMetrics;
use crate::server::http::metrics::LoopStats;
use crate::server::http::pages::{self, Figures};
use crate::server::http::port::{HttpPort, Route};
use crate::server::ingest::accept::{self, Reserve, Shed};
use crate::server::ingest::completion::{BufferPool, Completions, Job};
use crate::server::ingest::connection::{Connection, Context, Handshake, Next};
use crate::server::ingest::slots::{ConnId, Port, Slots};
use crate::server::ingest::tls::{Identity, TlsFiles};
use crate::server::store::db::Db;
use crate::server::store::segments::StoreMetrics;
use crate::tls::{TlsStream, Transport};
use crate::wire::reply::{BUSY_REPLY, Status};
use crossbeam_channel::Sender;
use log::{debug, info, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use signal_hook_mio::v1_0::Signals;
use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

pub(crate) const LISTENER: Token = Token(0);
pub(crate) const HTTP_LISTENER: Token = Token(1);
pub(crate) const WAKER: Token = Token(2);
pub(crate) const SIGNALS: Token = Token(3);

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
pub(crate) struct Limits {
    pub max_connections: usize,
    pub idle_timeout: Option<Duration>,
    pub max_line_bytes: usize,
    /// Serve the page at `/` on the HTTP port (`--http-page`).
    pub http_page: bool,
    /// A connection's TLS handshake must be done this long after it was accepted.
    pub tls_handshake_timeout: Duration,
    /// TLS handshakes worked on at once (`--tls-max-handshakes`).
    pub max_tls_handshakes: usize,
}

/// What the loop is built from; the `Poll`'s registry must already hold the completion
/// waker at `WAKER`.
pub(crate) struct LoopParts {
    pub poll: Poll,
    pub listener: TcpListener,
    pub http_listener: Option<TcpListener>,
    pub jobs: Vec<Sender<Job>>,
    pub completions: Completions,
    pub db: Arc<Db>,
    pub store: Arc<StoreMetrics>,
    /// The shipper's figures, when `--archive` is on.
    pub archive: Option<Arc<ArchiveMetrics>>,
    /// `--tls-cert`: the files (re-read on SIGHUP) and what they gave.
    pub tls: Option<(TlsFiles, Identity)>,
}

pub(crate) struct EventLoop {
    poll: Poll,
    listener: Option<TcpListener>,
    http: Option<HttpPort>,
    signals: Signals,
    conns: Slots<Connection>,
    /// What servicing a connection needs besides the connection.
    ctx: Context,
    completions: Completions,
    db: Arc<Db>,
    store: Arc<StoreMetrics>,
    archive: Option<Arc<ArchiveMetrics>>,
    max_connections: usize,
    idle_timeout: Option<Duration>,
    http_page: bool,
    tls: Option<(TlsFiles, Identity)>,
    tls_handshake_timeout: Duration,
    max_tls_handshakes: usize,
    /// Connections whose TLS handshake is being worked on (`handshake_working`).
    working_handshakes: usize,
    /// Accepting stopped at `max_tls_handshakes`; resumes when one finishes.
    accept_awaits_handshakes: bool,
    /// Connections to service again this pass (their read budget ran out).
    ready: VecDeque<ConnId>,
    /// Connections waiting for room in their worker's queue.
    queue_waiters: Vec<ConnId>,
    /// Scratch for `drain_completions` (kept, so a drain allocates nothing).
    touched: Vec<ConnId>,
    reserve: Reserve,
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
    pub(crate) fn new(parts: LoopParts, limits: Limits) -> io::Result<EventLoop> {
        let LoopParts {
            poll,
            mut listener,
            http_listener,
            jobs,
            completions,
            db,
            store,
            archive,
            tls,
        } = parts;
        let registry = poll.registry();
        registry.register(&mut listener, LISTENER, Interest::READABLE)?;
        let mut http = http_listener.map(HttpPort::new);
        if let Some(l) = http.as_mut().and_then(HttpPort::listener_mut) {
            registry.register(l, HTTP_LISTENER, Interest::READABLE)?;
        }
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
        registry.register(&mut signals, SIGNALS, Interest::READABLE)?;
        let now = Instant::now();
        Ok(EventLoop {
            poll,
            listener: Some(listener),
            http,
            signals,
            conns: Slots::with_capacity(limits.max_connections.min(1024)),
            ctx: Context {
                jobs,
                stats: LoopStats::default(),
                max_line_bytes: limits.max_line_bytes,
                scratch: vec![0; 64 * 1024],
                buffers: BufferPool::default(),
            },
            completions,
            db,
            store,
            archive,
            max_connections: limits.max_connections,
            idle_timeout: limits.idle_timeout,
            http_page: limits.http_page,
            tls,
            tls_handshake_timeout: limits.tls_handshake_timeout,
            max_tls_handshakes: limits.max_tls_handshakes,
            working_handshakes: 0,
            accept_awaits_handshakes: false,
            ready: VecDeque::new(),
            queue_waiters: Vec::new(),
            touched: Vec::new(),
            reserve: Reserve::new(),
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
    /// Stops at once, answering nothing more, when the store breaks (`Db::broken`).
    pub(crate) fn run(mut self) -> Result<(), Error> {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::System {
                    what: "event loop",
                    source: e,
                });
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_sensors(),
                    HTTP_LISTENER => self.accept_http(),
                    WAKER => self.drain_completions(),
                    SIGNALS => self.on_signals(),
                    token => match ConnId::from_token(token) {
                        (Port::Http, id) => self.service_http(id),
                        (Port::Sensor, id) => {
                            if let Some(conn) = self.conns.get_mut(id) {
                                conn.on_readiness(event);
                                self.service(id);
                            }
                        }
                    },
                }
            }
            if let Some(why) = self.db.broken() {
                return Err(Error::StoreBroken(why.to_owned()));
            }
            if self.after_pass() {
                return Ok(());
            }
        }
    }

    /// The end of a pass: connections owed another turn, the rest of the backlog, the
    /// tick; true once a stop has finished.
    fn after_pass(&mut self) -> bool {
        for _ in 0..self.ready.len() {
            if let Some(id) = self.ready.pop_front() {
                self.service(id);
            }
        }
        if self.accept_more
            || (self.accept_awaits_handshakes && self.working_handshakes < self.max_tls_handshakes)
        {
            self.accept_sensors();
        }
        let now = Instant::now();
        if now >= self.next_tick {
            self.tick(now);
        }
        let Some(deadline) = self.stop_deadline else {
            return false;
        };
        match self.conns.len() {
            0 => info!("every connection answered and closed"),
            n if now >= deadline => {
                warn!("stop deadline reached; closing {n} connections still owed replies")
            }
            _ => return false,
        }
        true
    }

    fn poll_timeout(&self) -> Duration {
        if !self.ready.is_empty() || self.accept_more {
            return Duration::ZERO;
        }
        let mut until = self.next_tick;
        if let Some(t) = self.accept_paused_until {
            until = until.min(t);
        }
        until.saturating_duration_since(Instant::now())
    }

    /// Services `id` and acts on the outcome.
    fn service(&mut self, id: ConnId) {
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        let was_working = conn.handshake_working();
        let next = conn.service(&mut self.ctx, Instant::now());
        match (was_working, conn.handshake_working()) {
            (false, true) => self.working_handshakes += 1,
            (true, false) => self.working_handshakes = self.working_handshakes.saturating_sub(1),
            _ => {}
        }
        match next {
            Next::Wait => {}
            Next::Again => self.ready.push_back(id),
            Next::QueueFull => self.queue_waiters.push(id),
            Next::Close => self.close(id),
        }
    }

    fn close(&mut self, id: ConnId) {
        if let Some(mut conn) = self.conns.remove(id) {
            if conn.handshake_working() {
                self.working_handshakes = self.working_handshakes.saturating_sub(1);
            }
            let _ = self.poll.registry().deregister(conn.stream_mut());
        }
    }

    // --- accepting ----------------------------------------------------------------

    fn accept_sensors(&mut self) {
        let now = Instant::now();
        self.accept_more = false;
        self.accept_awaits_handshakes = false;
        // Handshakes are CPU work on this thread: past the limit, each one started would
        // delay all the others, and in a storm every one would miss its deadline. The
        // rest wait in the backlog (a deadline starts at accept). Silent peers do not
        // count, so a flood of them cannot hold the limit; this pass's newcomers do.
        let batch = match self.tls {
            Some(_) => ACCEPT_BATCH.min(
                self.max_tls_handshakes
                    .saturating_sub(self.working_handshakes),
            ),
            None => ACCEPT_BATCH,
        };
        if batch == 0 {
            self.accept_awaits_handshakes = true;
            return;
        }
        for _ in 0..batch {
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok((stream, _)) => {
                    self.ctx.stats.connections_total += 1;
                    if self.conns.len() >= self.max_connections {
                        let sent = accept::refuse(&stream, BUSY_REPLY);
                        self.count_refusal(sent);
                    } else {
                        self.admit(stream, now);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if accept::is_transient(&e) => {}
                Err(e) if accept::is_out_of_descriptors(&e) => {
                    match self.reserve.shed(listener, BUSY_REPLY) {
                        Shed::Refused(sent) => {
                            self.ctx.stats.connections_total += 1;
                            self.count_refusal(sent);
                        }
                        // Linux reports EMFILE before looking at the backlog, so this
                        // is the usual way out of the loop while descriptors are short.
                        Shed::BacklogEmpty => return,
                        Shed::NoReserve => return self.pause_accepting(&e, now),
                    }
                }
                Err(e) => return self.pause_accepting(&e, now),
            }
        }
        // The edge is consumed but the backlog may not be empty: come back next pass.
        self.accept_more = true;
    }

    fn pause_accepting(&mut self, e: &io::Error, now: Instant) {
        warn!("accept: {e}; pausing accepts for {ACCEPT_PAUSE:?}");
        self.accept_paused_until = Some(now + ACCEPT_PAUSE);
    }

    fn count_refusal(&mut self, bytes_sent: usize) {
        let stats = &mut self.ctx.stats;
        stats.connections_refused += 1;
        stats.count_replies(Status::Error, 1, Instant::now());
        stats.bytes_received += bytes_sent as u64;
    }

    fn admit(&mut self, mut stream: TcpStream, now: Instant) {
        let _ = stream.set_nodelay(true);
        let registry = self.poll.registry();
        let tls = self.tls.as_ref().map(|(_, identity)| identity);
        let handshake_until = now + self.tls_handshake_timeout;
        let admitted = self.conns.insert_with(|id| {
            let interest = Interest::READABLE | Interest::WRITABLE;
            registry.register(&mut stream, id.token(Port::Sensor), interest)?;
            debug!("connection {id:?} from {:?}", stream.peer_addr());
            let (transport, handshake) = match tls {
                None => (Transport::Plain(stream), Handshake::Done),
                Some(identity) => {
                    let session = rustls::ServerConnection::new(identity.config.clone())
                        .map_err(io::Error::other)?;
                    let handshake = Handshake::Pending {
                        until: handshake_until,
                        checks_sensors: identity.checks_sensors,
                    };
                    let tls = TlsStream::new(stream, session);
                    (Transport::Tls(Box::new(tls)), handshake)
                }
            };
            Ok::<_, io::Error>(Connection::new(transport, id, now, handshake))
        });
        if let Err(e) = admitted {
            warn!("admit connection: {e}");
        }
    }

    // --- the HTTP side port -------------------------------------------------------

    fn accept_http(&mut self) {
        if let Some(http) = &mut self.http {
            http.accept(self.poll.registry(), &mut self.reserve, Instant::now());
        }
    }

    fn service_http(&mut self, id: ConnId) {
        let figures = Figures {
            page: self.http_page,
            loop_stats: &self.ctx.stats,
            open_connections: self.conns.len(),
            queue_depth: self.ctx.jobs.iter().map(Sender::len).sum(),
            db: &self.db,
            store: &self.store,
            archive: self.archive.as_deref(),
            tls_expires_at: self.tls.as_ref().map(|(_, identity)| identity.expires_at),
        };
        if let Some(http) = &mut self.http {
            let render = |route: Route| pages::render(route, &figures);
            http.service(self.poll.registry(), id, render);
        }
    }

    // --- completions, signals, housekeeping --------------------------------------------

    fn drain_completions(&mut self) {
        let mut touched = std::mem::take(&mut self.touched);
        for completion in self.completions.drain() {
            let id = completion.conn;
            match self.conns.get_mut(id) {
                Some(conn) => conn.deliver(completion, &mut self.ctx),
                // Closed meanwhile; its readings are stored all the same.
                None => self.ctx.buffers.give(completion.replies),
            }
            touched.push(id);
        }
        // Workers made progress, so the queue has room again.
        touched.append(&mut self.queue_waiters);
        for &id in &touched {
            self.service(id);
        }
        touched.clear();
        self.touched = touched;
    }

    fn on_signals(&mut self) {
        let (mut stop, mut reload) = (false, false);
        for signal in self.signals.pending() {
            match signal {
                signal_hook::consts::SIGHUP => reload = true,
                _ => stop = true,
            }
        }
        if reload {
            self.reload_tls();
        }
        if !stop {
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
        // Closing the listeners refuses new connections at once.
        self.listener = None;
        if let Some(http) = &mut self.http {
            http.stop_listening();
        }
        let ids: Vec<ConnId> = self.conns.iter().map(|(id, _)| id).collect();
        for id in ids {
            if let Some(conn) = self.conns.get_mut(id) {
                conn.stop_input();
            }
            self.service(id);
        }
    }

    /// SIGHUP: new connections get the files as they are now; open ones keep their
    /// session; files that do not load leave the ones in use.
    fn reload_tls(&mut self) {
        let Some((files, identity)) = &mut self.tls else {
            info!("SIGHUP: no TLS files to re-read (no --tls-cert)");
            return;
        };
        match files.load() {
            Ok(loaded) => {
                *identity = loaded;
                info!("SIGHUP: TLS certificate, key and CA re-read; new connections use them");
            }
            Err(e) => warn!("SIGHUP: {e}; the TLS files loaded before stay in use"),
        }
    }

    fn tick(&mut self, now: Instant) {
        self.next_tick = now + TICK;
        self.drain_completions();
        if self.accept_paused_until.is_some_and(|t| now >= t) {
            self.accept_paused_until = None;
            self.accept_sensors();
        }
        let idle_timeout = self.idle_timeout;
        let expired: Vec<ConnId> = self
            .conns
            .iter_mut()
            .filter_map(|(id, conn)| conn.expired(now, idle_timeout).then_some(id))
            .collect();
        for id in expired {
            if self.conns.get_mut(id).is_some_and(|c| c.in_handshake()) {
                debug!("connection {id:?}: TLS handshake not done in time, closing");
                self.ctx.stats.tls_failed("timeout");
            }
            debug!("connection {id:?} idle or done lingering, closing");
            self.close(id);
        }
        if let Some(http) = &mut self.http {
            http.close_stale(self.poll.registry(), now);
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
