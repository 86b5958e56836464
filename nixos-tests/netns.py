#!/usr/bin/env python3
"""The topology scenarios (scenario.py) on Linux network namespaces, as root.

One namespace per host plus `router`; in `router`, bridge br1 is the server subnet and
br2 the client subnet, with forwarding on; each host hangs off its bridge by a veth
pair. Addresses and names come from topology.json, the same as the NixOS tests'.

- default: `server`, `client1`, `client2` (scenario.run)
- `--fleet`: `servera` and `serverb` behind HAProxy on `balancer` (mode tcp, source
  hashing, health checks on /healthz), moto_server as S3 on `s3`, the sensors
  connecting to the balancer (scenario.run_fleet). Needs haproxy, and moto_server,
  the AWS CLI and DuckDB (tests/requirements.txt) on PATH and importable.

Safety: the whole run happens inside `unshare --net --mount` with a private tmpfs on
/run/netns, so its namespaces are invisible to the host and this process itself sits in
an empty network namespace: nothing can route off the machine. Every server, client
and probe runs with `ip netns exec`. Every wait is bounded, and an alarm ends the run.

    sudo nixos-tests/netns.py [--fleet] [--bin DIR]   (DIR holds sensor-server and
                         sensor-client; default dist/x86_64 from build-static.sh)
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "infra" / "athena"))
import scenario  # noqa: E402

try:
    import archive_sql  # noqa: E402  (DuckDB: only the fleet run needs it)
except ImportError:
    archive_sql = None

SANDBOX_MARK = "SENSORHUB_NETNS_SANDBOX"
TOPOLOGY = scenario.TOPOLOGY
SENSOR_PORT = TOPOLOGY["sensor_port"]
HTTP_PORT = TOPOLOGY["http_port"]
INTERVAL_MS = TOPOLOGY["interval_ms"]
RUN_LIMIT_SECONDS = 420
AWS_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}


def sh(*args, check=True, **kwargs):
    return subprocess.run(args, check=check, text=True, capture_output=True, **kwargs)


def in_ns(ns, *args, **kwargs):
    return sh("ip", "netns", "exec", ns, *args, **kwargs)


def build_topology(layout):
    """Namespaces and links for `layout` (topology.json's "topology" or "fleet")."""
    router = layout["router"]
    subnets = {1: TOPOLOGY["server_subnet"], 2: TOPOLOGY["client_subnet"]}
    gateways = {1: router["server_side"], 2: router["client_side"]}
    for ns in ("router", *layout["hosts"]):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    for vlan in (1, 2):
        bridge = f"br{vlan}"
        sh("ip", "-n", "router", "link", "add", bridge, "type", "bridge")
        sh("ip", "-n", "router", "addr", "add", f"{gateways[vlan]}/24", "dev", bridge)
        sh("ip", "-n", "router", "link", "set", bridge, "up")
    in_ns("router", "sysctl", "-qw", "net.ipv4.ip_forward=1")
    for ns, host in layout["hosts"].items():
        vlan = host["vlan"]
        peer = f"v-{ns}"
        sh("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", peer,
           "netns", "router")
        sh("ip", "-n", "router", "link", "set", peer, "master", f"br{vlan}", "up")
        sh("ip", "-n", ns, "addr", "add", f"{host['address']}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "route", "add", subnets[3 - vlan], "via", gateways[vlan])


def http_get(ns, port, path):
    """GET on 127.0.0.1:port inside `ns`; the body."""
    request = (f"exec 3<>/dev/tcp/127.0.0.1/{port}; "
               f"printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3")
    # Bytes: text mode would turn the header's CRLFs into LFs.
    response = subprocess.run(
        ["ip", "netns", "exec", ns, "timeout", "5", "bash", "-c", request],
        check=True, capture_output=True).stdout
    return response.split(b"\r\n\r\n", 1)[1].decode()


def spawn(ns, args, out, err=None, env=None):
    """Runs `args` in namespace `ns` (ip netns exec execs it: the pid is the program's)."""
    return subprocess.Popen(["ip", "netns", "exec", ns, *args], stdout=out,
                            stderr=err or out, env=env)


def stop(proc, what, limit):
    """SIGTERM, then a bounded wait for exit 0."""
    proc.send_signal(signal.SIGTERM)
    status = proc.wait(timeout=limit)
    assert status == 0, f"{what} exited {status} on SIGTERM"


def kill_all(procs):
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


class Clients:
    """The two simulated sensors, for both scenarios."""

    interval_ms = INTERVAL_MS

    def __init__(self, bin_dir, work, target, tls=False):
        self.bin = bin_dir
        self.work = work
        self.target = target
        self.clients = {}
        # --tls: the server requires client certificates naming each sensor, made here
        # with `sensor-server certs` (the path the README gives a user).
        self.tls = tls
        self.pki = work / "pki"
        if tls:
            scenario.make_pki(bin_dir, self.pki, target)

    def server_tls_args(self):
        return scenario.server_tls_args(self.pki) if self.tls else []

    def client_tls_args(self, sensor):
        return scenario.client_tls_args(self.pki, sensor) if self.tls else []

    def start_client(self, name):
        sensor = TOPOLOGY["sensors"][name]
        self.clients[name] = spawn(
            name, [str(self.bin / "sensor-client"), "--server", f"{self.target}:{SENSOR_PORT}",
                   "--sensor", sensor["sensor"], "--kind", sensor["kind"],
                   "--interval-ms", str(INTERVAL_MS),
                   "--record", str(self.work / f"{name}.answers"),
                   *self.client_tls_args(sensor["sensor"])],
            open(self.work / f"{name}.out", "w"), open(self.work / f"{name}.log", "w"))

    def stop_client(self, name):
        try:
            stop(self.clients[name], name, 30)
        except AssertionError as e:
            raise AssertionError(f"{e}: {(self.work / f'{name}.log').read_text()}") from None

    def answers(self, name):
        return (self.work / f"{name}.answers").read_text()

    def summary(self, name):
        lines = (self.work / f"{name}.out").read_text().splitlines()
        return next(line for line in reversed(lines) if line.startswith("sent "))

    def sensor(self, name):
        return TOPOLOGY["sensors"][name]["sensor"]


class Namespaces(Clients):
    """scenario.run's driver interface over the namespaces of topology.json's
    "topology"."""

    def __init__(self, bin_dir, work, tls=False):
        server = TOPOLOGY["topology"]["hosts"]["server"]["address"]
        super().__init__(bin_dir, work, server, tls)
        self.server = None

    def http(self, path):
        return http_get("server", HTTP_PORT, path)

    def start_server(self):
        log = open(self.work / "server.log", "a")
        self.server = spawn("server", [
            str(self.bin / "sensor-server"), "--listen", f"0.0.0.0:{SENSOR_PORT}",
            "--http-listen", f"127.0.0.1:{HTTP_PORT}", "--data-dir", str(self.work / "data"),
            *self.server_tls_args()],
            log)

    def crash_server(self):
        self.server.kill()
        self.server.wait(timeout=10)

    def stop_server(self):
        stop(self.server, "server", 15)

    def cut(self, name):
        # On the router's side, so the client keeps its address and routes.
        sh("ip", "-n", "router", "link", "set", f"v-{name}", "down")

    def restore(self, name):
        sh("ip", "-n", "router", "link", "set", f"v-{name}", "up")

    def exchange(self, name, data, timeout):
        command = scenario.exchange_command(self.target, SENSOR_PORT, data, timeout)
        return in_ns(name, "bash", "-c", command).stdout.encode()

    def store_text(self):
        return "".join(p.read_text() for p in sorted((self.work / "data").glob("*.jsonl")))

    def kill_all(self):
        kill_all([self.server, *self.clients.values()])


class Fleet(Clients):
    """scenario.run_fleet's driver interface over topology.json's "fleet"."""

    def __init__(self, bin_dir, work, tls=False):
        self.layout = TOPOLOGY["fleet"]
        hosts = self.layout["hosts"]
        # The balancer passes TCP through, so TLS runs end to end: the sensors verify the
        # name they dial (the balancer's address) on whichever server answers.
        super().__init__(bin_dir, work, hosts["balancer"]["address"], tls)
        self.s3_url = f"http://{hosts['s3']['address']}:{TOPOLOGY['s3_port']}"
        self.servers = {}
        self.others = []

    def aws(self, *args):
        """The AWS CLI against the S3 stand-in, from the s3 host itself."""
        local = f"http://127.0.0.1:{TOPOLOGY['s3_port']}"
        return in_ns("s3", "env", *[f"{k}={v}" for k, v in AWS_ENV.items()],
                     "aws", "--endpoint-url", local, *args).stdout

    def start_s3(self):
        self.others.append(spawn(
            "s3", ["moto_server", "-H", "0.0.0.0", "-p", str(TOPOLOGY["s3_port"])],
            open(self.work / "s3.log", "w")))
        scenario.wait_for("the S3 stand-in", lambda: self.aws("s3api", "list-buckets") != "")
        self.aws("s3api", "create-bucket", "--bucket", self.layout["bucket"])

    def cut_s3(self):
        sh("ip", "-n", "router", "link", "set", "v-s3", "down")

    def restore_s3(self):
        sh("ip", "-n", "router", "link", "set", "v-s3", "up")

    def start_balancer(self):
        servers = "\n".join(
            f"    server {name} {self.layout['hosts'][name]['address']}:{SENSOR_PORT} check"
            for name in self.layout["servers"])
        config = self.work / "haproxy.cfg"
        config.write_text((HERE / "haproxy.cfg").read_text()
                          .replace("@SENSOR_PORT@", str(SENSOR_PORT))
                          .replace("@HTTP_PORT@", str(HTTP_PORT))
                          .replace("@SERVERS@", servers))
        haproxy = spawn("balancer", ["haproxy", "-db", "-f", str(config)],
                        open(self.work / "haproxy.log", "w"))
        self.others.append(haproxy)
        probe = f"exec 3<>/dev/tcp/127.0.0.1/{SENSOR_PORT}"
        scenario.wait_for("the balancer to listen", lambda: haproxy.poll() is None and in_ns(
            "balancer", "timeout", "2", "bash", "-c", probe, check=False).returncode == 0)
        assert haproxy.poll() is None, (self.work / "haproxy.log").read_text()

    def start_server(self, name):
        self.servers[name] = spawn(name, [
            str(self.bin / "sensor-server"), "--listen", f"0.0.0.0:{SENSOR_PORT}",
            "--http-listen", f"0.0.0.0:{HTTP_PORT}", "--data-dir", str(self.work / name),
            "--archive", f"s3://{self.layout['bucket']}/{self.layout['prefix']}",
            "--archive-endpoint", self.s3_url, "--host-id", name,
            "--segment-max-age", str(self.layout["segment_max_age"]),
            "--archive-stop-timeout", str(self.layout["archive_stop_timeout"]),
            *self.server_tls_args()],
            open(self.work / f"{name}.log", "a"), env=dict(os.environ, **AWS_ENV))

    def crash_server(self, name):
        self.servers[name].kill()
        self.servers[name].wait(timeout=10)

    def stop_server(self, name):
        stop(self.servers[name], name, 10 + self.layout["archive_stop_timeout"])

    def server_log(self, name):
        return (self.work / f"{name}.log").read_text()

    def http(self, name, path):
        return http_get(name, HTTP_PORT, path)

    def archive_sql(self, name):
        root = self.work / "archive"
        if not root.exists():
            self.aws("s3", "cp", "--recursive", "--only-show-errors",
                     f"s3://{self.layout['bucket']}/{self.layout['prefix']}", str(root))
        return archive_sql.query(archive_sql.connect(root), name)

    def stored_records(self, name):
        return [json.loads(line) for p in sorted((self.work / name).glob("*.jsonl"))
                for line in p.read_text().splitlines()]

    def kill_all(self):
        kill_all([*self.servers.values(), *self.clients.values(), *self.others])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin", type=Path, default=HERE.parent / "dist" / "x86_64")
    parser.add_argument("--fleet", action="store_true",
                        help="two servers behind HAProxy, archiving to a local S3")
    parser.add_argument("--tls", action="store_true",
                        help="TLS on every sensor port, a client certificate per sensor")
    args = parser.parse_args()

    if os.environ.get(SANDBOX_MARK) != "1":
        if os.geteuid() != 0:
            sys.exit("netns.py must run as root (it creates network namespaces)")
        env = dict(os.environ, **{SANDBOX_MARK: "1"})
        command = ["unshare", "--net", "--mount", "--", sys.executable, __file__,
                   "--bin", str(args.bin.resolve()), *(["--fleet"] if args.fleet else []),
                   *(["--tls"] if args.tls else [])]
        sys.exit(subprocess.run(command, env=env).returncode)

    # Inside the sandbox: a private /run/netns, so `ip netns add` stays in here.
    os.makedirs("/run/netns", exist_ok=True)
    sh("mount", "-t", "tmpfs", "sensorhub-netns", "/run/netns")
    signal.alarm(RUN_LIMIT_SECONDS)
    for tool in ("sensor-server", "sensor-client"):
        if not (args.bin / tool).exists():
            sys.exit(f"{args.bin / tool} missing: run scripts/build-static.sh first")
    for tool in (("haproxy", "moto_server", "aws") if args.fleet else ()):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not on PATH (haproxy: apt; the others: tests/requirements.txt)")

    name = "fleet" if args.fleet else "topology"
    with tempfile.TemporaryDirectory(prefix=f"sensorhub-netns-{name}-") as work:
        driver = (Fleet if args.fleet else Namespaces)(args.bin, Path(work), args.tls)
        run = scenario.run_fleet if args.fleet else scenario.run
        try:
            build_topology(TOPOLOGY[name])
            verdict = run(driver, log=lambda line: print(line, flush=True))
        except BaseException:
            for f in sorted(Path(work).glob("*.log")):
                print(f"--- {f.name}\n{f.read_text()[-3000:]}", file=sys.stderr)
            raise
        finally:
            driver.kill_all()
    print(f"netns {name}{' with TLS' if args.tls else ''}: passed")
    for line in verdict:
        print("  " + line)


if __name__ == "__main__":
    main()
