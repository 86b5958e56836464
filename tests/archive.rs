//! The archive against a local S3 (moto_server) through the real AWS CLI: sealed
//! segments ship once, byte for byte, in the Hive layout; outages, refusals and a crash
//! mid-upload are retried; retention never deletes what S3 has not confirmed.
//!
//! Needs `moto_server` and `aws` on PATH (`scripts/test.sh` installs both in a venv).
//! moto does not verify `x-amz-checksum-sha256` (measured with moto 5.2), so S3's
//! refusal of a bad checksum is played by a wrapper around the CLI that answers what S3
//! answers.

mod common;
use common::s3::*;
use common::*;
use std::process::Command;
use std::time::Duration;

/// Every test here needs a local S3; grouped so that a build without one (the Nix
/// sandbox) can skip them by name (`--skip s3::`).
mod s3 {
    use super::*;

    #[test]
    fn sealed_segments_ship_once_byte_for_byte_in_the_hive_layout() {
        let dir = temp_dir("archive-ship");
        let s3 = S3::up();
        let wrapper = cli_wrapper(&dir, "");
        let cli = wrapper.to_str().expect("path");
        let mut server = archived_server(&dir, &s3, &["--archive-cli", cli]);
        store_readings(&server, 1..=100);
        wait_until("segment 1 sealed by age and shipped", || {
            shipped_everything(&server)
        });
        assert_eq!(server.get("/healthz"), (200, "ok".into()));
        store_readings(&server, 101..=150);
        server.signal("TERM");
        assert!(server.wait_exit(PATIENCE).success());

        let keys = s3.keys();
        assert_eq!(keys.len(), 2, "{keys:?}");
        let today = Command::new("date")
            .args(["-u", "+%F"])
            .output()
            .expect("date")
            .stdout;
        let today = String::from_utf8_lossy(&today);
        let store_id = store_id(&dir);
        assert_eq!(
            keys[0],
            format!(
                "fleet/readings/dt={}/host=server-a/segment-0000000001-{store_id}.jsonl.gz",
                today.trim()
            )
        );
        for (key, name) in keys.iter().zip(segment_files(&dir)) {
            let stem = name.trim_end_matches(".jsonl");
            assert!(
                key.ends_with(&format!("/host=server-a/{stem}-{store_id}.jsonl.gz")),
                "{key}"
            );
            let local = std::fs::read(dir.join(&name)).expect("segment");
            assert_eq!(s3.object(key, &dir), local, "{key} holds exactly {name}");
        }
        let archived: usize = keys
            .iter()
            .map(|k| s3.object(k, &dir).iter().filter(|&&b| b == b'\n').count())
            .sum();
        assert_eq!(archived, 150, "a graceful stop sealed and shipped the rest");

        // A restart ships nothing again: the watermark is in the data dir.
        let server = archived_server(&dir, &s3, &["--archive-cli", cli]);
        assert_eq!(server.sensors()["a"]["count"], 150);
        store_readings(&server, 151..=160);
        wait_until("segment 3 shipped", || s3.keys().len() == 3);
        for number in 1..=3 {
            assert_eq!(
                uploads_of(&dir, number),
                1,
                "segment {number} uploaded once"
            );
        }
    }

    #[test]
    fn an_s3_outage_is_retried_until_it_ends_and_health_stays_ok() {
        let dir = temp_dir("archive-outage");
        let mut s3 = S3::down();
        let server = archived_server(&dir, &s3, &[]);
        assert_eq!(
            server.metric("sensorhub_archive_failures_total"),
            1.0,
            "the start-up check found the bucket silent: a warning and a count, not a stop"
        );
        store_readings(&server, 1..=50);
        wait_until("a failed upload counted", || {
            server.metric("sensorhub_archive_failures_total") >= 2.0
        });
        assert_eq!(server.metric("sensorhub_archive_pending_segments"), 1.0);
        assert!(server.metric("sensorhub_archive_lag_seconds") > 0.0);
        assert_eq!(
            server.get("/healthz"),
            (200, "ok".into()),
            "behind is not unhealthy"
        );
        s3.start();
        wait_until("the backlog shipped after the outage", || {
            shipped_everything(&server)
        });
        assert_eq!(server.metric("sensorhub_archive_lag_seconds"), 0.0);
        let keys = s3.keys();
        assert_eq!(keys.len(), 1, "{keys:?}");
        assert_eq!(
            s3.object(&keys[0], &dir)
                .iter()
                .filter(|&&b| b == b'\n')
                .count(),
            50
        );
    }

    #[test]
    fn a_stop_during_an_outage_exits_in_time_and_ships_at_the_next_start() {
        let dir = temp_dir("archive-stop");
        let mut s3 = S3::down();
        let mut server = archived_server(&dir, &s3, &["--archive-stop-timeout", "2"]);
        store_readings(&server, 1..=20);
        server.signal("TERM");
        assert!(server.wait_exit(Duration::from_secs(10)).success());
        let log = std::fs::read_to_string(dir.with_extension("server.log")).expect("log");
        assert!(
            log.contains("unshipped"),
            "the stop says what it left: {log}"
        );
        let left = std::fs::read_to_string(dir.join("segment-0000000001.jsonl")).expect("kept");
        assert_eq!(
            left.lines().count(),
            20,
            "the unshipped segment stays whole"
        );

        s3.start();
        let server = archived_server(&dir, &s3, &[]);
        wait_until("the left segment shipped at the next start", || {
            shipped_everything(&server)
        });
        assert_eq!(s3.keys().len(), 1);
    }

    #[test]
    fn a_refused_checksum_is_not_counted_as_shipped_and_is_retried() {
        let dir = temp_dir("archive-baddigest");
        let s3 = S3::up();
        // The first two uploads get S3's answer to a body that does not match its SHA-256.
        let refusals = dir.with_extension("refusals");
        let body = format!(
            "if [[ $* == *put-object* && \"$(cat {r} 2>/dev/null | wc -l)\" -lt 2 ]]; then echo x >> {r}; \
         echo 'An error occurred (BadDigest) when calling the PutObject operation: \
         The SHA256 you specified did not match the calculated checksum.' >&2; exit 255; fi",
            r = refusals.display()
        );
        let wrapper = cli_wrapper(&dir, &body);
        let server = archived_server(
            &dir,
            &s3,
            &["--archive-cli", wrapper.to_str().expect("path")],
        );
        store_readings(&server, 1..=10);
        wait_until("two refusals counted", || {
            server.metric("sensorhub_archive_failures_total") >= 2.0
        });
        wait_until("shipped after the refusals", || shipped_everything(&server));
        assert_eq!(
            server.metric("sensorhub_archive_segments_shipped_total"),
            1.0
        );
        assert_eq!(uploads_of(&dir, 1), 3, "two refused, one accepted");
        let log = std::fs::read_to_string(dir.with_extension("server.log")).expect("log");
        assert!(log.contains("BadDigest"), "the refusal is logged");
        let keys = s3.keys();
        assert_eq!(
            s3.object(&keys[0], &dir),
            std::fs::read(dir.join(&segment_files(&dir)[0])).expect("segment")
        );
    }

    #[test]
    fn a_crash_mid_upload_leaves_one_exact_object_after_restart() {
        let dir = temp_dir("archive-crash");
        let s3 = S3::up();
        let started = dir.with_extension("upload-started");
        // The upload stalls until the server is gone.
        let body = format!(
            "if [[ $* == *put-object* ]]; then touch {}; sleep 2; fi",
            started.display()
        );
        let slow = cli_wrapper(&dir, &body);
        let server = archived_server(&dir, &s3, &["--archive-cli", slow.to_str().expect("path")]);
        store_readings(&server, 1..=30);
        wait_until("an upload in flight", || started.exists());
        server.crash();
        let server = archived_server(&dir, &s3, &[]);
        wait_until("shipped after the restart", || shipped_everything(&server));
        // The orphaned slow upload may land too: same key, same bytes.
        std::thread::sleep(Duration::from_secs(3));
        let keys = s3.keys();
        assert_eq!(keys.len(), 1, "{keys:?}");
        let segment = std::fs::read(dir.join(&segment_files(&dir)[0])).expect("segment");
        assert_eq!(s3.object(&keys[0], &dir), segment);
        assert_eq!(server.sensors()["a"]["count"], 30);
    }

    #[test]
    fn retention_never_deletes_unshipped_segments_and_statistics_outlive_it() {
        let dir = temp_dir("archive-retention");
        let mut s3 = S3::down();
        let mut server = archived_server(&dir, &s3, &["--keep-shipped-bytes", "0"]);
        for batch in 0..3 {
            let first = batch * 10 + 1;
            store_readings(&server, first..=first + 9);
            let sealed = batch as usize + 2;
            wait_until("the batch sealed", || segment_files(&dir).len() >= sealed);
        }
        wait_until("uploads failing", || {
            server.metric("sensorhub_archive_failures_total") >= 1.0
        });
        assert_eq!(
            segment_files(&dir).len(),
            4,
            "3 sealed, unshipped, all kept + the active one"
        );
        s3.start();
        wait_until("everything shipped", || {
            server.metric("sensorhub_archive_segments_shipped_total") == 3.0
        });
        wait_until("shipped segments deleted", || {
            segment_files(&dir).len() == 1
        });
        assert_eq!(server.metric("sensorhub_store_segments_retired_total"), 3.0);
        assert_eq!(s3.keys().len(), 3);
        server.signal("TERM");
        assert!(server.wait_exit(PATIENCE).success());

        let server = archived_server(&dir, &s3, &["--keep-shipped-bytes", "0"]);
        assert_eq!(
            server.sensors()["a"]["count"],
            30,
            "statistics outlive the files"
        );
        assert_duplicate_then_ok(&server, 30, 31);
    }

    #[test]
    fn ship_empties_a_crashed_store_into_the_archive_or_says_it_could_not() {
        let dir = temp_dir("archive-ship-cmd");
        let server = Server::start(&dir, &[]); // no archive: a crashed instance's volume
        store_readings(&server, 1..=40);
        server.crash();

        let ship = |s3: &S3, deadline: &str| {
            Command::new(CREDENTIALS[0])
                .args(&CREDENTIALS[1..])
                .arg(SERVER)
                .args(["ship", "--data-dir"])
                .arg(&dir)
                .args([
                    "--archive",
                    "s3://sensorhub-archive/fleet",
                    "--host-id",
                    "dead-one",
                ])
                .args(["--archive-endpoint", &s3.endpoint(), "--deadline", deadline])
                .output()
                .expect("run ship")
        };
        let mut s3 = S3::down();
        let out = ship(&s3, "2");
        assert!(!out.status.success(), "nothing could be shipped");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("could not be shipped"), "{stderr}");

        s3.start();
        let out = ship(&s3, "60");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let keys = s3.keys();
        assert_eq!(keys.len(), 1, "{keys:?}");
        assert!(
            keys[0].contains(&format!(
                "/host=dead-one/segment-0000000001-{}.jsonl.gz",
                store_id(&dir)
            )),
            "{keys:?}"
        );
        assert_eq!(
            s3.object(&keys[0], &dir)
                .iter()
                .filter(|&&b| b == b'\n')
                .count(),
            40
        );
    }
}
