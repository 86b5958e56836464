"""The topology scenario, written once and run by every driver.

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
verdict lines.
"""

import base64
import json
import time

CUT_SECONDS = 3
CRASH_PAUSE_SECONDS = 2
WAIT_SECONDS = 60
CLIENTS = ("client1", "client2")


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


def run(d, log=print):
    verdict = []

    log("step 1: server, then client1 (temperature) and client2 (humidity)")
    d.start_server()
    wait_for("the server's /healthz", lambda: d.http("/healthz") == "ok")
    for c in CLIENTS:
        d.start_client(c)

    log("step 2: both sensors appear with growing counts; 2 open connections")
    first = {}
    for c in CLIENTS:
        wait_for(f"{c}'s first readings", lambda c=c: count(d, c) >= 3)
        first[c] = count(d, c)
    for c in CLIENTS:
        wait_for(f"{c}'s count to grow", lambda c=c: count(d, c) > first[c])
    wait_for("2 open sensor connections",
             lambda: metric(d, "sensorhub_connections_open") == 2)

    log("step 3: kill -9 the server, wait, start it again")
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
    verdict.append(f"recovery after server crash: {crash_recovery:.2f} s "
                   f"(restart to both sensors storing again)")

    log(f"step 4: cut client1's link for {CUT_SECONDS} s")
    at_cut = count(d, "client1")
    d.cut("client1")
    time.sleep(CUT_SECONDS)  # the outage being simulated
    d.restore("client1")
    restored = time.monotonic()
    backlog = int(CUT_SECONDS * 1000 / d.interval_ms)
    wait_for("client1 to catch up on the readings made during the cut",
             lambda: count(d, "client1") >= at_cut + backlog)
    cut_recovery = time.monotonic() - restored
    verdict.append(f"recovery after {CUT_SECONDS} s link cut: {cut_recovery:.2f} s "
                   f"(restore to client1's {backlog} buffered readings stored)")

    log("step 5: a hostile peer on a client host")
    before = {c: count(d, c) for c in CLIENTS}
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
    verdict.append("hostile peer: garbage and over-long line answered error, "
                   "half line dropped, both sensors unaffected")

    log("step 6: stop the clients, then SIGTERM the server")
    for c in CLIENTS:
        d.stop_client(c)
    final_counts = {c: count(d, c) for c in CLIENTS}
    d.stop_server()

    log("step 7: verdict")
    stored = {}
    for line in d.store_text().splitlines():
        record = json.loads(line)
        stored.setdefault(record["sensor"], []).append(record["seq"])
    for c in CLIENTS:
        sensor = d.sensor(c)
        answers = [l.split() for l in d.answers(c).splitlines() if l.strip()]
        answered = [int(seq) for s, seq, status in answers
                    if s == sensor and status in ("ok", "duplicate")]
        others = [a for a in answers if a[2] not in ("ok", "duplicate")]
        summary = d.summary(c)
        sent = int(summary.split()[1])
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
    for line in verdict:
        log("verdict: " + line)
    return verdict
