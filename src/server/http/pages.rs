//! What the HTTP side port answers: the health check, the Prometheus page and the
//! sensors document. Kept apart from `http.rs` (connections and requests) and from the
//! event loop, which only gathers the figures.

use crate::server::archive::shipper::ArchiveMetrics;
use crate::server::http::metrics::{Exposition, LoopStats};
use crate::server::http::port::{Route, response};
use crate::server::store::db::Db;
use crate::server::store::segments::StoreMetrics;
use crate::server::store::stats::SensorView;
use crate::wire::reply::Status;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;

/// The page at `/`: one live chart per sensor, drawn by the browser from `/sensors`,
/// `/metrics` and `/healthz` (which it polls, keeping the history itself). Plain
/// HTML, CSS and canvas: nothing loaded from elsewhere.
const PAGE: &str = include_str!("page.html");

/// Everything the pages show, gathered by the event loop.
pub(crate) struct Figures<'a> {
    /// `--http-page`: `/` serves the page (otherwise it is a 404, as the protocol says
    /// of every path but the three).
    pub page: bool,
    pub loop_stats: &'a LoopStats,
    pub open_connections: usize,
    /// Batches waiting for a worker.
    pub queue_depth: usize,
    pub db: &'a Db,
    pub store: &'a StoreMetrics,
    /// The shipper's figures, when `--archive` is on.
    pub archive: Option<&'a ArchiveMetrics>,
    /// With `--tls-cert`: when the server certificate in use expires, Unix seconds.
    pub tls_expires_at: Option<i64>,
}

/// The complete response to `route`.
pub(crate) fn render(route: Route, f: &Figures) -> Vec<u8> {
    const TEXT: &str = "text/plain; charset=utf-8";
    match route {
        Route::Page if f.page => response(200, "text/html; charset=utf-8", PAGE.as_bytes()),
        Route::Page | Route::NotFound => response(404, TEXT, b"not found\n"),
        // A load balancer's health check: a server that cannot store acknowledges
        // nothing, so sensors are better served elsewhere.
        Route::Healthz => match f.store.unavailable() {
            None => response(200, TEXT, b"ok"),
            Some(why) => response(503, TEXT, why.as_bytes()),
        },
        Route::Metrics => response(
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics_text(f).as_bytes(),
        ),
        Route::Sensors => response(200, "application/json", &sensors_body(f.db)),
        Route::BadRequest => response(400, TEXT, b"bad request\n"),
        Route::TooLarge => response(431, TEXT, b"request too large\n"),
    }
}

/// The `/sensors` document: every sensor with at least one stored reading, by id.
pub(crate) fn sensors_body(db: &Db) -> Vec<u8> {
    db.with_sensors(|sensors| {
        let view: BTreeMap<&str, SensorView> = sensors
            .iter()
            .map(|(id, stats)| (id.as_str(), SensorView::from(stats)))
            .collect();
        serde_json::to_vec(&view).unwrap_or_default()
    })
}

fn metrics_text(f: &Figures) -> String {
    let mut e = Exposition::default();
    loop_metrics(&mut e, f);
    if let Some(expires_at) = f.tls_expires_at {
        tls_metrics(&mut e, f.loop_stats, expires_at);
    }
    store_metrics(&mut e, f.store);
    if let Some(archive) = f.archive {
        archive_metrics(&mut e, archive);
    }
    e.finish()
}

/// Connections, replies and the worker queue: the event loop's own figures.
fn loop_metrics(e: &mut Exposition, f: &Figures) {
    let s = f.loop_stats;
    e.gauge(
        "sensorhub_connections_open",
        "Sensor connections currently open.",
        f.open_connections as f64,
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
        f.queue_depth as f64,
    );
    e.gauge(
        "sensorhub_sensors",
        "Sensors with at least one stored reading.",
        f.db.with_sensors(|m| m.len()) as f64,
    );
}

/// The sensor port's TLS: handshakes done and failed, and the certificate's expiry.
fn tls_metrics(e: &mut Exposition, s: &LoopStats, expires_at: i64) {
    e.counter(
        "sensorhub_tls_handshakes_total",
        "TLS handshakes completed on the sensor port.",
        s.tls_handshakes,
    );
    e.labelled_counter(
        "sensorhub_tls_handshake_failures_total",
        "TLS handshakes that failed, by reason.",
        "reason",
        &s.tls_failures,
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    e.gauge(
        "sensorhub_tls_certificate_expiry_seconds",
        "Seconds until the server's TLS certificate expires (negative: expired).",
        (expires_at - now) as f64,
    );
}

fn store_metrics(e: &mut Exposition, store: &StoreMetrics) {
    e.counter(
        "sensorhub_store_records_total",
        "Records appended to the store since start.",
        store.records.load(Relaxed),
    );
    let gauges = [
        (
            "sensorhub_store_bytes",
            "Bytes in the store's *.jsonl files.",
            store.bytes.load(Relaxed) as f64,
        ),
        (
            "sensorhub_store_segments",
            "Number of *.jsonl files in the store.",
            store.segments.load(Relaxed) as f64,
        ),
    ];
    for (name, help, value) in gauges {
        e.gauge(name, help, value);
    }
    e.histogram(
        "sensorhub_fsync_seconds",
        "Duration of each store fsync.",
        &store.fsync_seconds,
    );
    let available = if store.unavailable().is_none() {
        1.0
    } else {
        0.0
    };
    e.gauge(
        "sensorhub_store_available",
        "1 while the store takes writes; 0 while it cannot (disk full, I/O error).",
        available,
    );
    e.counter(
        "sensorhub_store_write_failures_total",
        "Store writes that failed; each batch was undone and retried.",
        store.write_failures.load(Relaxed),
    );
    e.counter(
        "sensorhub_store_segments_retired_total",
        "Shipped segments deleted by retention since start.",
        store.retired_segments.load(Relaxed),
    );
    e.gauge(
        "sensorhub_store_corrupt_files",
        "Store files whose stored bytes changed on disk (found after start); never shipped.",
        store.corrupt_files.load(Relaxed) as f64,
    );
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
