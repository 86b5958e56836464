#!/usr/bin/env python3
"""The topology scenario (scenario.py) on Linux network namespaces, as root.

Namespaces `router`, `server`, `client1`, `client2`; in `router`, bridge br1 is the
server subnet (192.168.1.0/24) and br2 the client subnet (192.168.2.0/24), with
forwarding on; each host hangs off its bridge by a veth pair. The addresses match the
NixOS test (server 192.168.1.4, router .1.3 / .2.3, clients 192.168.2.1 and .2.2).

Safety: the whole run happens inside `unshare --net --mount` with a private tmpfs on
/run/netns, so its namespaces are invisible to the host and this process itself sits in
an empty network namespace: nothing can route off the machine. Every server, client
and probe runs with `ip netns exec`. Every wait is bounded, and an alarm ends the run.

    sudo nixos-tests/netns.py [--bin DIR]   (DIR holds sensor-server and sensor-client;
                                             default dist/x86_64 from build-static.sh)
"""

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import scenario  # noqa: E402

SANDBOX_MARK = "SENSORHUB_NETNS_SANDBOX"
SERVER = "192.168.1.4"
HOSTS = {  # namespace: (bridge, address, gateway, other subnet)
    "server": ("br1", "192.168.1.4/24", "192.168.1.3", "192.168.2.0/24"),
    "client1": ("br2", "192.168.2.1/24", "192.168.2.3", "192.168.1.0/24"),
    "client2": ("br2", "192.168.2.2/24", "192.168.2.3", "192.168.1.0/24"),
}
SENSORS = {"client1": ("client1-temperature", "temperature"),
           "client2": ("client2-humidity", "humidity")}
INTERVAL_MS = 100
RUN_LIMIT_SECONDS = 420


def sh(*args, check=True, **kwargs):
    return subprocess.run(args, check=check, text=True, capture_output=True, **kwargs)


def in_ns(ns, *args, **kwargs):
    return sh("ip", "netns", "exec", ns, *args, **kwargs)


def build_topology():
    for ns in ("router", *HOSTS):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    for bridge, address in (("br1", "192.168.1.3/24"), ("br2", "192.168.2.3/24")):
        sh("ip", "-n", "router", "link", "add", bridge, "type", "bridge")
        sh("ip", "-n", "router", "addr", "add", address, "dev", bridge)
        sh("ip", "-n", "router", "link", "set", bridge, "up")
    in_ns("router", "sysctl", "-qw", "net.ipv4.ip_forward=1")
    for ns, (bridge, address, gateway, other) in HOSTS.items():
        peer = f"v-{ns}"
        sh("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", peer,
           "netns", "router")
        sh("ip", "-n", "router", "link", "set", peer, "master", bridge, "up")
        sh("ip", "-n", ns, "addr", "add", address, "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "route", "add", other, "via", gateway)


class Namespaces:
    """The scenario's driver interface (see scenario.py) over the namespaces."""

    interval_ms = INTERVAL_MS

    def __init__(self, bin_dir, work):
        self.bin = bin_dir
        self.work = work
        self.server = None
        self.clients = {}

    def http(self, path):
        request = f"exec 3<>/dev/tcp/127.0.0.1/9000; printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3"
        # Bytes: text mode would turn the header's CRLFs into LFs.
        response = subprocess.run(
            ["ip", "netns", "exec", "server", "timeout", "5", "bash", "-c", request],
            check=True, capture_output=True).stdout
        return response.split(b"\r\n\r\n", 1)[1].decode()

    def start_server(self):
        log = open(self.work / "server.log", "a")
        self.server = subprocess.Popen(
            ["ip", "netns", "exec", "server", str(self.bin / "sensor-server"),
             "--listen", "0.0.0.0:5000", "--http-listen", "127.0.0.1:9000",
             "--data-dir", str(self.work / "data")],
            stdout=log, stderr=log)

    def crash_server(self):
        self.server.kill()
        self.server.wait(timeout=10)

    def stop_server(self):
        self.server.send_signal(signal.SIGTERM)
        status = self.server.wait(timeout=15)
        assert status == 0, f"server exited {status} on SIGTERM"

    def start_client(self, name):
        sensor, kind = SENSORS[name]
        out = open(self.work / f"{name}.out", "w")
        err = open(self.work / f"{name}.log", "w")
        self.clients[name] = subprocess.Popen(
            ["ip", "netns", "exec", name, str(self.bin / "sensor-client"),
             "--server", f"{SERVER}:5000", "--sensor", sensor, "--kind", kind,
             "--interval-ms", str(INTERVAL_MS), "--record", str(self.work / f"{name}.answers")],
            stdout=out, stderr=err)

    def stop_client(self, name):
        self.clients[name].send_signal(signal.SIGTERM)
        status = self.clients[name].wait(timeout=30)
        assert status == 0, f"{name} exited {status}: {(self.work / f'{name}.log').read_text()}"

    def cut(self, name):
        # On the router's side, so the client keeps its address and routes.
        sh("ip", "-n", "router", "link", "set", f"v-{name}", "down")

    def restore(self, name):
        sh("ip", "-n", "router", "link", "set", f"v-{name}", "up")

    def exchange(self, name, data, timeout):
        command = scenario.exchange_command(SERVER, 5000, data, timeout)
        return in_ns(name, "bash", "-c", command).stdout.encode()

    def store_text(self):
        return "".join(p.read_text() for p in sorted((self.work / "data").glob("*.jsonl")))

    def answers(self, name):
        return (self.work / f"{name}.answers").read_text()

    def summary(self, name):
        lines = (self.work / f"{name}.out").read_text().splitlines()
        return next(line for line in reversed(lines) if line.startswith("sent "))

    def sensor(self, name):
        return SENSORS[name][0]

    def kill_all(self):
        for proc in [self.server, *self.clients.values()]:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin", type=Path, default=HERE.parent / "dist" / "x86_64")
    args = parser.parse_args()

    if os.environ.get(SANDBOX_MARK) != "1":
        if os.geteuid() != 0:
            sys.exit("netns.py must run as root (it creates network namespaces)")
        env = dict(os.environ, **{SANDBOX_MARK: "1"})
        command = ["unshare", "--net", "--mount", "--", sys.executable, __file__,
                   "--bin", str(args.bin.resolve())]
        sys.exit(subprocess.run(command, env=env).returncode)

    # Inside the sandbox: a private /run/netns, so `ip netns add` stays in here.
    os.makedirs("/run/netns", exist_ok=True)
    sh("mount", "-t", "tmpfs", "sensorhub-netns", "/run/netns")
    signal.alarm(RUN_LIMIT_SECONDS)
    for tool in ("sensor-server", "sensor-client"):
        if not (args.bin / tool).exists():
            sys.exit(f"{args.bin / tool} missing: run scripts/build-static.sh first")

    with tempfile.TemporaryDirectory(prefix="sensorhub-netns-") as work:
        driver = Namespaces(args.bin, Path(work))
        try:
            build_topology()
            verdict = scenario.run(driver, log=lambda line: print(line, flush=True))
        except BaseException:
            for f in sorted(Path(work).glob("*.log")):
                print(f"--- {f.name}\n{f.read_text()[-3000:]}", file=sys.stderr)
            raise
        finally:
            driver.kill_all()
    print("netns topology: passed")
    for line in verdict:
        print("  " + line)


if __name__ == "__main__":
    main()
