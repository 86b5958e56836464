#!/usr/bin/env python3
"""The topology scenario (scenario.py) on four qemu VMs with a bare Debian kernel.

Each VM boots Debian's kernel with an initramfs holding only busybox-static, the
virtio/bridge kernel modules and the two static sensorhub binaries: proof that the
binaries need nothing from a distribution. TCG only (no KVM needed).

    router  eth0 on the server subnet; eth1 + eth2 bridged as br0 on the client subnet;
            forwarding on
    server  eth0, route to the client subnet via the router
    client1, client2  eth0, routes to the server subnet via the router
    (addresses from topology.json, the same as every other driver's)

Every link is a point-to-point `-netdev dgram` pair of UDP sockets on 127.0.0.1; the
guests' addresses exist only inside the guests. The host drives each guest through a
shell on a virtio console (a unix socket), cuts links with the qemu monitor's
`set_link`, and never sends traffic to a guest address.

    nixos-tests/qemu.py [--bin DIR] [--cache DIR] [--tls]
      DIR: sensor-server and sensor-client (default dist/x86_64, scripts/build-static.sh)
      --tls: the sensor port requires a client certificate per sensor (sensor-server
             certs, run here; the files travel in the initramfs under /pki)
      cache: where the kernel package is unpacked (default ~/.cache/sensorhub-qemu)
"""

import argparse
import base64
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import scenario  # noqa: E402

KERNEL_PACKAGE = "linux-image-amd64"  # Debian's metapackage; its dependency is the kernel
MODULES = ["virtio_pci", "virtio_net", "virtio_console", "bridge"]  # with dependencies from modules.dep
LAYOUT = scenario.TOPOLOGY["topology"]
SERVER = LAYOUT["hosts"]["server"]["address"]
SENSORS = {name: (s["sensor"], s["kind"]) for name, s in scenario.TOPOLOGY["sensors"].items()}
INTERVAL_MS = scenario.TOPOLOGY["interval_ms"]
BOOT_SECONDS = 120
RUN_LIMIT_SECONDS = 600

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod "/modules/$m"; done
role=$(sed -n 's/.*sensorhub.role=\([a-z0-9]*\).*/\1/p' /proc/cmdline)
hostname "$role"
ip link set lo up
up() { ip addr add "$2" dev "$1"; ip link set "$1" up; }
case $role in
  router)
    up eth0 @ROUTER_SERVER_SIDE@/24
    brctl addbr br0; brctl addif br0 eth1; brctl addif br0 eth2
    ip link set eth1 up; ip link set eth2 up
    up br0 @ROUTER_CLIENT_SIDE@/24
    echo 1 > /proc/sys/net/ipv4/ip_forward ;;
  server)
    up eth0 @SERVER@/24; ip route add @CLIENT_SUBNET@ via @ROUTER_SERVER_SIDE@ ;;
  client1)
    up eth0 @CLIENT1@/24; ip route add @SERVER_SUBNET@ via @ROUTER_CLIENT_SIDE@ ;;
  client2)
    up eth0 @CLIENT2@/24; ip route add @SERVER_SUBNET@ via @ROUTER_CLIENT_SIDE@ ;;
esac
mkdir -p /data /tmp
for _ in $(seq 100); do [ -e /dev/hvc0 ] && break; sleep 0.1; done
echo "sensorhub-ready $role"
# The console stays open from stty on: hvc resets its settings on the last close.
# Through a pipe the shell is non-interactive: no prompt, no line editing.
exec sh -c 'exec 3<>/dev/hvc0; stty raw -echo <&3; cat <&3 | sh >&3 2>&3'
"""
for token, value in {
    "@ROUTER_SERVER_SIDE@": LAYOUT["router"]["server_side"],
    "@ROUTER_CLIENT_SIDE@": LAYOUT["router"]["client_side"],
    "@SERVER@": SERVER,
    "@CLIENT1@": LAYOUT["hosts"]["client1"]["address"],
    "@CLIENT2@": LAYOUT["hosts"]["client2"]["address"],
    "@SERVER_SUBNET@": scenario.TOPOLOGY["server_subnet"],
    "@CLIENT_SUBNET@": scenario.TOPOLOGY["client_subnet"],
}.items():
    INIT = INIT.replace(token, value)


def sh(*args, **kwargs):
    return subprocess.run(args, check=True, text=True, capture_output=True, **kwargs)


def fetch_kernel(cache):
    """Debian's kernel and its modules, unpacked once into `cache`."""
    root = cache / "root"
    if not list(root.glob("boot/vmlinuz-*")):
        cache.mkdir(parents=True, exist_ok=True)
        depends = sh("apt-cache", "depends", KERNEL_PACKAGE).stdout
        package = re.search(r"Depends: (linux-image-\S+)", depends).group(1)
        sh("apt-get", "download", package, cwd=cache)
        deb = next(cache.glob(f"{package}_*.deb"))
        shutil.rmtree(root, ignore_errors=True)
        sh("dpkg-deb", "-x", str(deb), str(root))
        deb.unlink()
    vmlinuz = next(root.glob("boot/vmlinuz-*"))
    modules = next(root.glob("lib/modules/*"))
    return vmlinuz, modules


def module_order(modules_dir):
    """The .ko files for MODULES, dependencies first. The package ships no modules.dep
    (depmod makes it at install), so dependencies come from each module's own
    `.modinfo` strings (`depends=a,b`)."""
    files = {}
    for ko in modules_dir.rglob("*.ko"):
        files[ko.stem.replace("-", "_")] = ko
    order = []

    def visit(name):
        ko = files[name]
        found = re.search(rb"(?:^|\0)depends=([^\0]*)\0", ko.read_bytes())
        for need in filter(None, (found.group(1).decode().split(",") if found else [])):
            visit(need.replace("-", "_"))
        if ko not in order:
            order.append(ko)

    for name in MODULES:
        visit(name)
    return order


def cpio_newc(entries):
    """An initramfs archive (newc cpio) from (name, mode, data) entries."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate(entries + [("TRAILER!!!", 0, b"")], 1):
        encoded = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + encoded
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def build_initramfs(work, bin_dir, modules_dir, pki=None):
    order = module_order(modules_dir)
    entries = [(d, 0o40755, b"") for d in ("bin", "proc", "sys", "dev", "modules")]
    if pki is not None:
        entries.append(("pki", 0o40700, b""))
        entries += [(f"pki/{f.name}", 0o100600, f.read_bytes()) for f in sorted(pki.iterdir())]
    entries.append(("bin/busybox", 0o100755, Path(shutil.which("busybox")).read_bytes()))
    for tool in ("sensor-server", "sensor-client"):
        entries.append((f"bin/{tool}", 0o100755, (bin_dir / tool).read_bytes()))
    for ko in order:
        entries.append((f"modules/{ko.name}", 0o100644, ko.read_bytes()))
    entries.append(("modules.order", 0o100644, "\n".join(ko.name for ko in order).encode()))
    entries.append(("init", 0o100755, INIT.encode()))
    initrd = work / "initrd.cpio"
    initrd.write_bytes(cpio_newc(entries))
    return initrd


def free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Vm:
    """One guest: its qemu process, a shell on /dev/hvc0 and the monitor."""

    def __init__(self, number, role, work, kernel, initrd, links):
        self.role = role
        self.work = work
        self.console = work / f"{role}.console"
        self.control = work / f"{role}.ctl"
        self.monitor = work / f"{role}.mon"
        command = [
            "qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-smp", "1",
            "-display", "none", "-no-reboot", "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", f"console=ttyS0 quiet panic=-1 sensorhub.role={role}",
            "-serial", f"file:{self.console}",
            # The control shell rides a virtio console, as the NixOS test driver's does.
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=ctl,path={self.control},server=on,wait=off",
            "-device", "virtconsole,chardev=ctl",
            "-monitor", f"unix:{self.monitor},server=on,wait=off",
        ]
        for i, (local, remote) in enumerate(links):
            command += [
                "-netdev", f"dgram,id=n{i},local.type=inet,local.host=127.0.0.1,"
                           f"local.port={local},remote.type=inet,remote.host=127.0.0.1,"
                           f"remote.port={remote}",
                # Unique per guest and link: two hosts on one bridge with one MAC make
                # the bridge send one host's frames to the other (the "stall" of
                # earlier runs: client1 and client2 once shared 52:54:00:00:07:00).
                "-device", f"virtio-net-pci,netdev=n{i},mac=52:54:00:00:{number:02x}:{i:02x}",
            ]
        self.links = len(links)
        self.number = number
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                         stderr=open(work / f"{role}.qemu.log", "w"))
        self.shell = None
        self.buffer = b""

    def macs(self):
        return [f"52:54:00:00:{self.number:02x}:{i:02x}" for i in range(self.links)]

    def wait_ready(self):
        scenario.wait_for(f"{self.role} to boot",
                          lambda: "sensorhub-ready" in self.console.read_text(errors="replace"),
                          timeout=BOOT_SECONDS)
        self.shell = socket.socket(socket.AF_UNIX)
        self.shell.connect(str(self.control))
        # The shell starts just after the ready line; a command sent before it reads
        # the console may be lost, so probe until one round trip works.
        for _ in range(30):
            try:
                self.run("true", timeout=2)
                return
            except (AssertionError, OSError):
                self.buffer = b""
        raise AssertionError(f"{self.role}: no shell on the console")

    def run(self, command, timeout=30, check=True):
        """Runs `command` in the guest's shell; returns its output."""
        token = os.urandom(6).hex()
        # A child shell per command: its exit flushes every builtin's buffered output
        # (busybox ash holds it back when a line forks a background job), and base64
        # spares all quoting.
        script = f"echo @@{token}\n{command}\necho @@{token}:$?\n"
        encoded = base64.b64encode(script.encode()).decode()
        self.shell.sendall(f"echo {encoded} | base64 -d | sh\n".encode())
        deadline = time.monotonic() + timeout
        end = re.compile(rb"@@" + token.encode() + rb":(\d+)\n")
        while not end.search(self.buffer):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{self.role}: {command!r} did not finish in {timeout}s")
            # hvc pushes guest output lazily (its poller backs off to seconds) but at
            # once when input arrives: an empty line, a no-op for the shell, wakes it.
            self.shell.settimeout(min(remaining, 0.2))
            try:
                chunk = self.shell.recv(65536)
            except TimeoutError:
                self.shell.sendall(b"\n")
                continue
            if not chunk:
                raise AssertionError(f"{self.role}: shell closed")
            self.buffer += chunk
        match = end.search(self.buffer)
        start = self.buffer.index(f"@@{token}\n".encode()) + len(token) + 3
        output, status = self.buffer[start:match.start()], int(match.group(1))
        self.buffer = self.buffer[match.end():]
        if check and status != 0:
            raise AssertionError(f"{self.role}: {command!r} exited {status}: {output!r}")
        return output.decode(errors="replace")

    def monitor_command(self, command):
        with socket.socket(socket.AF_UNIX) as m:
            m.connect(str(self.monitor))
            m.sendall(command.encode() + b"\n")
            time.sleep(0.2)  # let the monitor act before the socket closes

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def background(name, command):
    """Starts `command` detached; /NAME.pid holds its pid, /NAME.status its exit
    status once it has exited."""
    return (f"rm -f /{name}.status; "
            f"( {command} & echo $! > /{name}.pid; wait $!; echo $? > /{name}.status ) &"
            f" while [ ! -s /{name}.pid ]; do sleep 0.05; done")


def wait_exit(name):
    """Prints the exit status of a `background` command once it has exited."""
    return f"while [ ! -s /{name}.status ]; do sleep 0.1; done; cat /{name}.status"


class Vms:
    """The scenario's driver interface (see scenario.py) over the qemu guests."""

    interval_ms = INTERVAL_MS

    def __init__(self, vms, tls=False):
        self.vms = vms
        self.tls = tls
        self.diagnostics = []

    def tls_flags(self, args):
        """The flags for a guest's command line (the files are under /pki), or none."""
        return "".join(f" {a}" for a in args) if self.tls else ""

    def http(self, path):
        return self.vms["server"].run(f"wget -qO- http://127.0.0.1:9000{path}", timeout=20)

    def start_server(self):
        self.vms["server"].run(background(
            "server", "sensor-server --listen 0.0.0.0:5000 --http-listen 127.0.0.1:9000"
            f" --data-dir /data{self.tls_flags(scenario.server_tls_args('/pki'))} >>/server.log 2>&1"))

    def crash_server(self):
        self.vms["server"].run("kill -9 $(cat /server.pid)")
        self.vms["server"].run(wait_exit("server"), timeout=30)

    def stop_server(self):
        self.vms["server"].run("kill -TERM $(cat /server.pid)")
        status = self.vms["server"].run(wait_exit("server"), timeout=30).strip()
        assert status == "0", f"server exited {status} on SIGTERM"

    def start_client(self, name):
        sensor, kind = SENSORS[name]
        self.vms[name].run(background(
            "client", f"sensor-client --server {SERVER}:5000 --sensor {sensor} --kind {kind}"
            f" --interval-ms {INTERVAL_MS} --record /answers"
            f"{self.tls_flags(scenario.client_tls_args('/pki', sensor))} >/client.out 2>/client.log"))

    def stop_client(self, name):
        # Socket queues just before the stop: if a connection has stalled, Recv-Q and
        # Send-Q say which side holds the bytes. Printed only if the run fails.
        for role in ("server", name):
            self.diagnostics.append(
                f"netstat on {role} before stopping {name}:\n"
                + self.vms[role].run("netstat -tn | grep ':5000 '; true", timeout=20))
        self.vms[name].run("kill -TERM $(cat /client.pid)")
        status = self.vms[name].run(wait_exit("client"), timeout=40).strip()
        assert status == "0", f"{name} exited {status}"

    def cut(self, name):
        self.vms[name].monitor_command("set_link n0 off")

    def restore(self, name):
        self.vms[name].monitor_command("set_link n0 on")

    def exchange(self, name, data, timeout):
        vm = self.vms[name]
        vm.run("rm -f /tmp/payload.b64")
        encoded = base64.b64encode(data).decode()
        for i in range(0, len(encoded), 2048):
            vm.run(f"printf %s {encoded[i:i + 2048]} >> /tmp/payload.b64")
        return vm.run(f"base64 -d /tmp/payload.b64 | timeout {timeout} nc {SERVER} 5000 || true",
                      timeout=timeout + 20).encode()

    def store_text(self):
        return self.vms["server"].run("cat /data/*.jsonl", timeout=60)

    def answers(self, name):
        return self.vms[name].run("cat /answers", timeout=60)

    def summary(self, name):
        return self.vms[name].run("grep '^sent' /client.out | tail -n 1").strip()

    def sensor(self, name):
        return SENSORS[name][0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin", type=Path, default=HERE.parent / "dist" / "x86_64")
    parser.add_argument("--cache", type=Path,
                        default=Path.home() / ".cache" / "sensorhub-qemu")
    parser.add_argument("--tls", action="store_true",
                        help="TLS on the sensor port, a client certificate per sensor")
    args = parser.parse_args()
    signal.alarm(RUN_LIMIT_SECONDS)
    started = time.monotonic()
    kernel, modules = fetch_kernel(args.cache)
    with tempfile.TemporaryDirectory(prefix="sensorhub-qemu-") as tmp:
        work = Path(tmp)
        pki = None
        if args.tls:
            pki = work / "pki"
            scenario.make_pki(args.bin, pki, SERVER)
        initrd = build_initramfs(work, args.bin, modules, pki)
        print(f"initramfs {initrd.stat().st_size // 1024} KiB, kernel {kernel.name}", flush=True)
        # One UDP port pair per point-to-point link; the router has three.
        pairs = {host: (free_udp_port(), free_udp_port()) for host in ("server", "client1", "client2")}
        links = {
            "router": [pairs[h] for h in ("server", "client1", "client2")],
            **{h: [(pairs[h][1], pairs[h][0])] for h in pairs},
        }
        vms = {role: Vm(number, role, work, kernel, initrd, links[role])
               for number, role in enumerate(links, start=1)}
        macs = [line for vm in vms.values() for line in vm.macs()]
        assert len(macs) == len(set(macs)), f"duplicate MAC addresses: {macs}"
        try:
            for vm in vms.values():
                vm.wait_ready()
            print(f"4 VMs booted in {time.monotonic() - started:.1f}s", flush=True)
            scenario.wait_for("client1 to reach the server through the router",
                              lambda: vms["client1"].run(f"ping -c 1 -W 2 {SERVER}", timeout=10) is not None)
            driver = Vms(vms, args.tls)
            verdict = scenario.run(driver, log=lambda line: print(line, flush=True))
        except BaseException:
            for text in getattr(locals().get("driver"), "diagnostics", []):
                print(f"--- {text}", file=sys.stderr)
            for f in sorted(glob.glob(str(work / "*.console"))):
                print(f"--- {f}\n{Path(f).read_text(errors='replace')[-2000:]}", file=sys.stderr)
            for role, vm in vms.items():
                try:
                    logs = vm.run("tail -n 20 /*.log /client.out 2>/dev/null; netstat -tn;"
                                  " wget -qO- http://127.0.0.1:9000/metrics 2>/dev/null"
                                  " | grep -v '^#' | grep -v _bucket || true", timeout=10)
                    print(f"--- {role} logs\n{logs}", file=sys.stderr)
                except Exception:  # the guest may be what failed
                    pass
            raise
        finally:
            for vm in vms.values():
                vm.stop()
    print(f"qemu topology{' with TLS' if args.tls else ''}: passed in {time.monotonic() - started:.0f}s")
    for line in verdict:
        print("  " + line)


if __name__ == "__main__":
    main()
