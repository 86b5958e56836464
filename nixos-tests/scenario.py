"""The topology scenarios, written once and run by every driver: `run` (one server, two
sensors) and `run_fleet` (two servers behind a balancer, archiving to S3).

One server in a server subnet, client1 (temperature) and client2 (humidity) in a client
subnet, a router between them. The drivers differ only in how they run a command on a
host and how they break things:

- nixos-tests/topology.nix: NixOS VMs (the NixOS test driver, `checks.topology`)
- nixos-tests/netns.py:     Linux network namespaces on this machine (CI)

A driver passes an object with these methods (all waits inside are bounded):

    http(path) -> str              GET on the server's HTTP side port, body only
    start_server(), crash_server() the server service (crash = kill -9)
    stop_server()                  SIGTERM, waiting for a clean exit
    start_client(name), stop_client(name)   stop = SIGTERM, waiting for the exit
    cut(name), restore(name)       take a client's link down / up
    exchange(name, data, timeout) -> bytes  from client host `name`: connect to the
                                   server's sensor port, send `data`, return what
                                   is read until EOF or timeout (exchange_command)
    store_text() -> str            every *.jsonl file of the server's store
    answers(name) -> str           the client's --record file ("SENSOR SEQ STATUS")
    summary(name) -> str           the client's final summary line ("sent ... ok ...")
    sensor(name) -> str            the sensor id of client `name`
    interval_ms                    the clients' reading interval

`run(driver)` raises AssertionError on the first broken expectation and returns the
verdict lines. Both scenarios take `step`, a function returning a context manager per
named step (the NixOS driver's `subtest`); by default each step is logged.
"""

import base64
import contextlib
import json
import subprocess
import time
from pathlib import Path

TOPOLOGY = json.loads((Path(__file__).resolve().parent / "topology.json").read_text())
CUT_SECONDS = 3
S3_CUT_SECONDS = 10
CRASH_PAUSE_SECONDS = 2
WAIT_SECONDS = 60
CLIENTS = tuple(TOPOLOGY["sensors"])


# --- TLS (the drivers' --tls): certificates made with `sensor-server certs`, the path
# the README gives a user, and the flags that use them -------------------------------

def make_pki(bin_dir, pki, server_name):
    """A CA, the server's certificate for `server_name` (what sensors dial), and one
    certificate per sensor of the topology, in the directory `pki`."""
    ids = [arg for s in TOPOLOGY["sensors"].values() for arg in ("--sensor", s["sensor"])]
    subprocess.run([str(Path(bin_dir) / "sensor-server"), "certs", "--dir", str(pki),
                    "--server", server_name, *ids], check=True, stdout=subprocess.DEVNULL,
                   timeout=60)


def server_tls_args(pki):
    """sensor-server's flags for the files make_pki wrote under `pki` (a path as the
    server sees it)."""
    return ["--tls-cert", f"{pki}/server.pem", "--tls-key", f"{pki}/server.key",
            "--tls-client-ca", f"{pki}/ca.pem"]


def client_tls_args(pki, sensor):
    """sensor-client's flags for `sensor`'s certificate under `pki`."""
    return ["--tls-ca", f"{pki}/ca.pem", "--tls-cert", f"{pki}/sensor-{sensor}.pem",
            "--tls-key", f"{pki}/sensor-{sensor}.key"]


def logging_step(log):
    """The default `step`: log the step's name, run it."""
    @contextlib.contextmanager
    def step(name):
        log(name)
        yield
    return step


def exchange_command(address, port, data, timeout):
    """A shell command for a client host: send `data` to the sensor port and print
    what comes back until the server closes or `timeout` seconds pass. Only bash and
    coreutils, which every driver's hosts have."""
    payload = base64.b64encode(data).decode()
    return (f"timeout {timeout} bash -c 'exec 3<>/dev/tcp/{address}/{port}; "
            f"echo {payload} | base64 -d >&3; cat <&3' || true")


def wait_for(what, predicate, timeout=WAIT_SECONDS):
    """Polls `predicate` (an observable condition, not a clock) until true."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except Exception:  # a host still booting or a service restarting
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def sensors(d):
    return json.loads(d.http("/sensors"))


def count(d, client):
    return sensors(d).get(d.sensor(client), {}).get("count", 0)


def metric(d, name):
    for line in d.http("/metrics").splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def run(d, log=print, step=None):
    step = step or logging_step(log)
    verdict = []

    with step("step 1: server, then client1 (temperature) and client2 (humidity)"):
        start_one(d)
    with step("step 2: both sensors appear with growing counts; 2 open connections"):
        steady(d)
    with step("step 3: kill -9 the server, wait, start it again"):
        verdict.append(crash_and_restart(d))
    with step(f"step 4: cut client1's link for {CUT_SECONDS} s"):
        verdict.append(cut_client(d))
    with step("step 5: a hostile peer on a client host"):
        verdict.append(hostile_peer(d))
    with step("step 6: stop the clients, then SIGTERM the server"):
        final_counts = stop_all(d)
    with step("step 7: verdict"):
        verdict += store_verdict(d, final_counts)
    for line in verdict:
        log("verdict: " + line)
    return verdict


def start_one(d):
    d.start_server()
    wait_for("the server's /healthz", lambda: d.http("/healthz") == "ok")
    for c in CLIENTS:
        d.start_client(c)


def steady(d):
    first = {}
    for c in CLIENTS:
        wait_for(f"{c}'s first readings", lambda c=c: count(d, c) >= 3)
        first[c] = count(d, c)
    for c in CLIENTS:
        wait_for(f"{c}'s count to grow", lambda c=c: count(d, c) > first[c])
    wait_for("2 open sensor connections",
             lambda: metric(d, "sensorhub_connections_open") == 2)


def crash_and_restart(d):
    d.crash_server()
    time.sleep(CRASH_PAUSE_SECONDS)  # the outage being simulated, not a synchronisation
    started = time.monotonic()
    d.start_server()
    wait_for("the restarted server's /healthz", lambda: d.http("/healthz") == "ok")
    # Counts restored from the store are the baseline: only a reconnected client can
    # raise them (a count taken before the crash could already be exceeded by
    # readings acknowledged just before it).
    restored = {c: count(d, c) for c in CLIENTS}
    for c in CLIENTS:
        wait_for(f"{c} to reconnect and deliver again after the crash",
                 lambda c=c: count(d, c) > restored[c])
    crash_recovery = time.monotonic() - started
    return (f"recovery after server crash: {crash_recovery:.2f} s "
            f"(restart to both sensors storing again)")


def cut_client(d):
    at_cut = count(d, "client1")
    d.cut("client1")
    time.sleep(CUT_SECONDS)  # the outage being simulated
    d.restore("client1")
    restored = time.monotonic()
    backlog = int(CUT_SECONDS * 1000 / d.interval_ms)
    wait_for("client1 to catch up on the readings made during the cut",
             lambda: count(d, "client1") >= at_cut + backlog)
    cut_recovery = time.monotonic() - restored
    return (f"recovery after {CUT_SECONDS} s link cut: {cut_recovery:.2f} s "
            f"(restore to client1's {backlog} buffered readings stored)")


def hostile_peer(d):
    before = {c: count(d, c) for c in CLIENTS}
    if getattr(d, "tls", False):
        # Plain bytes to the TLS port: closed in the handshake, never answered.
        replies = d.exchange("client2", b"this is garbage\n" + b"x" * 20000, 10)
        assert b'"status"' not in replies, f"a plain peer got a reply: {replies!r}"
        assert "hostile" not in sensors(d)
        for c in CLIENTS:
            wait_for(f"{c} to be unaffected", lambda c=c: count(d, c) > before[c])
        assert metric(d, 'sensorhub_tls_handshake_failures_total{reason="not_tls"}') >= 1
        return ("hostile peer: plain bytes to the TLS port closed without a reply "
                "(counted not_tls), both sensors unaffected")
    replies = d.exchange("client2", b"this is garbage\n" + b"x" * 20000, 10).decode()
    lines = replies.splitlines()
    assert len(lines) == 2, f"expected two replies, got {replies!r}"
    for line in lines:
        reply = json.loads(line)
        assert reply["status"] == "error" and reply["seq"] is None, line
    half = d.exchange("client2", b'{"sensor":"hostile","kind":"temp', 5)
    assert half == b"", f"a half line got a reply: {half!r}"
    assert "hostile" not in sensors(d)
    for c in CLIENTS:
        wait_for(f"{c} to be unaffected", lambda c=c: count(d, c) > before[c])
    return ("hostile peer: garbage and over-long line answered error, "
            "half line dropped, both sensors unaffected")


def stop_all(d):
    for c in CLIENTS:
        d.stop_client(c)
    final_counts = {c: count(d, c) for c in CLIENTS}
    d.stop_server()
    return final_counts


def acknowledged(d, c):
    """The seqs client `c` had answered ok or duplicate, and any other answers."""
    sensor = d.sensor(c)
    answers = [line.split() for line in d.answers(c).splitlines() if line.strip()]
    answered = [int(seq) for s, seq, status in answers
                if s == sensor and status in ("ok", "duplicate")]
    others = [a for a in answers if a[2] not in ("ok", "duplicate")]
    return answered, others


def store_verdict(d, final_counts):
    verdict = []
    stored = {}
    for line in d.store_text().splitlines():
        record = json.loads(line)
        stored.setdefault(record["sensor"], []).append(record["seq"])
    for c in CLIENTS:
        sensor = d.sensor(c)
        answered, others = acknowledged(d, c)
        sent = int(d.summary(c).split()[1])
        seqs = stored.get(sensor, [])
        duplicates = len(seqs) - len(set(seqs))
        gaps = len(set(answered) - set(seqs))
        unanswered = sent - len(set(answered))
        verdict.append(
            f"{sensor}: produced {sent}, answered {len(answered)}, stored {len(seqs)}, "
            f"gaps = {gaps}, duplicates = {duplicates}, unanswered = {unanswered}")
        assert not others, f"{sensor}: non-ok answers {others[:5]}"
        assert duplicates == 0, f"{sensor}: {duplicates} seqs stored twice"
        assert gaps == 0, f"{sensor}: {gaps} answered seqs missing from the store"
        assert unanswered == 0, f"{sensor}: {unanswered} readings never answered"
        assert set(seqs) == set(answered), f"{sensor}: store holds seqs never answered"
        assert final_counts[c] == len(seqs), (final_counts[c], len(seqs))
    return verdict


# --- The fleet: two servers behind a balancer, archiving to S3 -------------------------
#
# A fleet driver has, besides interval_ms, answers, summary and sensor as above:
#
#     start_s3(), cut_s3(), restore_s3()   the local S3 (bucket created) and its link
#     start_balancer()                     the TCP balancer in front of the servers
#     start_server(name), crash_server(name), stop_server(name)   as above, per server
#     server_log(name) -> str              what the server logged
#     http(name, path) -> str              GET on that server's HTTP side port
#     start_client(name), stop_client(name)
#     archive_sql(file) -> (columns, rows) download the bucket, run infra/athena/FILE on
#                                          it (DuckDB, or Athena on AWS)
#     stored_records(name) -> [dict]       every record in that server's local store

SERVERS = tuple(TOPOLOGY["fleet"]["servers"])


def fleet_count(d, server, client):
    return json.loads(d.http(server, "/sensors")).get(d.sensor(client), {}).get("count", 0)


def fleet_metric(d, server, name):
    for line in d.http(server, "/metrics").splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{server}: no metric {name}")


def storing_on(d, servers, clients=CLIENTS):
    """Waits until every client's readings grow on one of `servers`; returns seconds."""
    started = time.monotonic()
    base = {(s, c): fleet_count(d, s, c) for s in servers for c in clients}
    for c in clients:
        wait_for(f"{c} storing on one of {servers}",
                 lambda c=c: any(fleet_count(d, s, c) > base[(s, c)] for s in servers))
    return time.monotonic() - started


def shipped_all(d, server):
    return (fleet_metric(d, server, "sensorhub_archive_pending_segments") == 0
            and fleet_metric(d, server, "sensorhub_archive_segments_shipped_total") >= 1)


def run_fleet(d, log=print, step=None):
    step = step or logging_step(log)
    verdict = []

    with step("fleet step 1: S3, two servers, the balancer, then both sensors"):
        d.start_s3()
        for s in SERVERS:
            d.start_server(s)
        for s in SERVERS:
            wait_for(f"{s}'s /healthz", lambda s=s: d.http(s, "/healthz") == "ok")
        d.start_balancer()
        for c in CLIENTS:
            d.start_client(c)

    with step("fleet step 2: steady load through the balancer"):
        storing_on(d, SERVERS)
        storing_on(d, SERVERS)
        # Server A is the one holding sensor connections (source hashing may put both
        # sensors on one server): killing it must move them.
        a, b = sorted(SERVERS, key=lambda s: -fleet_metric(d, s, "sensorhub_connections_open"))
        log(f"server A = {a}, server B = {b}")

    with step("fleet step 3: kill -9 server A; its sensors fail over to B"):
        d.crash_server(a)
        failover = storing_on(d, (b,))
        verdict.append(f"failover after kill -9 of {a}: {failover:.2f} s "
                       f"(kill to both sensors storing on {b})")

    with step("fleet step 4: restart A; it ships what it had"):
        d.start_server(a)
        wait_for(f"{a}'s /healthz", lambda: d.http(a, "/healthz") == "ok")
        wait_for(f"{a} to ship the segment its crash left", lambda: shipped_all(d, a))

    with step("fleet step 5: SIGTERM B while loaded: it drains, seals and ships"):
        d.stop_server(b)
        log_text = d.server_log(b)
        assert "every sealed segment is shipped" in log_text, log_text[-2000:]
        drained = storing_on(d, (a,))
        verdict.append(f"graceful stop of {b}: exit 0, everything shipped; "
                       f"sensors storing on {a} after {drained:.2f} s")

    with step(f"fleet step 6: cut the link to S3 for {S3_CUT_SECONDS} s"):
        failures = fleet_metric(d, a, "sensorhub_archive_failures_total")
        d.cut_s3()
        time.sleep(S3_CUT_SECONDS)  # the outage being simulated
        lag = fleet_metric(d, a, "sensorhub_archive_lag_seconds")
        pending = fleet_metric(d, a, "sensorhub_archive_pending_segments")
        assert pending >= 1, "segments sealed during the cut wait to ship"
        assert lag > 0, "the lag metric shows the backlog"
        assert d.http(a, "/healthz") == "ok", "behind on shipping is still healthy"
        d.restore_s3()
        restored = time.monotonic()
        wait_for(f"{a} to catch up with S3", lambda: shipped_all(d, a))
        failures = fleet_metric(d, a, "sensorhub_archive_failures_total") - failures
        verdict.append(f"S3 cut for {S3_CUT_SECONDS} s: lag reached {lag:.1f} s "
                       f"({pending:.0f} segments pending, {failures:.0f} failed uploads), "
                       f"caught up {time.monotonic() - restored:.2f} s after the link returned")

    with step("fleet step 7: stop the sensors, then the servers"):
        for c in CLIENTS:
            d.stop_client(c)
        end_lag = fleet_metric(d, a, "sensorhub_archive_lag_seconds")
        d.stop_server(a)

    with step("fleet step 8: verdict from the archive, by the repo's SQL"):
        verdict += archive_verdict(d)
        verdict.append(f"archive lag at the end: {end_lag:.1f} s before the final stop, "
                       f"none after it (each server shipped every sealed segment)")
    for line in verdict:
        log("verdict: " + line)
    return verdict


def archive_verdict(d):
    verdict = []
    for s in SERVERS:
        assert "every sealed segment is shipped" in d.server_log(s), f"{s} left segments"
    _, rows = d.archive_sql("readings_dedup.sql")
    dedup = {}
    for sensor, _kind, _value, seq, *_ in rows:
        dedup.setdefault(sensor, []).append(seq)
    _, rows = d.archive_sql("readings_duplicates.sql")
    raw = {sensor: (records, duplicates) for sensor, records, _, duplicates in rows}
    local = sum(len(d.stored_records(s)) for s in SERVERS)
    assert sum(r for r, _ in raw.values()) == local, \
        f"the archive holds {sum(r for r, _ in raw.values())} records, the stores {local}"
    for c in CLIENTS:
        sensor = d.sensor(c)
        answered, others = acknowledged(d, c)
        produced = int(d.summary(c).split()[1])
        archived = dedup.get(sensor, [])
        records, duplicates = raw.get(sensor, (0, 0))
        missing = len(set(answered) - set(archived))
        verdict.append(
            f"{sensor}: produced {produced}, acknowledged {len(set(answered))}, "
            f"in the archive after dedup {len(archived)}, raw duplicates {duplicates}, "
            f"missing {missing}")
        assert not others, f"{sensor}: non-ok answers {others[:5]}"
        assert missing == 0, f"{sensor}: {missing} acknowledged readings not in the archive"
        assert len(archived) == len(set(archived)), f"{sensor}: dedup left a seq twice"
        assert set(archived) == set(answered), f"{sensor}: archive holds unacknowledged seqs"
        assert produced == len(set(answered)), f"{sensor}: readings never answered"
    return verdict
