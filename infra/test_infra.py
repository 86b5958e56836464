"""Tests of the AWS deployment without AWS: the template's shape, bootstrap.sh (install,
orphaned-volume adoption, the lifecycle hook) and deploy.sh run for real against moto
on 127.0.0.1, and the units they write checked by systemd-analyze. Run by .ci/run in
its venv: `pytest infra/test_infra.py`. Needs the static binaries in dist/
(scripts/build-static.sh).

moto runs in this process, with the EC2 twin's stand-ins for what it lacks
(infra/twin/local_aws.py: the NLB's type, SignalResource, CompleteLifecycleAction,
target health). Known moto limits these tests live with: it does not verify
x-amz-checksum-sha256, does not register LifecycleHookSpecificationList, and updates
only resources whose template text changed (so a parameter-only update makes no new
launch template version there; the template checks below show that one would). What
only a boot shows (unit start order, the balancer's health, EBS attachment) is the
twin's: infra/twin/twin.py."""

import gzip
import hashlib
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent / "twin"))
import local_aws  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DIST = REPO / "dist" / "x86_64"
BOOTSTRAP = REPO / "infra" / "bootstrap.sh"
TEMPLATE = REPO / "infra" / "sensorhub.yaml"
BUCKET = "sensorhub-artifacts"
PREFIX = "sensorhub/test"
REGION = "us-east-1"
STACK = "fleet-test"
LOCAL = None  # the local AWS of the `moto` fixture


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def directives(text):
    """Hardening directives (KEY=VALUE lines) of a unit or of hardening.conf."""
    keep = ("DynamicUser", "NoNewPrivileges", "Protect", "Private", "Restrict", "Lock",
            "Memory", "RemoveIPC", "DevicePolicy", "Capability", "Ambient", "SystemCall",
            "UMask", "ProcSubset")
    return [line.strip() for line in text.splitlines()
            if line.strip().startswith(keep)]


class CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short tags, each kept as {"Fn": args}."""


for tag in ("Ref", "Sub", "GetAtt", "If", "Equals", "Not", "Select", "GetAZs", "Join",
            "Split", "FindInMap", "Base64"):
    CfnLoader.add_multi_constructor(
        f"!{tag}", lambda loader, suffix, node, tag=tag: {tag: (
            loader.construct_scalar(node) if isinstance(node, yaml.ScalarNode)
            else loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode)
            else loader.construct_mapping(node))})


def template():
    return yaml.load(TEMPLATE.read_text(), Loader=CfnLoader)


def statements_of(role):
    """The role's inline policy statements as deployed with SensorTransport=tls (a
    conditional statement's `!If [UseTls, STATEMENT, NoValue]` taken as STATEMENT)."""
    statements = template()["Resources"][role]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]
    return [s["If"][1] if "If" in s else s for s in statements]


# --- moto ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def moto():
    """The twin's local AWS (moto with its stand-ins, infra/twin/local_aws.py) on a free
    loopback port, with credentials for it in the env and the artifacts uploaded."""
    global LOCAL
    LOCAL = local_aws.Aws()
    env = LOCAL.env(os.environ, REGION)
    aws(env, "s3", "mb", f"s3://{BUCKET}")
    for tool in ("sensor-server", "sensor-client"):
        aws(env, "s3", "cp", str(DIST / tool), f"s3://{BUCKET}/{PREFIX}/x86_64/{tool}")
    yield env
    LOCAL.stop()


def aws(env, *args):
    result = subprocess.run(["aws", *args], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, f"aws {' '.join(args)}: {result.stderr}"
    return result.stdout


def aws_json(env, *args):
    return json.loads(aws(env, *args, "--output", "json"))


def instance(env, az="us-east-1a"):
    """A running moto instance with a data volume at /dev/sdf, like a server's."""
    ami = aws(env, "ssm", "get-parameter", "--name",
              "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64",
              "--query", "Parameter.Value", "--output", "text").strip()
    run = aws_json(env, "ec2", "run-instances", "--image-id", ami, "--count", "1",
                   "--instance-type", "t3.small", "--placement", f"AvailabilityZone={az}",
                   "--block-device-mappings",
                   '[{"DeviceName":"/dev/sdf","Ebs":{"VolumeSize":1,"DeleteOnTermination":false}}]')
    return run["Instances"][0]["InstanceId"]


def volume_of(env, instance_id, device="/dev/sdf"):
    return aws(env, "ec2", "describe-volumes", "--filters",
               f"Name=attachment.instance-id,Values={instance_id}",
               f"Name=attachment.device,Values={device}",
               "--query", "Volumes[0].VolumeId", "--output", "text").strip()


def bootstrap(env, root, *args, command="install", **extra_env):
    env = dict(env, SENSORHUB_ROOT=str(root), SENSORHUB_S3_ENDPOINT=env["AWS_ENDPOINT_URL"],
               SENSORHUB_START=f'echo "started $UNIT" > {root}/started')
    env.update(extra_env)
    return subprocess.run(["bash", str(BOOTSTRAP), command, *args], env=env,
                          capture_output=True, text=True, timeout=300)


def install_args(role, server_sha=None, client_sha=None):
    args = ["--role", role, "--bucket", BUCKET, "--prefix", PREFIX, "--arch", "x86_64",
            "--server-sha256", server_sha or sha256(DIST / "sensor-server"),
            "--client-sha256", client_sha or sha256(DIST / "sensor-client"),
            "--region", REGION, "--log-group-prefix", "/sensorhub/test"]
    if role == "client":
        args += ["--server", "internal-nlb.example:5000", "--sensor", "client1-temperature",
                 "--kind", "temperature", "--interval-ms", "1000"]
    else:
        args += ["--archive", "s3://readings/fleet", "--group", "t-servers", "--hook", "drain"]
    return args


def install_server(env, root):
    """Installs a server on a fresh moto instance; returns (instance id, its volume)."""
    instance_id = instance(env)
    volume = volume_of(env, instance_id)
    devices = root / "devices"
    (devices / volume).mkdir(parents=True)
    result = bootstrap(env, root, *install_args("server"), SENSORHUB_INSTANCE_ID=instance_id,
                       SENSORHUB_AZ="us-east-1a", SENSORHUB_FAKE_VOLUMES=str(devices))
    assert result.returncode == 0, result.stderr
    return instance_id, volume


# --- the template --------------------------------------------------------------------

def test_the_template_declares_a_fleet_that_rolls_and_keeps_its_data():
    t = template()
    r = t["Resources"]
    # Two AZs, for servers and for sensors.
    azs = {name: r[name]["Properties"]["AvailabilityZone"]["Select"][0]
           for name in ("ServerSubnetA", "ServerSubnetB", "ClientSubnetA", "ClientSubnetB")}
    assert azs == {"ServerSubnetA": 0, "ServerSubnetB": 1, "ClientSubnetA": 0, "ClientSubnetB": 1}
    group = r["ServerGroup"]
    assert group["Properties"]["VPCZoneIdentifier"] == [{"Ref": "ServerSubnetA"}, {"Ref": "ServerSubnetB"}]
    assert {"ServerSubnetARoutes", "ServerSubnetBRoutes"} <= set(group["DependsOn"])
    # Updates roll one at a time, never below one in service, waiting for health.
    rolling = group["UpdatePolicy"]["AutoScalingRollingUpdate"]
    assert rolling["MaxBatchSize"] == 1 and rolling["MinInstancesInService"] == 1
    assert rolling["WaitOnResourceSignals"] is True
    assert group["Properties"]["LaunchTemplate"]["Version"] == {
        "GetAtt": "ServerLaunchTemplate.LatestVersionNumber"}
    for client in ("Client1Group", "Client2Group"):
        assert r[client]["UpdatePolicy"]["AutoScalingRollingUpdate"]["WaitOnResourceSignals"]
        assert r[client]["Properties"]["MaxSize"] == "1"
    # A new artifact prefix changes the launch templates' user data, hence their version.
    for lt in ("ServerLaunchTemplate", "ClientLaunchTemplate"):
        data = r[lt]["Properties"]["LaunchTemplateData"]
        assert "${ArtifactPrefix}" in json.dumps(data["UserData"])
        assert data["MetadataOptions"]["HttpTokens"] == "required"
        assert data["MetadataOptions"]["HttpPutResponseHopLimit"] == 1
        assert all(m["Ebs"]["Encrypted"] for m in data["BlockDeviceMappings"])
    # The AMI is a plain id (deploy.sh pins it), checked against the architecture.
    assert t["Parameters"]["ImageId"]["Type"] == "AWS::EC2::Image::Id"
    assert t["Rules"]["ImageMatchesArchitecture"]["Assertions"][0]["Assert"] == {
        "Equals": [{"Ref": "ImageArchitecture"}, {"Ref": "Architecture"}]}
    # The store outlives its instance; termination waits for the drain.
    data_volume = r["ServerLaunchTemplate"]["Properties"]["LaunchTemplateData"]["BlockDeviceMappings"][1]
    assert data_volume["DeviceName"] == "/dev/sdf" and data_volume["Ebs"]["DeleteOnTermination"] is False
    hook = group["Properties"]["LifecycleHookSpecificationList"][0]
    assert hook["LifecycleTransition"] == "autoscaling:EC2_INSTANCE_TERMINATING"
    # Sensors reach the balancer, never an instance.
    user_data = json.dumps(r["ClientLaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"])
    assert "${Balancer.DNSName}:5000" in user_data and "PrivateIp" not in user_data
    # Every UserData failure signals at once.
    for lt in ("ServerLaunchTemplate", "ClientLaunchTemplate"):
        text = json.dumps(r[lt]["Properties"]["LaunchTemplateData"]["UserData"])
        assert "trap 'fail $LINENO' ERR" in text and "--status FAILURE" in text


def test_a_server_signals_only_once_the_balancer_routes_to_it_and_sensors_wait_for_servers():
    """Issue 16, item 3: the signal follows DescribeTargetHealth (allowed to the role),
    and the sensor groups are created after the server group has signalled."""
    r = template()["Resources"]
    user_data = json.dumps(r["ServerLaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"])
    assert "--target-group ${ServerTargets}" in user_data
    assert any(s["Action"] == "elasticloadbalancing:DescribeTargetHealth" for s in statements_of("ServerRole"))
    for client in ("Client1Group", "Client2Group"):
        assert "ServerGroup" in r[client]["DependsOn"]
    text = BOOTSTRAP.read_text()
    assert text.index("wait_until \"the load balancer's health check") < text.index("    signal SUCCESS")


def test_adoption_runs_on_a_timer_on_every_server_and_an_alarm_watches_for_orphans():
    """Issue 16, item 2: a volume freed after the replacement booted is still adopted,
    and a volume nobody adopts raises an alarm that no dying server can silence."""
    t = template()
    r = t["Resources"]
    user_data = json.dumps(r["ServerLaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"])
    assert "--adopt-interval ${AdoptionIntervalSeconds}" in user_data
    assert t["Parameters"]["AdoptionIntervalSeconds"]["Default"] == 300
    alarm = r["OrphanedDataVolumesAlarm"]["Properties"]
    assert (alarm["Namespace"], alarm["MetricName"]) == ("sensorhub", "OrphanedDataVolumes")
    assert alarm["TreatMissingData"] == "breaching"
    assert "--metric-name OrphanedDataVolumes" in BOOTSTRAP.read_text()


def test_both_buckets_outlive_the_stack():
    """Issue 16, item 5: delete-stack keeps the archive (and would fail on a non-empty
    bucket otherwise)."""
    r = template()["Resources"]
    buckets = [name for name, v in r.items() if v["Type"] == "AWS::S3::Bucket"]
    assert sorted(buckets) == ["QueryResultsBucket", "ReadingsBucket"]
    for name in buckets:
        assert r[name]["DeletionPolicy"] == "Retain", name
        assert r[name]["UpdateReplacePolicy"] == "Retain", name


def test_no_storage_class_transition_that_s3_would_skip():
    """Issue 16, item 6: S3 does not transition objects under 128 KiB, and a gzipped
    segment is a few KB: no transition rule that would never act."""
    for name, resource in template()["Resources"].items():
        if resource["Type"] != "AWS::S3::Bucket":
            continue
        for rule in resource["Properties"].get("LifecycleConfiguration", {}).get("Rules", []):
            assert "Transitions" not in rule and "Transition" not in rule, (name, rule["Id"])


def test_deploy_expands_no_possibly_empty_array_bare_for_bash_3_2():
    """Issue 16, item 7: macOS's bash 3.2 calls "${a[@]}" of an empty array unbound
    under set -u. Every array expansion in deploy.sh is guarded (${a[@]+"${a[@]}"} or
    ${a[*]:-}) unless the array is always filled where it is used. (Lint, not a run:
    no bash 3.2 package reaches this machine.)"""
    text = re.sub(r"^\s*#.*$", "", (REPO / "infra/deploy.sh").read_text(), flags=re.M)
    always_filled = {"uploads", "deploy"}
    guarded = re.sub(r'\$\{(\w+)\[@\]\+"\$\{\1\[@\]\}"\}', "", text)
    guarded = re.sub(r"\$\{(\w+)\[\*\]:-\}", "", guarded)
    bare = {name for name in re.findall(r"\$\{(\w+)\[[@*]\]\}", guarded)} - always_filled
    assert not bare, f"unguarded array expansions in deploy.sh: {sorted(bare)}"
    # And the guard works on this bash as it does on 3.2: no error, no empty word.
    out = subprocess.run(["bash", "-uc", 'a=(); printf "<%s>" x ${a[@]+"${a[@]}"}; echo ${a[*]:-}'],
                         capture_output=True, text=True, check=True).stdout
    assert out == "<x>\n"


def test_units_log_to_the_journal_and_a_root_unit_feeds_the_agent_its_files(moto, tmp_path):
    """Issue 16, item 1: StandardOutput=append:FILE is opened before LogsDirectory= is
    created (systemd 252), so no unit may log to a file of its own; the agent's files
    come from sensorhub-logs.service, whose directory bootstrap makes first."""
    assert bootstrap(moto, tmp_path / "client", *install_args("client")).returncode == 0
    install_server(moto, tmp_path / "server")
    for root, role in ((tmp_path / "client", "client"), (tmp_path / "server", "server")):
        units = root / "etc/systemd/system"
        for unit in units.glob("sensorhub-*"):
            text = unit.read_text()
            assert "append:" not in text and "LogsDirectory" not in text, unit.name
        assert (root / "var/log/sensorhub").is_dir()
        logs = (units / "sensorhub-logs.service").read_text()
        assert f">>/var/log/sensorhub/{role}.log" in logs and "--cursor-file=" in logs
        agent = json.loads((root / "opt/aws/amazon-cloudwatch-agent/etc/sensorhub.json").read_text())
        files = [f["file_path"] for f in agent["logs"]["logs_collected"]["files"]["collect_list"]]
        assert f"/var/log/sensorhub/{role}.log" in files


def test_the_dashboard_shows_what_the_servers_export_and_the_agent_forwards(moto, tmp_path):
    """Every sensorhub metric on the dashboard is exported by /metrics (a real server
    asked) and forwarded by the agent's metric_declaration, with the dimensions the
    dashboard searches for."""
    body = template()["Resources"]["Dashboard"]["Properties"]["DashboardBody"]["Sub"][0]
    shown = set(re.findall(r'MetricName=\\"(sensorhub_\w+)\\"', body))
    shown |= set(re.findall(r'\["sensorhub", "(sensorhub_\w+)"', body))
    assert {"sensorhub_store_records_total", "sensorhub_readings_total",
            "sensorhub_archive_lag_seconds", "sensorhub_archive_pending_bytes"} <= shown
    assert '"AWS/NetworkELB", "HealthyHostCount"' in body and '"CWAgent", "disk_used_percent"' in body
    # Forwarded by the agent.
    config = re.search(r'"metric_declaration": (\[.*?\n          \}\])', BOOTSTRAP.read_text(), re.S)[1]
    declarations = json.loads(config.replace("\\$", "$"))
    forwarded = {sel.strip("^$"): d["dimensions"] for d in declarations for sel in d["metric_selectors"]}
    for name in shown:
        assert name in forwarded, f"{name} is on the dashboard but the agent does not forward it"
        wanted = ["job", "host", "status"] if name == "sensorhub_readings_total" else ["job", "host"]
        assert wanted in forwarded[name], (name, forwarded[name])
    # Exported by a server that archives (as on EC2).
    aws(moto, "s3", "mb", "s3://dashboard-archive")
    port, http_port = free_ports(2)
    server = subprocess.Popen([str(DIST / "sensor-server"), "--listen", f"127.0.0.1:{port}",
                               "--http-listen", f"127.0.0.1:{http_port}",
                               "--data-dir", str(tmp_path / "data"),
                               "--archive", "s3://dashboard-archive/sensorhub",
                               "--archive-endpoint", moto["AWS_ENDPOINT_URL"]],
                              env=moto, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", http_port), timeout=5) as c:
                    c.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                    text = b""
                    while chunk := c.recv(65536):
                        text += chunk
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not answer /metrics"
                time.sleep(0.1)
    finally:
        server.terminate()
        server.wait(timeout=30)
    exported = set(re.findall(r"^# TYPE (\w+) ", text.decode(), re.M))
    assert set(forwarded) <= exported, set(forwarded) - exported


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_security_groups_use_inline_rules_only():
    r = template()["Resources"]
    kinds = {v["Type"] for v in r.values()}
    assert "AWS::EC2::SecurityGroupIngress" not in kinds
    assert "AWS::EC2::SecurityGroupEgress" not in kinds


def test_the_servers_may_only_put_objects_into_the_archive():
    statements = statements_of("ServerRole")
    archive = [s for s in statements if "Archive" in s["Sid"]]
    assert [s["Action"] for s in archive] == ["s3:PutObject"]
    assert all("s3:GetObject" != s["Action"] or s["Sid"] == "Artifacts" for s in statements)


def test_bootstrap_hardening_is_the_shared_hardening():
    shared = directives((REPO / "deploy/systemd/hardening.conf").read_text())
    embedded = directives(BOOTSTRAP.read_text())
    assert shared and embedded == shared


def test_bootstrap_and_the_module_agree_on_the_file_limit():
    bootstrap_limit = int(re.search(r"^limit_nofile=(\d+)", BOOTSTRAP.read_text(), re.M)[1])
    module = (REPO / "nix/module.nix").read_text()
    assert "LimitNOFILE = server.maxConnections + 1024;" in module
    default = int(re.search(r"maxConnections = mkOption \{[^}]*default = (\d+);", module)[1])
    assert bootstrap_limit == default + 1024


def test_files_that_bootstrap_names_exist():
    for name in re.findall(r"infra/[\w./-]+\.py", BOOTSTRAP.read_text()):
        assert (REPO / name).exists(), name


def test_the_nixos_module_reads_the_same_hardening():
    """nix/hardening.nix (what the NixOS module applies), evaluated by Nix, equals the
    file's directives, which equal the EC2 units' (previous test)."""
    if not shutil.which("nix-instantiate"):
        pytest.skip("nix-instantiate not installed")
    evaluated = json.loads(subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", "-E",
         "import ./nix/hardening.nix ./deploy/systemd/hardening.conf"],
        cwd=REPO, check=True, capture_output=True, text=True, timeout=60).stdout)
    expected = {}
    for line in directives((REPO / "deploy/systemd/hardening.conf").read_text()):
        key, _, value = line.partition("=")
        expected.setdefault(key, []).append(value)
    assert evaluated == {k: v[0] if len(v) == 1 else v for k, v in expected.items()}


# --- bootstrap.sh install --------------------------------------------------------------

def test_a_client_installs_with_its_sensor_the_balancer_and_logs(moto, tmp_path):
    result = bootstrap(moto, tmp_path, *install_args("client"))
    assert result.returncode == 0, result.stderr
    for tool in ("sensor-server", "sensor-client"):
        installed = tmp_path / "usr/local/bin" / tool
        assert installed.read_bytes() == (DIST / tool).read_bytes()
        assert os.access(installed, os.X_OK)
    unit = (tmp_path / "etc/systemd/system/sensorhub-client.service").read_text()
    assert "--server internal-nlb.example:5000 --sensor client1-temperature" in unit
    assert directives(unit) == directives((REPO / "deploy/systemd/hardening.conf").read_text())
    assert (tmp_path / "started").read_text() == "started sensorhub-client.service\n"
    agent = json.loads((tmp_path / "opt/aws/amazon-cloudwatch-agent/etc/sensorhub.json").read_text())
    groups = [f["log_group_name"] for f in agent["logs"]["logs_collected"]["files"]["collect_list"]]
    assert groups == ["/sensorhub/test/client", "/sensorhub/test/bootstrap"]


def test_a_server_mounts_its_data_volume_archives_and_watches_its_lifecycle(moto, tmp_path):
    instance_id, volume = install_server(moto, tmp_path)
    store = tmp_path / "var/lib/private/sensorhub"
    assert store.resolve() == (tmp_path / "devices" / volume).resolve()
    assert (store / "host-id").read_text().strip() == instance_id
    unit = (tmp_path / "etc/systemd/system/sensorhub-server.service").read_text()
    assert f"--archive s3://readings/fleet --host-id {instance_id}" in unit
    assert "RequiresMountsFor=/var/lib/private/sensorhub" in unit
    assert "LimitNOFILE=11024" in unit
    watcher = (tmp_path / "etc/systemd/system/sensorhub-lifecycle.service").read_text()
    assert "lifecycle-watch --group t-servers --hook drain" in watcher
    shared = directives((REPO / "deploy/systemd/hardening.conf").read_text())
    assert "User=sensorhub" in unit and directives(unit) == shared
    # The watcher stops the server with systemctl: root without capabilities, outside a
    # private user namespace (from which systemd cannot be reached), otherwise the same.
    assert "User=" not in watcher
    assert directives(watcher) == [d for d in shared
                                   if not d.startswith(("DynamicUser=", "PrivateUsers="))]
    assert "CapabilityBoundingSet=" in directives(watcher)
    agent = json.loads((tmp_path / "opt/aws/amazon-cloudwatch-agent/etc/sensorhub.json").read_text())
    prometheus = agent["logs"]["metrics_collected"]["prometheus"]
    selectors = prometheus["emf_processor"]["metric_declaration"][0]["metric_selectors"]
    assert "^sensorhub_archive_lag_seconds$" in selectors
    assert "^sensorhub_store_records_total$" in selectors
    assert agent["metrics"]["metrics_collected"]["disk"]["resources"] == ["/var/lib/private/sensorhub"]
    scrape = (tmp_path / "opt/aws/amazon-cloudwatch-agent/etc/sensorhub-prometheus.yaml").read_text()
    assert "127.0.0.1:9000" in scrape


def test_a_wrong_checksum_installs_nothing_and_fails(moto, tmp_path):
    result = bootstrap(moto, tmp_path, *install_args("client", server_sha="0" * 64))
    assert result.returncode != 0
    assert "SHA-256 mismatch" in result.stderr
    assert not (tmp_path / "usr").exists()
    assert not (tmp_path / "etc").exists()
    assert not (tmp_path / "started").exists()


def test_every_unit_verifies_and_scores_well_in_systemd_analyze(moto, tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze not installed")
    assert bootstrap(moto, tmp_path / "client", *install_args("client")).returncode == 0
    install_server(moto, tmp_path / "server")
    scores = {}
    for role in ("server", "client"):
        # verify resolves dependencies (sysinit.target, ...) inside the root.
        shutil.copytree("/usr/lib/systemd/system", tmp_path / role / "usr/lib/systemd/system",
                        symlinks=True, dirs_exist_ok=True)
        (tmp_path / role / "bin").mkdir(exist_ok=True)
        shutil.copy("/bin/bash", tmp_path / role / "bin/bash")  # the watcher's interpreter
    for role, unit in (("server", "sensorhub-server.service"),
                       ("server", "sensorhub-lifecycle.service"),
                       ("client", "sensorhub-client.service")):
        root = tmp_path / role
        path = root / "etc/systemd/system" / unit
        verify = subprocess.run(["systemd-analyze", "verify", f"--root={root}", str(path)],
                                capture_output=True, text=True, timeout=60)
        assert verify.returncode == 0, verify.stderr
        security = subprocess.run(
            ["systemd-analyze", "security", "--offline=true", f"--root={root}", str(path)],
            capture_output=True, text=True, timeout=60)
        match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\S+)", security.stdout)
        assert match, security.stdout + security.stderr
        scores[unit] = float(match.group(1))
        print(f"systemd-analyze security {unit}: {match.group(1)} {match.group(2)}")
    # The watcher runs as root (without capabilities) to call systemctl.
    assert scores.pop("sensorhub-lifecycle.service") <= 3.0, scores
    assert all(score <= 1.5 for score in scores.values()), scores


# --- orphaned volumes ---------------------------------------------------------------------

def installed_server(root):
    """The server binary where `install` puts it (adopt-volumes runs it)."""
    (root / "usr/local/bin").mkdir(parents=True)
    shutil.copy(DIST / "sensor-server", root / "usr/local/bin/sensor-server")


def crashed_store(directory, host, records):
    """What a server that died leaves on its volume: a segment, the host id."""
    directory.mkdir(parents=True)
    (directory / "host-id").write_text(host + "\n")
    lines = "".join(json.dumps({"sensor": "s1", "kind": "temperature", "value": 20.5,
                                "seq": seq, "recv": 1796083200000 + seq}) + "\n"
                    for seq in range(1, records + 1))
    (directory / "segment-0000000001.jsonl").write_text(lines)
    return lines


def tagged_volume(env, az, stack):
    created = aws_json(env, "ec2", "create-volume", "--availability-zone", az, "--size", "1",
                       "--tag-specifications",
                       f"ResourceType=volume,Tags=[{{Key=sensorhub:stack,Value={stack}}}]")
    return created["VolumeId"]


def volume_ids(env):
    return {v["VolumeId"] for v in aws_json(env, "ec2", "describe-volumes")["Volumes"]}


def test_orphaned_volumes_in_this_az_are_shipped_and_deleted_others_left(moto, tmp_path):
    aws(moto, "s3", "mb", "s3://readings")
    installed_server(tmp_path)
    me = instance(moto)
    devices = tmp_path / "devices"
    orphan = tagged_volume(moto, "us-east-1a", STACK)
    lines = crashed_store(devices / orphan, "i-deadbeef", 25)
    elsewhere = tagged_volume(moto, "us-east-1b", STACK)        # another AZ's server adopts it
    foreign = tagged_volume(moto, "us-east-1a", "another-stack")  # not ours
    busy = volume_of(moto, instance(moto))                       # attached: in use
    aws(moto, "ec2", "create-tags", "--resources", busy, "--tags", f"Key=sensorhub:stack,Value={STACK}")

    result = bootstrap(moto, tmp_path, "--stack", STACK, "--archive", "s3://readings/fleet",
                       "--region", REGION, command="adopt-volumes",
                       SENSORHUB_INSTANCE_ID=me, SENSORHUB_AZ="us-east-1a",
                       SENSORHUB_FAKE_VOLUMES=str(devices))
    assert result.returncode == 0, result.stderr
    assert f"shipped everything {orphan} held (host i-deadbeef)" in result.stderr
    # The key names the store id `ship` gave the store (its first: the dead one had none).
    keys = aws_json(moto, "s3api", "list-objects-v2", "--bucket", "readings", "--prefix",
                    "fleet/readings/dt=2026-12-01/host=i-deadbeef/segment-0000000001-")["Contents"]
    assert len(keys) == 1, keys
    key = keys[0]["Key"]
    aws(moto, "s3api", "get-object", "--bucket", "readings", "--key", key, str(tmp_path / "o.gz"))
    assert gzip.decompress((tmp_path / "o.gz").read_bytes()).decode() == lines
    left = volume_ids(moto)
    assert orphan not in left, "shipped, then deleted"
    assert {elsewhere, foreign, busy} <= left
    # The fleet-level count that outlives any one server (OrphanedDataVolumesAlarm):
    # `elsewhere` still waits, in another AZ.
    assert "the stack has 1 available data volume(s)" in result.stderr
    metrics = aws_json(moto, "cloudwatch", "list-metrics", "--namespace", "sensorhub",
                       "--metric-name", "OrphanedDataVolumes")["Metrics"]
    assert {"Name": "Stack", "Value": STACK} in metrics[0]["Dimensions"]


def test_an_orphan_that_cannot_be_shipped_is_kept_for_the_next_try(moto, tmp_path):
    installed_server(tmp_path)
    me = instance(moto)
    devices = tmp_path / "devices"
    orphan = tagged_volume(moto, "us-east-1a", STACK + "-down")
    crashed_store(devices / orphan, "i-0ld", 5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    result = bootstrap(moto, tmp_path, "--stack", STACK + "-down", "--archive",
                       "s3://readings/fleet", "--region", REGION, command="adopt-volumes",
                       SENSORHUB_INSTANCE_ID=me, SENSORHUB_AZ="us-east-1a",
                       SENSORHUB_FAKE_VOLUMES=str(devices), SENSORHUB_S3_ENDPOINT=dead,
                       SENSORHUB_SHIP_TIMEOUT="2")
    assert result.returncode == 0, result.stderr
    assert "detached it for the next try" in result.stderr
    state = aws(moto, "ec2", "describe-volumes", "--volume-ids", orphan,
                "--query", "Volumes[0].State", "--output", "text").strip()
    assert state == "available"
    assert (devices / orphan / "segment-0000000001.jsonl").exists()


# --- the lifecycle hook ---------------------------------------------------------------------

class FakeImds(http.server.BaseHTTPRequestHandler):
    """IMDSv2 as far as the watcher uses it: a token, then the target lifecycle state,
    InService for the first few asks and Terminated after."""
    asks = 0
    instance_id = ""

    def do_PUT(self):
        self.reply("token")

    def do_GET(self):
        if self.headers.get("X-aws-ec2-metadata-token") != "token":
            self.send_error(401)
        elif self.path.endswith("/autoscaling/target-lifecycle-state"):
            type(self).asks += 1
            self.reply("InService" if type(self).asks < 3 else "Terminated")
        elif self.path.endswith("/instance-id"):
            self.reply(self.instance_id)
        else:
            self.send_error(404)

    def reply(self, body):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


def test_termination_stops_the_server_then_completes_the_lifecycle_action(moto, tmp_path):
    me = instance(moto)
    aws(moto, "autoscaling", "create-launch-configuration", "--launch-configuration-name", "lc",
        "--image-id", "ami-12c6146b", "--instance-type", "t3.small")
    aws(moto, "autoscaling", "create-auto-scaling-group", "--auto-scaling-group-name", "t-servers",
        "--launch-configuration-name", "lc", "--min-size", "0", "--max-size", "1",
        "--availability-zones", "us-east-1a")
    aws(moto, "autoscaling", "put-lifecycle-hook", "--auto-scaling-group-name", "t-servers",
        "--lifecycle-hook-name", "drain", "--lifecycle-transition",
        "autoscaling:EC2_INSTANCE_TERMINATING")
    FakeImds.instance_id = me
    imds = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeImds)
    threading.Thread(target=imds.serve_forever, daemon=True).start()
    try:
        stopped = tmp_path / "stopped"
        result = bootstrap(moto, tmp_path, "--group", "t-servers", "--hook", "drain",
                           "--region", REGION, command="lifecycle-watch",
                           SENSORHUB_IMDS=f"http://127.0.0.1:{imds.server_port}",
                           SENSORHUB_WATCH_INTERVAL="0.1", SENSORHUB_STOP=f"touch {stopped}")
    finally:
        imds.shutdown()
    assert result.returncode == 0, result.stderr
    assert FakeImds.asks >= 3, "it waited for the termination"
    assert stopped.exists(), "the server was stopped first"
    assert "lifecycle action completed" in result.stderr
    assert [a[1:] for a in LOCAL.lifecycle_actions] == [("t-servers", "drain", me, "CONTINUE")]


# --- deploy.sh ------------------------------------------------------------------------------

def deploy(env, *args, cwd=REPO):
    # The stacks' CAs (deploy.sh keeps them in ~/.config/sensorhub/STACK/tls) in a
    # directory of the test run, never the user's.
    env = {"XDG_CONFIG_HOME": str(DEPLOY_CONFIG)} | env
    return subprocess.run([str(REPO / "infra/deploy.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=900, cwd=cwd)


DEPLOY_CONFIG = Path(os.environ.get("TMPDIR", "/tmp")) / f"sensorhub-deploy-config-{os.getpid()}"


def parameters(env, stack):
    described = aws_json(env, "cloudformation", "describe-stacks", "--stack-name", stack)
    return {p["ParameterKey"]: p["ParameterValue"] for p in described["Stacks"][0]["Parameters"]}


def test_deploy_creates_the_fleet_then_updates_and_keeps_its_ami(moto, tmp_path):
    env = dict(moto)
    bucket = "sensorhub-deploy-test"
    aws(env, "s3", "mb", f"s3://{bucket}")
    common = ["--bucket", bucket, "--stack", STACK, "--region", REGION, "--allow-dirty"]
    first = deploy(env, *common, "--dist", str(DIST))
    assert first.returncode == 0, first.stdout + first.stderr
    # The values come from the stack's outputs, which moto leaves empty after a change
    # set (create-stack fills them); the labels show what an operator gets.
    for label in ("sensors connect to:", "archive:", "Athena workgroup:", "every reading once:"):
        assert label in first.stdout, first.stdout
    stack = aws_json(env, "cloudformation", "describe-stacks", "--stack-name", STACK)["Stacks"][0]
    assert stack["StackStatus"] == "CREATE_COMPLETE"
    resources = aws_json(env, "cloudformation", "describe-stack-resources",
                         "--stack-name", STACK)["StackResources"]
    names = {r.get("LogicalResourceId") for r in resources}
    assert {"ServerGroup", "Client1Group", "Client2Group", "Balancer", "SensorListener",
            "ServerTargets", "ReadingsBucket", "ServerLaunchTemplate"} <= names
    groups = aws_json(env, "autoscaling", "describe-auto-scaling-groups")["AutoScalingGroups"]
    servers = next(g for g in groups if g["AutoScalingGroupName"] == f"{STACK}-servers")
    assert sorted(servers["AvailabilityZones"]) == ["us-east-1a", "us-east-1b"]
    assert len(servers["Instances"]) == 2
    before = parameters(env, STACK)
    keys = aws(env, "s3", "ls", "--recursive", f"s3://{bucket}/")
    assert f"{before['ArtifactPrefix']}/x86_64/sensor-server" in keys

    # The same binaries again: nothing changes.
    again = deploy(env, *common, "--dist", str(DIST))
    assert again.returncode == 0, again.stdout + again.stderr
    assert parameters(env, STACK) == before

    # AWS publishes a newer AMI (played by setting an older one on the stack): a deploy
    # keeps the stack's AMI; --refresh-ami takes the newest.
    older = aws(env, "ec2", "describe-images", "--owners", "amazon", "--filters",
                "Name=architecture,Values=x86_64", "--query", "Images[0].ImageId",
                "--output", "text").strip()
    assert older != before["ImageId"]
    update = [f"ParameterKey={k},ParameterValue={v}" for k, v in before.items() if k != "ImageId"]
    aws(env, "cloudformation", "update-stack", "--stack-name", STACK,
        "--template-body", f"file://{TEMPLATE}",
        "--capabilities", "CAPABILITY_IAM", "--parameters",
        f"ParameterKey=ImageId,ParameterValue={older}", *update)
    # New binaries: a new content-addressed prefix, the AMI untouched.
    changed = tmp_path / "dist"
    shutil.copytree(DIST, changed)
    with open(changed / "sensor-client", "ab") as f:
        f.write(b"\0")
    rolled = deploy(env, *common, "--dist", str(changed))
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    after = parameters(env, STACK)
    assert after["ArtifactPrefix"] != before["ArtifactPrefix"]
    assert after["ClientSha256"] == sha256(changed / "sensor-client")
    assert after["ImageId"] == older, "no AMI change without --refresh-ami"
    refreshed = deploy(env, *common, "--dist", str(changed), "--refresh-ami")
    assert refreshed.returncode == 0, refreshed.stdout + refreshed.stderr
    assert parameters(env, STACK)["ImageId"] == before["ImageId"]


def test_deploy_makes_a_ca_once_and_puts_each_roles_key_in_parameter_store(moto, tmp_path):
    env = dict(moto)
    bucket = "sensorhub-tls-test"
    aws(env, "s3", "mb", f"s3://{bucket}")
    tls = tmp_path / "tls"
    common = ["--bucket", bucket, "--stack", "tls", "--region", REGION, "--dist", str(DIST),
              "--tls-dir", str(tls)]
    first = deploy(env, *common)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "CA: new" in first.stdout
    assert parameters(env, "tls")["SensorTransport"] == "tls"

    def parameter(name):
        return aws_json(env, "ssm", "get-parameter", "--name", name,
                        "--with-decryption")["Parameter"]
    for role, cert in (("server", "server"), ("sensors", "sensor-client1-temperature")):
        key = parameter(f"/sensorhub/tls/tls-{role}/key")
        assert key["Type"] == "SecureString"
        assert key["Value"].strip() == (tls / f"{cert}.key").read_text().strip()
        assert parameter(f"/sensorhub/tls/tls-{role}/cert")["Value"].strip() == (tls / f"{cert}.pem").read_text().strip()
        assert parameter(f"/sensorhub/tls/tls-{role}/ca")["Value"].strip() == (tls / "ca.pem").read_text().strip()
    assert oct((tls / "ca.key").stat().st_mode & 0o777) == "0o600"
    versions = {n: parameter(f"/sensorhub/tls/tls-server/{n}")["Version"] for n in ("cert", "key")}
    ca = (tls / "ca.pem").read_bytes()

    # Again: the same CA and certificates, no new parameter versions.
    again = deploy(env, *common)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "certificates in" not in again.stdout
    assert {n: parameter(f"/sensorhub/tls/tls-server/{n}")["Version"] for n in ("cert", "key")} == versions

    # Rotation: new certificates from the same CA; the parameters follow, and the
    # operator is told how running instances pick them up.
    rotated = deploy(env, *common, "--rotate-tls")
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    assert "CA: kept" in rotated.stdout and (tls / "ca.pem").read_bytes() == ca
    assert parameter("/sensorhub/tls/tls-server/key")["Version"] > versions["key"]
    assert "systemctl reload sensorhub-server" in rotated.stdout


def iam_allows(role, action, name):
    """Whether the role's inline policy (with AmazonSSMManagedInstanceCore's allow of
    every parameter read, which it carries too) lets `action` reach the parameter
    `name` of the stack "s": an explicit deny wins, as in IAM. Resources are the
    template's !Sub ARNs with the stack's values put in."""
    import fnmatch
    arn = f"arn:aws:ssm:us-east-1:111122223333:parameter{name}"
    values = {"${AWS::Partition}": "aws", "${AWS::Region}": "us-east-1",
              "${AWS::AccountId}": "111122223333", "${AWS::StackName}": "s"}

    def resolved(resource):
        text = resource["Sub"] if isinstance(resource, dict) else resource
        for key, value in values.items():
            text = text.replace(key, value)
        return text
    statements = statements_of(role)
    allowed = action in ("ssm:GetParameter", "ssm:GetParameters")  # the managed policy
    for statement in statements:
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        if action in actions and any(fnmatch.fnmatchcase(arn, resolved(r)) for r in resources):
            if statement["Effect"] == "Deny":
                return False
            allowed = True
    return allowed


def test_each_role_reads_its_own_tls_key_and_no_other():
    for role, own, other in (("ServerRole", "server", "sensors"), ("ClientRole", "sensors", "server")):
        for name in ("ca", "cert", "key"):
            assert iam_allows(role, "ssm:GetParameter", f"/sensorhub/s/tls-{own}/{name}"), (role, name)
        assert not iam_allows(role, "ssm:GetParameter", f"/sensorhub/s/tls-{other}/key"), role
        assert not iam_allows(role, "ssm:GetParameters", f"/sensorhub/s/tls-{other}/key"), role
        for path in ("/sensorhub/s", "/sensorhub", "/", f"/sensorhub/s/tls-{other}"):
            assert not iam_allows(role, "ssm:GetParametersByPath", path), (role, path)


def test_the_stacks_sensor_group_is_the_template_s_sensors():
    ids = {t["Value"] for name in ("Client1Group", "Client2Group")
           for t in template()["Resources"][name]["Properties"]["Tags"] if t["Key"] == "SensorId"}
    deploy_text = (REPO / "infra/deploy.sh").read_text()
    listed = re.search(r"^sensor_ids=(\S+)$", deploy_text, re.M).group(1)
    assert set(listed.split(",")) == ids
    name = re.search(r"^tls_server_name=(\S+)$", deploy_text, re.M).group(1)
    assert template()["Parameters"]["TlsServerName"]["Default"] == name


def tls_parameters(env, path, cert="cert-pem", key="key-pem"):
    """Puts PEM-looking values at PATH/{ca,cert,key}, the key a SecureString."""
    for name, value, kind in (("ca", "ca-pem", "String"), ("cert", cert, "String"),
                              ("key", key, "SecureString")):
        aws(env, "ssm", "put-parameter", "--name", f"{path}/{name}", "--type", kind,
            "--overwrite", "--value", f"-----BEGIN TEST-----\n{value}\n-----END TEST-----")


def test_tls_stage_fetches_from_parameter_store_and_keeps_the_last_copy(moto, tmp_path):
    path = "/sensorhub/stage/tls-server"
    run = tmp_path / "run/sensorhub-tls"
    run.mkdir(parents=True)
    args = ["--tls-parameters", path, "--into", "/run/sensorhub-tls", "--region", REGION]
    nothing = bootstrap(moto, tmp_path, *args, command="tls-stage")
    assert nothing.returncode != 0 and "no TLS material" in nothing.stderr
    assert not list(run.iterdir())

    tls_parameters(moto, path)
    staged = bootstrap(moto, tmp_path, *args, command="tls-stage")
    assert staged.returncode == 0, staged.stderr
    for name, value in (("ca", "ca-pem"), ("cert", "cert-pem"), ("key", "key-pem")):
        assert value in (run / f"{name}.pem").read_text()
        assert oct((run / f"{name}.pem").stat().st_mode & 0o777) == "0o400"
    assert oct((tmp_path / "etc/sensorhub/tls").stat().st_mode & 0o777) == "0o700"

    # Rotated: the next stage (a reload) brings the new key.
    tls_parameters(moto, path, key="rotated")
    assert bootstrap(moto, tmp_path, *args, command="tls-stage").returncode == 0
    assert "rotated" in (run / "key.pem").read_text()

    # Parameter Store out of reach, or a value that is not PEM: the last copy serves.
    broken = bootstrap(moto, tmp_path, *args, command="tls-stage",
                       AWS_ENDPOINT_URL="http://127.0.0.1:9", AWS_MAX_ATTEMPTS="1")
    assert broken.returncode == 0, broken.stderr
    assert "using the TLS files fetched before" in broken.stderr
    aws(moto, "ssm", "put-parameter", "--name", f"{path}/cert", "--type", "String",
        "--overwrite", "--value", "None")
    foreign = bootstrap(moto, tmp_path, *args, command="tls-stage")
    assert foreign.returncode == 0 and "is not PEM" in foreign.stderr
    assert "cert-pem" in (run / "cert.pem").read_text()
    assert "rotated" in (run / "key.pem").read_text()


def test_tls_units_stage_before_start_and_reload_by_sighup(moto, tmp_path):
    tls = ["--tls-parameters", "/sensorhub/t/tls-sensors", "--tls-server-name", "ingest.example"]
    no_name = bootstrap(moto, tmp_path / "unnamed", *install_args("client"), *tls[:2])
    assert no_name.returncode != 0 and "--tls-server-name" in no_name.stderr
    assert bootstrap(moto, tmp_path / "client", *install_args("client"), *tls).returncode == 0
    client = (tmp_path / "client/etc/systemd/system/sensorhub-client.service").read_text()
    assert ("--tls-ca /run/sensorhub-client-tls/ca.pem --tls-cert /run/sensorhub-client-tls/cert.pem "
            "--tls-key /run/sensorhub-client-tls/key.pem --tls-server-name ingest.example") in client
    assert "RuntimeDirectory=sensorhub-client-tls\nRuntimeDirectoryMode=0700\n" in client
    assert ("ExecStartPre=+/bin/bash /usr/local/lib/sensorhub/bootstrap.sh tls-stage "
            "--tls-parameters /sensorhub/t/tls-sensors --into /run/sensorhub-client-tls --region us-east-1") in client
    instance_id = instance(moto)
    volume = volume_of(moto, instance_id)
    root = tmp_path / "server"
    (root / "devices" / volume).mkdir(parents=True)
    result = bootstrap(moto, root, *install_args("server"), "--tls-parameters", "/sensorhub/t/tls-server",
                       SENSORHUB_INSTANCE_ID=instance_id, SENSORHUB_AZ="us-east-1a",
                       SENSORHUB_FAKE_VOLUMES=str(root / "devices"))
    assert result.returncode == 0, result.stderr
    server = (root / "etc/systemd/system/sensorhub-server.service").read_text()
    assert ("--tls-cert /run/sensorhub-tls/cert.pem --tls-key /run/sensorhub-tls/key.pem "
            "--tls-client-ca /run/sensorhub-tls/ca.pem") in server
    stage = ("+/bin/bash /usr/local/lib/sensorhub/bootstrap.sh tls-stage --tls-parameters "
             "/sensorhub/t/tls-server --into /run/sensorhub-tls --region us-east-1")
    assert f"ExecStartPre={stage}\n" in server
    assert f"ExecReload={stage}\nExecReload=/bin/kill -HUP $MAINPID\n" in server
    # The sandbox is unchanged: staging runs outside it ("+"), the service inside.
    shared = directives((REPO / "deploy/systemd/hardening.conf").read_text())
    assert directives(server) == shared and directives(client) == shared
    if shutil.which("systemd-analyze"):
        for role, unit in (("server", "sensorhub-server.service"), ("client", "sensorhub-client.service")):
            unit_root = tmp_path / role
            shutil.copytree("/usr/lib/systemd/system", unit_root / "usr/lib/systemd/system",
                            symlinks=True, dirs_exist_ok=True)
            (unit_root / "bin").mkdir(exist_ok=True)
            for tool in ("/bin/bash", "/bin/kill"):
                shutil.copy(tool, unit_root / tool.lstrip("/"))
            verify = subprocess.run(["systemd-analyze", "verify", f"--root={unit_root}",
                                     str(unit_root / "etc/systemd/system" / unit)],
                                    capture_output=True, text=True, timeout=60)
            assert verify.returncode == 0, verify.stderr


def test_deploy_refuses_binaries_for_another_architecture(moto):
    result = deploy(moto, "--bucket", BUCKET, "--stack", "s", "--region", REGION,
                    "--arch", "arm64", "--dist", str(DIST), "--dry-run")
    assert result.returncode != 0
    assert "built for another machine (e_machine 0x3e), not arm64" in result.stderr


def test_deploy_explains_a_failed_first_create_and_replaces_it_on_request(moto, tmp_path):
    # An aws CLI that reports the stack as ROLLBACK_COMPLETE and records deletions.
    fake = tmp_path / "bin"
    fake.mkdir()
    real = shutil.which("aws", path=moto["PATH"])
    (fake / "aws").write_text(f"""#!/usr/bin/env bash
case "$*" in
  *describe-stacks*StackStatus*) [ -e {tmp_path}/deleted ] && exit 255; echo ROLLBACK_COMPLETE ;;
  *delete-stack*) touch {tmp_path}/deleted ;;
  *wait\\ stack-delete-complete*) ;;
  *) exec {real} "$@" ;;
esac
""")
    (fake / "aws").chmod(0o755)
    env = dict(moto, PATH=f"{fake}:{moto['PATH']}")
    refused = deploy(env, "--bucket", BUCKET, "--stack", "broken", "--region", REGION,
                     "--dist", str(DIST))
    assert refused.returncode != 0
    assert "ROLLBACK_COMPLETE" in refused.stderr and "--replace-failed" in refused.stderr
    assert not (tmp_path / "deleted").exists()
    replaced = deploy(env, "--bucket", BUCKET, "--stack", "broken", "--region", REGION,
                      "--dist", str(DIST), "--replace-failed")
    assert (tmp_path / "deleted").exists(), replaced.stdout + replaced.stderr
    assert replaced.returncode == 0, replaced.stdout + replaced.stderr


def test_deploy_refuses_clearly(moto):
    env = dict(moto)
    missing = deploy(env, "--bucket", "no-such-bucket", "--stack", "s", "--allow-dirty")
    assert missing.returncode != 0 and "does not exist" in missing.stderr
    no_aws = deploy(dict(env, PATH="/usr/bin:/bin"), "--bucket", "b", "--stack", "s",
                    "--allow-dirty")
    assert no_aws.returncode != 0 and "aws CLI" in no_aws.stderr
    no_creds = deploy(
        {k: v for k, v in env.items() if not k.startswith("AWS_ACCESS")
         and not k.startswith("AWS_SECRET")} | {"AWS_CONFIG_FILE": "/dev/null",
                                                 "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"},
        "--bucket", "b", "--stack", "s", "--allow-dirty")
    assert no_creds.returncode != 0 and "credentials" in no_creds.stderr
    no_value = deploy(env, "--bucket")
    assert no_value.returncode != 0 and "--bucket needs a value" in no_value.stderr


def test_artifacts_in_an_sse_kms_bucket_can_be_downloaded():
    for role in ("ServerRole", "ClientRole"):
        kms = next(s for s in statements_of(role) if s["Sid"] == "ArtifactsKms")
        assert kms["Action"] == "kms:Decrypt"
        assert "kms:ViaService" in kms["Condition"]["StringEquals"]


# --- deploying a release ---------------------------------------------------------------------

def serve_release(tmp_path, tamper=False):
    """A local stand-in for GitHub's release downloads: TAG/NAME under a base URL."""
    release = tmp_path / "releases" / "v9.9.9"
    release.mkdir(parents=True)
    shutil.copy(DIST / "sensor-server", release / "sensor-server-x86_64")
    shutil.copy(DIST / "sensor-client", release / "sensor-client-x86_64")
    shutil.copy(TEMPLATE, release / "sensorhub.yaml")
    shutil.copy(BOOTSTRAP, release / "bootstrap.sh")
    names = ["sensor-server-x86_64", "sensor-client-x86_64", "sensorhub.yaml", "bootstrap.sh"]
    (release / "SHA256SUMS").write_text(
        "".join(f"{sha256(release / n)}  {n}\n" for n in names))
    if tamper:
        with open(release / "sensor-server-x86_64", "ab") as f:
            f.write(b"\0")
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(  # noqa: E731
        *a, directory=str(tmp_path / "releases"), **k)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *a: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, release


def test_deploy_from_a_release_verifies_its_sums_and_builds_nothing(moto, tmp_path):
    env = dict(moto)
    bucket = "sensorhub-release-test"
    aws(env, "s3", "mb", f"s3://{bucket}")
    server, release = serve_release(tmp_path)
    env["SENSORHUB_RELEASE_URL"] = f"http://127.0.0.1:{server.server_port}"
    env["PATH"] = ":".join(p for p in env["PATH"].split(":") if not (Path(p) / "gh").exists())
    try:
        result = deploy(env, "--release", "v9.9.9", "--repo", "owner/sensorhub",
                        "--bucket", bucket, "--stack", "released", "--region", REGION)
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SHA256SUMS verified" in result.stdout
    assert "attestations not checked" in result.stderr, "says what it could not check"
    assert "building" not in result.stdout
    params = parameters(env, "released")
    assert params["ArtifactPrefix"].startswith("sensorhub/v9.9.9/")
    assert params["BootstrapSha256"] == sha256(release / "bootstrap.sh")
    assert params["ServerSha256"] == sha256(release / "sensor-server-x86_64")
    keys = aws(env, "s3", "ls", "--recursive", f"s3://{bucket}/")
    assert f"{params['ArtifactPrefix']}/x86_64/sensor-server" in keys


def test_deploy_refuses_a_release_whose_binary_does_not_match_its_sums(moto, tmp_path):
    env = dict(moto)
    bucket = "sensorhub-tampered-test"
    aws(env, "s3", "mb", f"s3://{bucket}")
    server, _ = serve_release(tmp_path, tamper=True)
    env["SENSORHUB_RELEASE_URL"] = f"http://127.0.0.1:{server.server_port}"
    try:
        result = deploy(env, "--release", "v9.9.9", "--repo", "owner/sensorhub",
                        "--bucket", bucket, "--stack", "tampered", "--region", REGION)
    finally:
        server.shutdown()
    assert result.returncode != 0
    assert "sensor-server-x86_64 does not match SHA256SUMS of v9.9.9" in result.stderr
    assert aws(env, "s3", "ls", "--recursive", f"s3://{bucket}/").strip() == "", "nothing uploaded"
