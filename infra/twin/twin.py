#!/usr/bin/env python3
"""The EC2 twin: the stack's own UserData booted under real systemd, with the AWS side
played locally (infra/twin/README.md says what is real and what is a stand-in).

    infra/twin/twin.py [--bin dist/x86_64] [--cache DIR] [--registration-delay 30]
                       [--steps all|boot]

`deploy.sh` deploys the stack to a local AWS (moto with the stand-ins of local_aws.py)
and uploads the binaries there; each instance is a qemu VM of a Debian bookworm image
(systemd 252, as AL2023) that fetches its user data from its own IMDSv2 and runs it
once, as cloud-init would. HAProxy on the host is the balancer: it health-checks
/healthz as the target group does and routes to a server only after the registration
delay. The twin plays EC2 and Auto Scaling: it launches instances from the stack's
launch templates, hot-plugs a data volume into the instance moto says it is attached
to, flips IMDS's autoscaling/target-lifecycle-state on scale-in, and terminates.

Scenario (one printed step each): boot two servers (AZ a and b) and a sensor; every
bootstrap finishes, no unit failed, each signal came after the balancer saw its target
healthy; the archive ships from the hardened unit; scale-in of server-a drains and
completes its lifecycle action; server-b is lost (kill -9 of its VM) under load, a
replacement boots in AZ b, serves, and adopts the orphaned volume; verdict: every
acknowledged reading is in the archive once (DuckDB), no failed unit in any journal.
`--steps boot` stops after the boot checks (used to show a broken bootstrap).

Runs as root in its own network and mount namespace (re-executes itself under
`unshare --net --mount`): every address it uses is 127.0.0.1 there, or a guest's.
"""

import argparse
import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "nixos-tests"))
sys.path.insert(0, str(REPO / "infra" / "athena"))
import local_aws  # noqa: E402
import qemu  # noqa: E402  (the console shell of the topology's VMs)

REGION = "us-east-1"
STACK = "twin"
ARTIFACTS = "twin-artifacts"
AWS_PORT = 4566
NLB_PORT = 5000
GATEWAY = "10.0.2.2"  # the host's loopback, seen from a guest on qemu's user network
BOOT_LIMIT = 600      # boot to signal, per instance (TCG is slow)
ADOPTION_INTERVAL = 20
ADOPTION_ARGS = ["--adoption-interval", str(ADOPTION_INTERVAL)]


def log(message):
    print(f"[twin {time.strftime('%H:%M:%S')}] {message}", flush=True)


def wait_for(what, predicate, timeout, interval=0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the balancer ----------------------------------------------------------------------

class Balancer:
    """HAProxy as the NLB: TCP on :5000, health checks of /healthz on 9000 (every 2 s,
    2 to rise or fall; the target group's are 10 s), a target routed to only once the
    twin registers it."""

    SLOTS = 4

    def __init__(self, work):
        self.work = work
        self.socket = work / "haproxy.sock"
        self.ports = [(free_port(), free_port()) for _ in range(self.SLOTS)]
        self.slot_of = {}    # instance id -> slot
        self.registered = {}  # instance id -> time of registration
        self.first_healthy = {}  # instance id -> time haproxy first said UP
        servers = "\n".join(
            f"    server s{n} 127.0.0.1:{p} check port {h} inter 2s rise 2 fall 2 disabled"
            for n, (p, h) in enumerate(self.ports))
        config = work / "haproxy.cfg"
        config.write_text(f"""global
    stats socket {self.socket} level admin
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend sensors
    bind 127.0.0.1:{NLB_PORT}
    default_backend servers
backend servers
    balance source
    option httpchk GET /healthz
    http-check expect string ok
{servers}
""")
        self.process = subprocess.Popen(["haproxy", "-f", str(config)],
                                        stdout=open(work / "haproxy.log", "w"),
                                        stderr=subprocess.STDOUT)
        wait_for("haproxy's stats socket", self.socket.exists, 20)
        self.stop_watch = threading.Event()
        threading.Thread(target=self.watch, daemon=True).start()

    def command(self, line):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.socket))
            s.sendall(line.encode() + b"\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        return out.decode()

    def states(self):
        """slot -> status (UP, DOWN, MAINT, ...) from `show stat`."""
        lines = self.command("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        result = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(",")))
            if row.get("pxname") == "servers" and row.get("svname", "").startswith("s"):
                result[int(row["svname"][1:])] = row["status"]
        return result

    def watch(self):
        while not self.stop_watch.wait(0.5):
            try:
                states = self.states()
            except OSError:
                continue
            for instance, slot in list(self.slot_of.items()):
                if states.get(slot) == "UP" and instance not in self.first_healthy:
                    self.first_healthy[instance] = time.monotonic()

    def assign(self, instance):
        slot = len(self.slot_of)
        self.slot_of[instance] = slot
        return self.ports[slot]

    def register(self, instance):
        self.command(f"set server servers/s{self.slot_of[instance]} state ready")
        self.registered[instance] = time.monotonic()

    def deregister(self, instance):
        self.command(f"set server servers/s{self.slot_of[instance]} state maint")
        self.registered.pop(instance, None)

    def target_health(self, instance):
        """What DescribeTargetHealth says of `instance` (None: not one of ours)."""
        if instance not in self.slot_of:
            return None
        if instance not in self.registered:
            return ("unused", "Target.NotRegistered")
        state = self.states().get(self.slot_of[instance])
        if state == "UP":
            return ("healthy", None)
        if instance in self.first_healthy:
            return ("unhealthy", "Target.FailedHealthChecks")
        return ("initial", "Elb.InitialHealthChecking")

    def stop(self):
        self.stop_watch.set()
        self.process.terminate()
        self.process.wait(timeout=10)


# --- instances -----------------------------------------------------------------------------

def nvme_disk(volume, disk):
    """(device id, -drive spec, -device spec) of an EBS volume as Nitro shows it: an
    NVMe disk whose serial is the volume id without its dash."""
    serial = volume.replace("-", "")
    device = "d" + serial
    return (device, f"if=none,id={device},file={disk},format=raw",
            f"nvme,drive={device},serial={serial},id={device}")


class Instance(qemu.Vm):
    """One EC2 instance: a qemu VM of the twin image with its own IMDS, its data
    volumes as NVMe disks whose serial is the volume id."""

    def __init__(self, twin, name, instance_id, az, user_data, tags, ports, volumes):
        self.twin = twin
        self.role = name
        self.instance_id = instance_id
        self.az = az
        self.work = twin.work / name
        self.work.mkdir()
        self.metadata = local_aws.Instance(instance_id, az, user_data, tags)
        self.imds = local_aws.Imds(self.metadata)
        self.console = self.work / "console.log"
        self.control = self.work / "shell.sock"
        self.monitor = self.work / "monitor.sock"
        self.plugged = {}  # volume id -> qemu device id
        self.launched = time.monotonic()
        self.launched_wall = time.time()
        forwards = ""
        if ports:
            forwards = (f",hostfwd=tcp:127.0.0.1:{ports[0]}-:5000"
                        f",hostfwd=tcp:127.0.0.1:{ports[1]}-:9000")
        cmdline = (f"root=/dev/vda rw console=ttyS0 quiet panic=-1 systemd.hostname={name} "
                   f"twin.imds={GATEWAY}:{self.imds.port} "
                   f"twin.aws=http://{GATEWAY}:{AWS_PORT} "
                   f"twin.hosts={twin.balancer_name}={GATEWAY}")
        command = [
            "qemu-system-x86_64", "-accel", twin.accel, "-m", "1024", "-smp", "1",
            "-display", "none", "-no-reboot",
            "-kernel", str(twin.cache / "vmlinuz"), "-initrd", str(twin.cache / "initrd.img"),
            "-append", cmdline,
            # The shared image stays as built: each instance writes to its own
            # temporary overlay (snapshot=on), gone with the instance, as a root volume
            # with DeleteOnTermination.
            "-drive", f"file={twin.cache / 'rootfs.raw'},if=virtio,format=raw,snapshot=on",
            "-netdev", f"user,id=n0{forwards}", "-device", "virtio-net-pci,netdev=n0",
            "-serial", f"file:{self.console}",
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=ctl,path={self.control},server=on,wait=off",
            "-device", "virtconsole,chardev=ctl",
            "-monitor", f"unix:{self.monitor},server=on,wait=off",
        ]
        for volume in volumes:  # attached at launch: there at boot, as on Nitro
            device, drive, nvme = nvme_disk(volume, twin.volume_disk(volume))
            command += ["-drive", drive, "-device", nvme]
            self.plugged[volume] = device
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                         stderr=open(self.work / "qemu.log", "w"))
        self.shell = None
        self.buffer = b""

    def wait_shell(self):
        def connected():
            try:
                self.shell = socket.socket(socket.AF_UNIX)
                self.shell.connect(str(self.control))
                self.buffer = b""
                self.run("true", timeout=3)
                return True
            except (AssertionError, OSError):
                self.shell.close()
                return False
        wait_for(f"{self.role}'s shell", connected, BOOT_LIMIT, interval=1)

    def plug(self, volume, disk):
        device, drive, nvme = nvme_disk(volume, disk)
        self.monitor_command(f"drive_add 0 {drive}")
        self.monitor_command(f"device_add {nvme}")
        self.plugged[volume] = device

    def unplug(self, volume):
        device = self.plugged.pop(volume)
        self.monitor_command(f"device_del {device}")

    def alive(self):
        return self.process.poll() is None

    def stop(self):
        super().stop()
        self.imds.stop()


class Twin:
    def __init__(self, args, work):
        self.args = args
        self.work = work
        self.cache = args.cache
        self.accel = args.accel
        self.instances = {}
        self.disks = work / "volumes"
        self.disks.mkdir()
        self.aws = local_aws.Aws(AWS_PORT)
        self.env = self.aws.env(os.environ, REGION)
        import boto3
        self.ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=self.aws.endpoint,
                                aws_access_key_id="testing", aws_secret_access_key="testing")
        self.s3 = boto3.client("s3", region_name=REGION, endpoint_url=self.aws.endpoint,
                               aws_access_key_id="testing", aws_secret_access_key="testing")
        self.balancer = None
        self.stop_ebs = threading.Event()

    def aws_cli(self, *args):
        result = subprocess.run(["aws", *args], env=self.env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, f"aws {' '.join(args)}: {result.stderr}"
        return result.stdout

    # --- deploy --------------------------------------------------------------------------

    def deploy(self, *extra):
        if not extra:
            self.aws_cli("s3", "mb", f"s3://{ARTIFACTS}")
        result = subprocess.run(
            [str(REPO / "infra/deploy.sh"), "--bucket", ARTIFACTS, "--stack", STACK,
             "--region", REGION, "--dist", str(self.args.bin), "--tls-dir", str(self.work / "tls"),
             *ADOPTION_ARGS, *extra],
            env=self.env, capture_output=True, text=True, timeout=900, cwd=REPO)
        assert result.returncode == 0, result.stdout + result.stderr
        if extra:
            return result.stdout  # an update: the stack's resources stay as they were
        resources = json.loads(self.aws_cli(
            "cloudformation", "describe-stack-resources", "--stack-name", STACK,
            "--output", "json"))["StackResources"]
        self.resources = {r["LogicalResourceId"]: r["PhysicalResourceId"] for r in resources
                          if "LogicalResourceId" in r}
        balancer = json.loads(self.aws_cli("elbv2", "describe-load-balancers", "--output", "json"))
        self.balancer_name = balancer["LoadBalancers"][0]["DNSName"]
        subnets = self.ec2.describe_subnets(SubnetIds=[
            self.resources["ServerSubnetA"], self.resources["ServerSubnetB"],
            self.resources["ClientSubnetA"]])["Subnets"]
        self.subnet_az = {s["SubnetId"]: s["AvailabilityZone"] for s in subnets}
        # moto puts both server subnets in one AZ: the twin gives each its own, as
        # !GetAZs does in AWS.
        self.subnet_az[self.resources["ServerSubnetB"]] = REGION + "b"
        return result.stdout

    def user_data(self, template):
        version = self.ec2.describe_launch_template_versions(
            LaunchTemplateId=self.resources[template], Versions=["$Latest"])
        data = version["LaunchTemplateVersions"][0]["LaunchTemplateData"]
        return base64.b64decode(data["UserData"]), data

    def launch(self, name, template, subnet, tags=None):
        """Runs an instance from a launch template as Auto Scaling would: in moto, with
        the template's volume tags on its volumes, and as a VM."""
        user_data, data = self.user_data(template)
        az = self.subnet_az[self.resources[subnet]]
        reservation = self.ec2.run_instances(
            LaunchTemplate={"LaunchTemplateId": self.resources[template], "Version": "$Latest"},
            MinCount=1, MaxCount=1, Placement={"AvailabilityZone": az})
        instance_id = reservation["Instances"][0]["InstanceId"]
        volume_tags = [t for spec in data.get("TagSpecifications", [])
                       if spec["ResourceType"] == "volume" for t in spec["Tags"]]
        volumes = self.ec2.describe_volumes(Filters=[
            {"Name": "attachment.instance-id", "Values": [instance_id]}])["Volumes"]
        data_volumes = [v["VolumeId"] for v in volumes
                        if v["Attachments"][0]["Device"] == "/dev/sdf"]
        if data_volumes and volume_tags:
            self.ec2.create_tags(Resources=data_volumes, Tags=volume_tags)
        ports = self.balancer.assign(instance_id) if template == "ServerLaunchTemplate" else None
        instance = Instance(self, name, instance_id, az, user_data, tags or {}, ports, data_volumes)
        instance.data_volumes = data_volumes
        self.instances[instance_id] = instance
        return instance

    # --- EBS -------------------------------------------------------------------------------

    def volume_disk(self, volume):
        disk = self.disks / f"{volume}.raw"
        if not disk.exists():
            with open(disk, "wb") as f:
                f.truncate(2 << 30)
        return disk

    def ebs(self):
        """Plays EBS attachment: a volume moto says is attached to a running twin
        instance at /dev/sd[f-p] is plugged into its VM; one no longer attached, out."""
        while not self.stop_ebs.wait(0.5):
            try:
                volumes = self.ec2.describe_volumes()["Volumes"]
            except Exception:  # noqa: BLE001  a moto busy or stopping: the next round
                continue
            attached = {}
            for v in volumes:
                for a in v["Attachments"]:
                    if re.fullmatch(r"/dev/sd[f-p]", a["Device"]) and a["State"] in ("attached", "attaching"):
                        attached[v["VolumeId"]] = a["InstanceId"]
            for instance in list(self.instances.values()):
                if not instance.alive():
                    continue
                for volume, owner in attached.items():
                    if owner == instance.instance_id and volume not in instance.plugged:
                        instance.plug(volume, self.volume_disk(volume))
                        log(f"EBS: {volume} attached to {instance.role} (NVMe hot-plug)")
                for volume in list(instance.plugged):
                    if attached.get(volume) != instance.instance_id:
                        instance.unplug(volume)
                        log(f"EBS: {volume} detached from {instance.role}")

    def terminate(self, instance):
        """EC2 terminates `instance`: its data volume (DeleteOnTermination false) is
        left `available`."""
        instance.stop()
        for volume in self.ec2.describe_volumes(Filters=[
                {"Name": "attachment.instance-id", "Values": [instance.instance_id]}])["Volumes"]:
            if volume["Attachments"][0]["Device"] == "/dev/sdf":
                self.ec2.detach_volume(VolumeId=volume["VolumeId"], InstanceId=instance.instance_id,
                                       Force=True)
        self.ec2.terminate_instances(InstanceIds=[instance.instance_id])

    # --- checks --------------------------------------------------------------------------

    def signal_of(self, instance):
        with self.aws.lock:
            return next((s for s in self.aws.signals if s[3] == instance.instance_id), None)

    def boot(self, instance, resource, unit):
        """Waits for `instance`'s signal; checks the bootstrap and its units."""
        signal = wait_for(f"{instance.role}'s signal to {resource}",
                          lambda: self.signal_of(instance) or (not instance.alive() and "dead"),
                          BOOT_LIMIT, interval=1)
        instance.wait_shell()
        output = instance.run("cat /var/log/sensorhub-bootstrap.log; systemctl --failed --no-legend; "
                              "systemctl status --no-pager -n 20 'sensorhub-*' 2>&1 | tail -n 60",
                              check=False, timeout=60)
        assert signal != "dead", f"{instance.role}: the VM stopped\n{output}"
        _, stack, logical, _, status = signal
        assert (stack, logical, status) == (STACK, resource, "SUCCESS"), \
            f"{instance.role} signalled {status} to {logical}:\n{output}"
        failed = instance.run("systemctl --failed --no-legend --plain", timeout=60).strip()
        assert not failed, f"{instance.role}: failed units: {failed}\n{output}"
        # The optional steps after the signal (here: no dnf for the CloudWatch agent)
        # did not fail the user data.
        wait_for(f"{instance.role}'s user data to finish",
                 lambda: instance.run("cat /var/lib/cloud/instance/user-data-status 2>/dev/null",
                                      timeout=60, check=False).strip(), 300, interval=3)
        status = instance.run("cat /var/lib/cloud/instance/user-data-status", timeout=60).strip()
        assert status == "0", f"{instance.role}: user data exited {status}\n{output}"
        active = instance.run(f"systemctl is-active {unit}", check=False, timeout=60).strip()
        assert active == "active", f"{instance.role}: {unit} is {active}\n{output}"
        return signal[0] - instance.launched


def first_ack_seconds(sensor):
    """The wall-clock time (guest clock = host clock: qemu's RTC) of the sensor's
    first acknowledged reading, from its journal."""
    out = sensor.run("journalctl -u sensorhub-client -o short-unix --no-pager "
                     "| grep -m1 'first reading acknowledged' | cut -d' ' -f1", timeout=60).split()
    return float(out[0]) if out else None


def run_scenario(twin, args):
    figures = {}
    started = time.monotonic()

    def step(name):
        log(f"--- {name}")

    step("1. deploy.sh to the local AWS; boot server-a (AZ a), server-b (AZ b), a sensor")
    twin.deploy()
    twin.balancer = Balancer(twin.work)
    twin.aws.target_health = twin.balancer.target_health
    threading.Thread(target=twin.ebs, daemon=True).start()
    server_a = twin.launch("server-a", "ServerLaunchTemplate", "ServerSubnetA")
    server_b = twin.launch("server-b", "ServerLaunchTemplate", "ServerSubnetB")
    log(f"accelerator {twin.accel}; servers {server_a.instance_id} ({server_a.az}), "
        f"{server_b.instance_id} ({server_b.az})")

    def register_later(instance):
        # The NLB routes to a target only after its registration (30 s to minutes) and
        # two passed health checks. The delay starts when the server first answers
        # /healthz locally, so a bootstrap that signals on local health alone signals
        # before the balancer routes to it, as it would in AWS.
        health = twin.balancer.ports[twin.balancer.slot_of[instance.instance_id]][1]

        def answers():
            try:
                with socket.create_connection(("127.0.0.1", health), timeout=2) as c:
                    c.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
                    return b"\r\n\r\nok" in c.recv(4096)
            except OSError:
                return not instance.alive()
        wait_for(f"{instance.role}'s /healthz", answers, BOOT_LIMIT * 2, interval=1)
        time.sleep(args.registration_delay)
        if instance.alive():
            twin.balancer.register(instance.instance_id)
            log(f"balancer: {instance.role} registered ({args.registration_delay:.0f}s after its /healthz answered)")
    for server in (server_a, server_b):
        threading.Thread(target=register_later, args=(server,), daemon=True).start()

    step("2. every instance: bootstrap finished, no failed unit, signal after the balancer saw it healthy")
    for server in (server_a, server_b):
        seconds = twin.boot(server, "ServerGroup", "sensorhub-server.service")
        healthy = twin.balancer.first_healthy.get(server.instance_id)
        signalled = twin.signal_of(server)[0]
        assert healthy is not None and signalled >= healthy, \
            f"{server.role} signalled SUCCESS before the balancer saw it healthy"
        figures[f"{server.role} boot to signal"] = seconds
        log(f"{server.role}: signalled SUCCESS {seconds:.0f}s after launch, "
            f"{signalled - healthy:.1f}s after the balancer first saw it healthy")
    # The sensor groups DependsOn the server group: created once the servers signalled.
    groups = {g["AutoScalingGroupName"]: g for g in json.loads(twin.aws_cli(
        "autoscaling", "describe-auto-scaling-groups", "--output", "json"))["AutoScalingGroups"]}
    client_group = next(g for name, g in groups.items() if "Client1Group" in name)
    tags = {t["Key"]: t["Value"] for t in client_group["Tags"] if t.get("PropagateAtLaunch")}
    sensor = twin.launch("client1", "ClientLaunchTemplate", "ClientSubnetA", tags)
    log(f"sensor {tags.get('SensorId')}: {sensor.instance_id}")
    seconds = twin.boot(sensor, "Client1Group", "sensorhub-client.service")
    figures["sensor boot to signal"] = seconds
    ack = first_ack_seconds(sensor)
    figures["sensor boot to first ack"] = ack - sensor.launched_wall if ack else None
    log(f"sensor: signalled SUCCESS {seconds:.0f}s after launch")
    if args.steps == "boot":
        return figures

    step("3. the archive ships from inside the hardened server unit")
    bucket = twin.resources["ReadingsBucket"]

    def archived():
        return [o["Key"] for o in twin.s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    keys = wait_for("a first archived segment", archived, 240, interval=2)
    log(f"archive: {keys[0]}")
    for server in (server_a, server_b):
        security = server.run("systemd-analyze security --no-pager sensorhub-server.service | tail -n 1",
                              timeout=120).strip()
        log(f"{server.role}: {security}")

    def metric(server, name):
        out = server.run(f"curl -s http://127.0.0.1:9000/metrics | awk '$1 == \"{name}\" {{print $2}}'",
                         timeout=60).strip()
        return int(float(out or 0))

    def connections(server):
        return metric(server, "sensorhub_connections_open")
    # Scale in the server the sensor writes to (the balancer keeps a source on one
    # server), so the drain has readings to ship and the sensor must move; the other
    # one is lost in step 5, with the sensor on it.
    if connections(server_b) > connections(server_a):
        server_a, server_b = server_b, server_a

    step(f"3b. TLS end to end through the balancer; rotation: deploy.sh --rotate-tls, "
         f"then `systemctl reload` of {server_a.role} keeps the sensor's connection")
    handshakes = metric(server_a, "sensorhub_tls_handshakes_total")
    assert handshakes >= 1 and connections(server_a) >= 1, \
        f"{server_a.role}: {handshakes} TLS handshakes, {connections(server_a)} connections"
    old_cert = server_a.run("cat /run/sensorhub-tls/cert.pem", timeout=60)
    twin.deploy("--rotate-tls")
    answered = int(sensor.run("wc -l < /var/lib/sensorhub-client/answers", timeout=60).strip() or 0)
    server_a.run("systemctl reload sensorhub-server", timeout=300)
    new_cert = server_a.run("cat /run/sensorhub-tls/cert.pem", timeout=60)
    assert "BEGIN CERTIFICATE" in new_cert and new_cert != old_cert, "reload staged no new certificate"
    reloaded = server_a.run("journalctl -u sensorhub-server -o cat --no-pager | grep -c 'SIGHUP: TLS certificate'",
                            timeout=60, check=False).strip()
    assert reloaded not in ("", "0"), f"{server_a.role} did not re-read its TLS files"
    wait_for("the sensor's answers after the reload",
             lambda: int(sensor.run("wc -l < /var/lib/sensorhub-client/answers", timeout=60).strip() or 0) > answered + 3,
             300, interval=5)
    assert metric(server_a, "sensorhub_tls_handshakes_total") == handshakes, \
        "the reload made the sensor connect again"
    state = server_a.run("systemctl show -P ActiveState sensorhub-server; systemctl show -P NRestarts sensorhub-server",
                         timeout=60).split()
    assert state == ["active", "0"], f"{server_a.role} after the reload: {state}"
    log(f"{server_a.role}: {handshakes} TLS handshake(s); rotated certificate staged and re-read on reload, "
        "the sensor answered on the same connection")
    step(f"4. scale-in of {server_a.role} (the sensor's server): deregistered, lifecycle state "
         "Terminated, drain, CONTINUE")
    t0 = time.monotonic()
    twin.balancer.deregister(server_a.instance_id)
    server_a.metadata.lifecycle_state = "Terminated"

    def completed():
        with twin.aws.lock:
            return [a for a in twin.aws.lifecycle_actions if a[3] == server_a.instance_id]
    action = wait_for(f"{server_a.role}'s CompleteLifecycleAction", completed, 600, interval=1)[0]
    assert action[1:3] == (f"{STACK}-servers", "drain") and action[4] == "CONTINUE", action
    state = server_a.run("systemctl show -P ActiveState sensorhub-server; "
                         "systemctl show -P Result sensorhub-server", timeout=60).split()
    assert state == ["inactive", "success"], f"{server_a.role}'s server after the drain: {state}"
    failed = server_a.run("systemctl --failed --no-legend --plain", timeout=60).strip()
    assert not failed, f"{server_a.role}: failed units: {failed}"
    shipped = [k for k in archived() if f"host={server_a.instance_id}/" in k]
    assert shipped, f"{server_a.role} drained but shipped nothing"
    figures["scale-in drain to CONTINUE"] = action[0] - t0
    log(f"{server_a.role} stopped cleanly, shipped {len(shipped)} segment(s) and completed its "
        f"lifecycle action {action[0] - t0:.0f}s after the termination began")
    twin.terminate(server_a)

    step(f"5. instance loss: {server_b.role}'s VM killed under load; a replacement in "
         f"{server_b.az} adopts its volume")
    before = int(sensor.run("wc -l < /var/lib/sensorhub-client/answers", timeout=60).strip() or 0)
    wait_for(f"the sensor's answers from {server_b.role}",
             lambda: int(sensor.run("wc -l < /var/lib/sensorhub-client/answers", timeout=60).strip() or 0) > before + 5,
             300, interval=5)
    log(f"the sensor is answered by {server_b.role}; kill -9 of its qemu")
    server_b.process.kill()
    server_b.process.wait(timeout=30)
    t_lost = time.monotonic()
    replacement = twin.launch(f"{server_b.role}-replacement", "ServerLaunchTemplate",
                              "ServerSubnetB" if server_b.az.endswith("b") else "ServerSubnetA")
    threading.Thread(target=register_later, args=(replacement,), daemon=True).start()
    seconds = twin.boot(replacement, "ServerGroup", "sensorhub-server.service")
    figures["replacement boot to signal"] = seconds
    # The dead instance held its volume (Terminating:Wait, then EC2 terminates it):
    # only now does the volume become available, with the replacement already running.
    orphan = server_b.data_volumes[0]
    twin.terminate(server_b)
    t_available = time.monotonic()
    log(f"{orphan} available; waiting for the running replacement's periodic adoption")

    def deleted():
        return not twin.ec2.describe_volumes(Filters=[
            {"Name": "volume-id", "Values": [orphan]}])["Volumes"]
    wait_for(f"adoption of {orphan}", deleted, 600, interval=2)
    figures["orphan available to adopted"] = time.monotonic() - t_available
    figures["instance loss to adopted"] = time.monotonic() - t_lost
    log(f"{orphan} shipped and deleted {time.monotonic() - t_available:.0f}s after it became available")

    step("6. verdict: every acknowledged reading in the archive once; no failed unit")
    sensor.run("systemctl stop sensorhub-client", timeout=120)
    answers = sensor.run("cat /var/lib/sensorhub-client/answers", timeout=60)
    summary = sensor.run("journalctl -u sensorhub-client -o cat --no-pager | grep -E '^sent|sent [0-9]' | tail -n 1",
                         timeout=60, check=False).strip()
    replacement.run("systemctl stop sensorhub-server", timeout=400)
    for instance in (sensor, replacement):
        failed = instance.run("systemctl --failed --no-legend --plain", timeout=60).strip()
        assert not failed, f"{instance.role}: failed units: {failed}"
    # The archive as the repo's SQL reads it: ROOT/readings/dt=.../host=.../*.jsonl.gz
    # (the keys under the stack's ArchivePrefix).
    root = twin.work / "archive"
    for obj in twin.s3.list_objects_v2(Bucket=bucket).get("Contents", []):
        target = root / obj["Key"].split("/", 1)[1]
        target.parent.mkdir(parents=True, exist_ok=True)
        twin.s3.download_file(bucket, obj["Key"], str(target))
    import archive_sql
    _, rows = archive_sql.query(archive_sql.connect(root), "readings_dedup.sql")
    archived_seqs = {}
    for sensor_id, _kind, _value, seq, *_ in rows:
        archived_seqs.setdefault(sensor_id, set()).add(seq)
    acked = {}
    for line in answers.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] in ("ok", "duplicate"):
            acked.setdefault(parts[0], set()).add(int(parts[1]))
    assert acked, f"no acknowledged readings: {answers[:200]!r}"
    for sensor_id, seqs in acked.items():
        have = archived_seqs.get(sensor_id, set())
        missing = len(seqs - have)
        log(f"{sensor_id}: {summary or 'summary not found'}; acknowledged {len(seqs)}, "
            f"in the archive after dedup {len(have)}, missing {missing}")
        assert missing == 0, f"{sensor_id}: {missing} acknowledged readings not in the archive"
    figures["whole run"] = time.monotonic() - started
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin", type=Path, default=REPO / "dist" / "x86_64")
    parser.add_argument("--cache", type=Path,
                        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                        / "sensorhub-twin")
    parser.add_argument("--registration-delay", type=float, default=30)
    parser.add_argument("--steps", choices=("all", "boot"), default="all")
    # KVM where it works: on the machines this was built on /dev/kvm exists but a guest
    # kernel hangs at its first instructions (a nested hypervisor), so TCG is the default.
    parser.add_argument("--accel", choices=("tcg", "kvm"),
                        default=os.environ.get("SENSORHUB_TWIN_ACCEL", "tcg"))
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if os.environ.get("SENSORHUB_TWIN_NAMESPACE") != "1":
        if os.geteuid() != 0:
            sys.exit("twin: run as root (qemu, haproxy, a network namespace)")
        os.execvpe("unshare", ["unshare", "--net", "--mount", sys.executable, *sys.argv],
                   dict(os.environ, SENSORHUB_TWIN_NAMESPACE="1"))
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    for tool in ("sensor-server", "sensor-client"):
        if not (args.bin / tool).exists():
            sys.exit(f"{args.bin / tool} missing: run scripts/build-static.sh first")
    t0 = time.monotonic()
    subprocess.run([str(HERE / "image.sh"), str(args.cache)], check=True)
    log(f"image ready in {time.monotonic() - t0:.0f}s ({args.cache})")
    work = Path(tempfile.mkdtemp(prefix="sensorhub-twin-"))
    twin = Twin(args, work)
    ok = False
    try:
        figures = run_scenario(twin, args)
        ok = True
        log("figures: " + ", ".join(f"{k} {v:.0f}s" for k, v in figures.items() if v is not None))
    finally:
        if not ok:
            for instance in twin.instances.values():
                log(f"--- {instance.role}: console, then (if it lives) journal (last lines)")
                print(instance.console.read_text(errors="replace")[-2000:]
                      if instance.console.exists() else "(none)")
                if instance.alive() and instance.shell is not None:
                    try:
                        print(instance.run("tail -n 20 /var/log/sensorhub-bootstrap.log; "
                                           "journalctl --no-pager -o short-iso -n 60 -u 'sensorhub-*'",
                                           timeout=120, check=False))
                    except (AssertionError, OSError) as e:
                        print(f"(no journal: {e})")
        for instance in twin.instances.values():
            instance.stop()
        twin.stop_ebs.set()
        if twin.balancer:
            twin.balancer.stop()
        twin.aws.stop()
        if args.keep or not ok:
            log(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    log("PASS" if ok else "FAIL")


if __name__ == "__main__":
    main()
