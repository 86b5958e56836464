//! Wiring of `sensor-server`: recover the store, start the committer and the workers,
//! bind the listeners, run the event loop, then stop everything in order.

mod archive;
pub mod config;
mod error;
mod http;
mod ingest;
mod store;

pub use error::Error;

// What the fuzz targets and `sensor-server verify` open of the store.
pub use store::files::read_archive_state;
pub use store::segments::{Store, StoreOptions};
pub use store::verify::{VerifyReport, verify};

use crate::server::config::{ArchiveArgs, RebuildConfig, ServerConfig, ShipConfig};
use crate::server::ingest::completion::{Job, Notifier, completion_channel};
use crate::server::ingest::event_loop::{EventLoop, Limits, LoopParts, WAKER};
use crate::server::ingest::tls::TlsFiles;
use crate::server::ingest::worker::spawn_pool;
use crate::server::store::committer::{Retention, run_committer};
use crate::server::store::db::Db;
use crate::server::store::segments::Sensors;
use archive::bucket::{self, ArchiveConfig};
use archive::confirmed::Confirmed;
use archive::fetcher::Fetcher;
use archive::shipper::{Archive, Source};
use log::info;
use mio::net::TcpListener;
use socket2::{Domain, Protocol, Socket, Type};
use std::io::{self, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use store::verify::check_is_store;

/// Batches that may wait for one worker; past it the loop stops reading the connections
/// pinned to that worker (backpressure).
const JOB_QUEUE: usize = 128;
/// The listen backlog: 10,000 sensors arriving at once must not wait on SYN retries
/// (the kernel caps it at net.core.somaxconn).
const BACKLOG: i32 = 4096;

/// Runs the server until SIGTERM/SIGINT; returns once every owed reply is written and
/// the store is synced.
pub fn run(config: ServerConfig) -> Result<(), Error> {
    let listen = resolve(&config.listen)?;
    let http_listen = config.http_listen.as_deref().map(resolve).transpose()?;
    let archive_config = archive_config(&config.archive)?;
    let tls = tls_files(&config)
        .map(|files| files.load().map(|identity| (files, identity)))
        .transpose()
        .map_err(Error::Config)?;
    // Bound before the store is opened: a port that is taken must not leave a new data
    // directory and an empty segment behind.
    let listener = bind(listen)?;
    let http_listener = http_listen.map(bind).transpose()?;
    let max_age = Duration::from_secs(config.segment_max_age);
    let (mut store, sensors) = open_store(&config.data_dir, config.segment_bytes, max_age)?;
    let store_metrics = store.metrics();
    let archive = archive_config
        .map(|a| start_archive(a, &mut store))
        .transpose()?;

    let poll = mio::Poll::new().map_err(Error::system("poll"))?;
    let waker = mio::Waker::new(poll.registry(), WAKER).map_err(Error::system("waker"))?;
    let (notifier, completions) = completion_channel(Arc::new(waker));
    let watermarks = store.watermarks();
    let db = Arc::new(Db::new(sensors, store, notifier.clone(), config.fsync));
    // Shipped segments are what retention may delete: the shipper wakes it.
    let woken = Arc::downgrade(&db);
    watermarks.on_shipped(move || {
        if let Some(db) = woken.upgrade() {
            db.wake_committer();
        }
    });

    announce(&listener, http_listener.as_ref()).map_err(Error::system("stdout"))?;

    let retention = archive.as_ref().map(|(_, confirmed)| Retention {
        confirmed: confirmed.clone(),
        keep_bytes: config.archive.keep_shipped_bytes,
    });
    let (jobs, threads) = Threads::start(&config, &db, &notifier, retention)?;
    drop(notifier);
    let parts = LoopParts {
        poll,
        listener,
        http_listener,
        jobs,
        completions,
        db: db.clone(),
        store: store_metrics,
        archive: archive.as_ref().map(|(a, _)| a.metrics.clone()),
        tls,
    };
    let event_loop = EventLoop::new(parts, limits(&config)).map_err(Error::system("event loop"))?;
    // Returning drops the job senders: the workers finish their queues and exit.
    let served = event_loop.run();
    threads.stop(&db);
    if let Some((archive, _)) = archive {
        archive.finish();
    }
    served
}

/// Checks the CLI and the bucket, then starts shipping what `store` seals.
fn start_archive(
    config: ArchiveConfig,
    store: &mut Store,
) -> Result<(Archive, Arc<Confirmed>), Error> {
    let bucket =
        bucket::check_start(&config).map_err(|e| Error::Archive(format!("archive: {e}")))?;
    let dir = store.dir().to_path_buf();
    let confirmed = Arc::new(Confirmed::new(&dir, store.take_archive_state()));
    let source = Source {
        dir,
        store_id: store.id().to_owned(),
        watermarks: store.watermarks(),
        sealed: store.sealed_crcs(),
        retired_through: store.retired_through(),
    };
    let archive = Archive::start(config, source, confirmed.clone(), bucket)
        .map_err(Error::system("archive"))?;
    Ok((archive, confirmed))
}

fn open_store(
    dir: &Path,
    segment_bytes: u64,
    max_age: Duration,
) -> Result<(Store, Sensors), Error> {
    Store::open(StoreOptions {
        dir: dir.to_path_buf(),
        segment_bytes,
        max_age,
    })
    .map_err(|source| Error::OpenStore {
        dir: dir.to_path_buf(),
        source,
    })
}

fn limits(config: &ServerConfig) -> Limits {
    Limits {
        max_connections: config.max_connections as usize,
        idle_timeout: (config.idle_timeout > 0).then(|| Duration::from_secs(config.idle_timeout)),
        max_line_bytes: config.max_line_bytes as usize,
        http_page: config.http_page,
        tls_handshake_timeout: Duration::from_secs(config.tls.tls_handshake_timeout),
        max_tls_handshakes: config.tls.tls_max_handshakes as usize,
    }
}

/// The TLS files the flags name, when `--tls-cert` is given.
fn tls_files(config: &ServerConfig) -> Option<TlsFiles> {
    let tls = &config.tls;
    Some(TlsFiles {
        cert: tls.tls_cert.clone()?,
        key: tls.tls_key.clone()?,
        client_ca: tls.tls_client_ca.clone(),
    })
}

/// The worker pool and the committer.
struct Threads {
    workers: Vec<JoinHandle<()>>,
    committer: JoinHandle<()>,
}

impl Threads {
    /// Starts them; returns the workers' job queues (one per worker) for the loop.
    fn start(
        config: &ServerConfig,
        db: &Arc<Db>,
        notifier: &Notifier,
        retention: Option<Retention>,
    ) -> Result<(Vec<crossbeam_channel::Sender<Job>>, Threads), Error> {
        // The event loop keeps a core of its own: on 2 cores one worker answered as many
        // readings as two with 10% less CPU per reading (BENCHMARKS.md).
        let count = config.workers.map_or_else(
            || std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1)),
            NonZeroUsize::get,
        );
        let (jobs, queues): (Vec<_>, Vec<_>) = (0..count)
            .map(|_| crossbeam_channel::bounded(JOB_QUEUE))
            .unzip();
        let workers = spawn_pool(queues, db, notifier).map_err(Error::system("worker thread"))?;
        let committer = {
            let db = db.clone();
            let every = Duration::from_secs(config.checkpoint_interval);
            std::thread::Builder::new()
                .name("committer".into())
                .spawn(move || run_committer(&db, every, retention.as_ref()))
                .map_err(Error::system("committer thread"))?
        };
        info!(
            "serving with {count} workers, fsync {:?}, up to {} connections",
            config.fsync, config.max_connections
        );
        Ok((jobs, Threads { workers, committer }))
    }

    /// Once the loop has returned (and dropped the job queues): the workers finish what
    /// is queued, giving up batches the store cannot take (they were never
    /// acknowledged), then the committer syncs, seals and checkpoints.
    fn stop(self, db: &Db) {
        db.abandon_unwritable();
        for worker in self.workers {
            let _ = worker.join();
        }
        db.close();
        let _ = self.committer.join();
        info!("store synced and sealed");
    }
}

/// `sensor-server ship`: seals what a crash left in `config.data_dir`, ships every
/// sealed segment, and succeeds only when nothing is left to ship.
pub fn ship(config: ShipConfig) -> Result<(), Error> {
    let mut archive_config = archive_config(&config.archive)?
        .ok_or_else(|| Error::Config("ship needs --archive s3://BUCKET/PREFIX".into()))?;
    // A one-shot command ships until done or until its own deadline.
    archive_config.stop_timeout = Duration::from_secs(config.deadline);
    check_is_store(&config.data_dir).map_err(|source| Error::NotAStore {
        command: "ship",
        source,
    })?;
    // Nothing is appended: the store is opened only to seal what a crash left.
    let (mut store, _) = open_store(&config.data_dir, u64::MAX, Duration::MAX)?;
    let (archive, _) = start_archive(archive_config, &mut store)?;
    match archive.finish() {
        0 => Ok(()),
        left => Err(Error::Archive(format!(
            "{left} sealed segments could not be shipped within --deadline {}s",
            config.deadline
        ))),
    }
}

/// `sensor-server rebuild`: fetches the segments an incomplete store lost back from the
/// archive and writes the checkpoint that counts them.
pub fn rebuild(config: RebuildConfig) -> Result<(), Error> {
    let archive_config = archive_config(&config.archive)?.ok_or_else(|| {
        Error::Config("rebuild needs --archive s3://BUCKET/PREFIX, where the store shipped".into())
    })?;
    check_is_store(&config.data_dir).map_err(|source| Error::NotAStore {
        command: "rebuild",
        source,
    })?;
    let (mut store, _) = open_store(&config.data_dir, u64::MAX, Duration::MAX)?;
    if store.incomplete().is_none() {
        info!("the store's statistics are complete: nothing to rebuild");
        return Ok(());
    }
    let answers =
        bucket::check_start(&archive_config).map_err(|e| Error::Archive(e.to_string()))?;
    if answers == bucket::Bucket::Silent {
        return Err(Error::Archive(format!(
            "archive bucket {} does not answer",
            archive_config.bucket
        )));
    }
    let scratch = std::env::temp_dir().join(format!("sensorhub-rebuild-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(Error::system("rebuild scratch directory"))?;
    let rebuilt = Fetcher::list(archive_config, store.id(), scratch.clone())
        .map_err(|e| e.to_string())
        .and_then(|fetcher| {
            store
                .rebuild(&mut |n| fetcher.fetch(n))
                .map_err(|e| e.to_string())
        });
    let _ = std::fs::remove_dir_all(&scratch);
    let sensors = rebuilt.map_err(|e| Error::Archive(format!("cannot rebuild: {e}")))?;
    info!(
        "rebuilt: {} sensors; the next start is complete",
        sensors.len()
    );
    Ok(())
}

/// The archive settings, checked, when `--archive` is given.
fn archive_config(args: &ArchiveArgs) -> Result<Option<ArchiveConfig>, Error> {
    let Some(url) = &args.archive else {
        return Ok(None);
    };
    let (bucket, prefix) = bucket::parse_s3_url(url).map_err(Error::Config)?;
    let host = args.host_id.clone().unwrap_or_else(bucket::hostname);
    bucket::check_host_id(&host).map_err(Error::Config)?;
    if let Some(endpoint) = &args.archive_endpoint {
        bucket::check_endpoint(endpoint).map_err(Error::Config)?;
    }
    Ok(Some(ArchiveConfig {
        bucket,
        prefix,
        endpoint: args.archive_endpoint.clone(),
        host,
        cli: args.archive_cli.clone(),
        upload_timeout: Duration::from_secs(args.archive_upload_timeout),
        stop_timeout: Duration::from_secs(args.archive_stop_timeout),
    }))
}
fn resolve(addr: &str) -> Result<SocketAddr, Error> {
    addr.to_socket_addrs()
        .map_err(|e| Error::Config(format!("bad address {addr:?}: {e}")))?
        .next()
        .ok_or_else(|| Error::Config(format!("bad address {addr:?}: resolves to nothing")))
}

fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    let listen = || -> io::Result<TcpListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(BACKLOG)?;
        Ok(TcpListener::from_std(socket.into()))
    };
    listen().map_err(|source| Error::Listen { addr, source })
}

/// Prints the bound addresses as the first lines of stdout (the CLI contract: tests and
/// scripts that pass port 0 read them).
fn announce(listener: &TcpListener, http: Option<&TcpListener>) -> io::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "listening on {}", listener.local_addr()?)?;
    if let Some(http) = http {
        writeln!(out, "http on {}", http.local_addr()?)?;
    }
    out.flush()
}
