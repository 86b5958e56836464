//! The HTTP side port: `/` (a page with a chart per sensor), `/healthz`, `/metrics`,
//! `/sensors`, and 404 for the rest.
//!
//! Served by the same event loop as the sensors, one request per connection
//! (`Connection: close`), which is what health checkers and Prometheus need. Requests are
//! parsed with `httparse` (a hand-rolled parser is where request smuggling bugs live) and
//! bounded in size and time so a slow or hostile peer cannot hold memory or a slot: a
//! peer has `HEAD_DEADLINE` to send its request, slow peers make room for new ones, and
//! a connection that cannot be served gets `503` rather than silence, so a load
//! balancer's health check keeps its answer under a flood or a slowloris attack.

use crate::net::Outbox;
use crate::server::ingest::accept::{self, Reserve, Shed};
use crate::server::ingest::slots::{ConnId, Port, Slots};
use log::warn;
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry};
use std::io::{self, Read};
use std::time::{Duration, Instant};

/// Largest request head accepted.
pub(crate) const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Time a peer has to send its whole request head: a health checker sends it at once;
/// a slowloris peer (a byte a second) is closed.
pub(crate) const HEAD_DEADLINE: Duration = Duration::from_secs(2);
/// Time a peer has to read the response.
pub(crate) const RESPONSE_DEADLINE: Duration = Duration::from_secs(5);
/// HTTP connections served at once. When all are taken, a new one replaces the one
/// that has waited longest for its request head (slow peers go first); if every one is
/// busy writing a response, the new one is answered 503 and closed.
pub(crate) const MAX_HTTP_CONNECTIONS: usize = 256;

/// The answer to a connection that cannot be served now.
pub(crate) fn busy_response() -> Vec<u8> {
    response(
        503,
        "text/plain; charset=utf-8",
        b"busy: too many HTTP connections\n",
    )
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Route {
    /// `/`: the page with a chart per sensor (`page.html`).
    Page,
    Healthz,
    Metrics,
    Sensors,
    NotFound,
    BadRequest,
    TooLarge,
}

/// Parses a request head; `None` while it is incomplete.
pub(crate) fn route(request: &[u8]) -> Option<Route> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(request) {
        Ok(httparse::Status::Partial) if request.len() >= MAX_REQUEST_BYTES => {
            Some(Route::TooLarge)
        }
        Ok(httparse::Status::Partial) => None,
        Err(httparse::Error::TooManyHeaders) => Some(Route::TooLarge),
        Err(_) => Some(Route::BadRequest),
        Ok(httparse::Status::Complete(_)) => {
            let path = parsed.path.unwrap_or("");
            let path = path.split_once('?').map_or(path, |(p, _)| p);
            Some(match (parsed.method, path) {
                (Some("GET"), "/") => Route::Page,
                (Some("GET"), "/healthz") => Route::Healthz,
                (Some("GET"), "/metrics") => Route::Metrics,
                (Some("GET"), "/sensors") => Route::Sensors,
                _ => Route::NotFound,
            })
        }
    }
}

/// A complete HTTP/1.1 response that closes the connection.
pub(crate) fn response(status: u16, content_type: &str, body: &[u8]) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// The HTTP side port: its listener and its connections, driven by the event loop.
pub(crate) struct HttpPort {
    listener: Option<TcpListener>,
    conns: Slots<HttpConn>,
}

impl HttpPort {
    pub(crate) fn new(listener: TcpListener) -> HttpPort {
        HttpPort {
            listener: Some(listener),
            conns: Slots::with_capacity(0),
        }
    }

    /// The listener, for registering it with the poller.
    pub(crate) fn listener_mut(&mut self) -> Option<&mut TcpListener> {
        self.listener.as_mut()
    }

    /// Closes the listener: new connections are refused by the kernel at once.
    pub(crate) fn stop_listening(&mut self) {
        self.listener = None;
    }

    /// Accepts every waiting connection.
    pub(crate) fn accept(&mut self, registry: &Registry, reserve: &mut Reserve, now: Instant) {
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok((stream, _)) => self.admit(registry, stream, now),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if accept::is_transient(&e) => {}
                Err(e) if accept::is_out_of_descriptors(&e) => {
                    match reserve.shed(listener, &busy_response()) {
                        Shed::Refused(_) => {}
                        Shed::BacklogEmpty | Shed::NoReserve => return,
                    }
                }
                Err(e) => {
                    warn!("http accept: {e}");
                    return;
                }
            }
        }
    }

    /// Serves `stream`, making room by closing the peer that has waited longest for its
    /// request head; answers 503 when every slot is busy writing a response.
    fn admit(&mut self, registry: &Registry, mut stream: TcpStream, now: Instant) {
        if self.conns.len() >= MAX_HTTP_CONNECTIONS {
            let slowest = self
                .conns
                .iter()
                .filter(|(_, c)| c.waiting_for_request())
                .min_by_key(|(_, c)| c.accepted)
                .map(|(id, _)| id);
            match slowest {
                Some(id) => self.close(registry, id),
                None => {
                    accept::refuse(&stream, &busy_response());
                    return;
                }
            }
        }
        let interest = Interest::READABLE | Interest::WRITABLE;
        let _ = self.conns.insert_with(|id| {
            registry.register(&mut stream, id.token(Port::Http), interest)?;
            Ok::<_, io::Error>(HttpConn::new(stream, now))
        });
    }

    /// Reads or writes connection `id` as far as it goes; `render` answers a request.
    pub(crate) fn service(
        &mut self,
        registry: &Registry,
        id: ConnId,
        render: impl FnOnce(Route) -> Vec<u8>,
    ) {
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        let progress = match conn.read() {
            Progress::Routed(route) => conn.respond(render(route)),
            other => other,
        };
        if progress == Progress::Finished {
            self.close(registry, id);
        }
    }

    /// Closes connections past their deadline (a slow head, a response not read).
    pub(crate) fn close_stale(&mut self, registry: &Registry, now: Instant) {
        let stale: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| now >= c.deadline)
            .map(|(id, _)| id)
            .collect();
        for id in stale {
            self.close(registry, id);
        }
    }

    fn close(&mut self, registry: &Registry, id: ConnId) {
        if let Some(mut conn) = self.conns.remove(id) {
            let _ = registry.deregister(&mut conn.stream);
        }
    }
}

/// One HTTP connection: read a request head, write one response, close.
struct HttpConn {
    stream: TcpStream,
    request: Vec<u8>,
    /// The response once the request is routed, written as sensor replies are (short
    /// writes kept).
    response: Option<Outbox>,
    /// When it was accepted: the oldest peer still sending its head is evicted first.
    accepted: Instant,
    deadline: Instant,
}

/// Where an HTTP connection stands after some I/O.
#[derive(Debug, PartialEq, Eq)]
enum Progress {
    /// Waiting for more of the request, or for the socket to take more of the response.
    Pending,
    /// The request is complete; the caller supplies the response with `respond`.
    Routed(Route),
    /// Done (response sent, or the peer went away): close it.
    Finished,
}

impl HttpConn {
    fn new(stream: TcpStream, now: Instant) -> HttpConn {
        HttpConn {
            stream,
            request: Vec::new(),
            response: None,
            accepted: now,
            deadline: now + HEAD_DEADLINE,
        }
    }

    /// Still waiting for its request head (so it may be evicted for a newcomer).
    fn waiting_for_request(&self) -> bool {
        self.response.is_none()
    }

    /// Reads what has arrived; reports a complete request once.
    fn read(&mut self) -> Progress {
        if self.response.is_some() {
            return self.write();
        }
        let mut buf = [0u8; 2048];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return Progress::Finished,
                Ok(n) => {
                    self.request.extend_from_slice(&buf[..n]);
                    if let Some(route) = route(&self.request) {
                        return Progress::Routed(route);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Progress::Pending,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Progress::Finished,
            }
        }
    }

    /// Queues the response and starts writing it.
    fn respond(&mut self, response: Vec<u8>) -> Progress {
        let mut outbox = Outbox::default();
        outbox.adopt(response);
        self.response = Some(outbox);
        self.deadline = Instant::now() + RESPONSE_DEADLINE;
        self.write()
    }

    /// Writes as much of the response as the socket takes.
    fn write(&mut self) -> Progress {
        let Some(response) = &mut self.response else {
            return Progress::Pending;
        };
        // Called on readiness, so the socket may take more; a full socket waits for
        // the next writable edge.
        let mut writable = true;
        match response.flush(&self.stream, &mut writable) {
            Ok(false) => Progress::Pending,
            Ok(true) => {
                let _ = self.stream.shutdown(std::net::Shutdown::Write);
                Progress::Finished
            }
            Err(_) => Progress::Finished,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_routed_by_method_and_path() {
        let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(route(get("/healthz").as_bytes()), Some(Route::Healthz));
        assert_eq!(route(get("/metrics").as_bytes()), Some(Route::Metrics));
        assert_eq!(
            route(get("/sensors?pretty").as_bytes()),
            Some(Route::Sensors)
        );
        assert_eq!(route(get("/").as_bytes()), Some(Route::Page));
        assert_eq!(route(get("/other").as_bytes()), Some(Route::NotFound));
        assert_eq!(
            route(b"POST /healthz HTTP/1.1\r\n\r\n"),
            Some(Route::NotFound)
        );
        assert_eq!(route(b"GET /healthz HTTP/1.1\r\nHo"), None);
        assert_eq!(route(b"\x01\x02 nonsense\r\n\r\n"), Some(Route::BadRequest));
    }

    #[test]
    fn oversized_requests_are_refused() {
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_REQUEST_BYTES + 10, b'a');
        assert_eq!(route(&big), Some(Route::TooLarge));
    }

    #[test]
    fn responses_carry_length_and_close() {
        let r = String::from_utf8(response(200, "text/plain", b"ok")).unwrap();
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(r.contains("Content-Length: 2\r\n"));
        assert!(r.contains("Connection: close\r\n"));
        assert!(r.ends_with("\r\n\r\nok"));
    }
}
