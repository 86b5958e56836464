"""Tests of the AWS deployment without AWS: bootstrap.sh and deploy.sh run for real
against a moto_server on 127.0.0.1, and the units they write are checked by
systemd-analyze. Run by .ci/run in its venv: `pytest infra/test_infra.py`.
Needs the static binaries in dist/ (scripts/build-static.sh)."""

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DIST = REPO / "dist" / "x86_64"
BOOTSTRAP = REPO / "infra" / "bootstrap.sh"
BUCKET = "sensorhub-artifacts"
PREFIX = "sensorhub/test"
REGION = "us-east-1"


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def directives(text):
    """Hardening directives (KEY=VALUE lines) of a unit or of hardening.conf."""
    keep = ("DynamicUser", "NoNewPrivileges", "Protect", "Private", "Restrict", "Lock",
            "Memory", "RemoveIPC", "DevicePolicy", "Capability", "Ambient", "SystemCall",
            "UMask", "ProcSubset")
    return [line.strip() for line in text.splitlines()
            if line.strip().startswith(keep)]


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    """A moto_server on a free loopback port, with credentials for it in the env."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(Path(os.environ.get("MOTO_LOG", tmp_path_factory.mktemp("moto") / "moto.log")), "w")
    proc = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=log)
    endpoint = f"http://127.0.0.1:{port}"
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_DEFAULT_REGION=REGION, AWS_ENDPOINT_URL=endpoint,
               AWS_EC2_METADATA_DISABLED="true")
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "moto_server did not start"
            time.sleep(0.2)
    aws(env, "s3", "mb", f"s3://{BUCKET}")
    for tool in ("sensor-server", "sensor-client"):
        aws(env, "s3", "cp", str(DIST / tool), f"s3://{BUCKET}/{PREFIX}/x86_64/{tool}")
    yield env
    proc.kill()
    proc.wait(timeout=10)


def aws(env, *args):
    return subprocess.run(["aws", *args], env=env, check=True, capture_output=True,
                          text=True, timeout=120).stdout


def bootstrap(env, root, role="server", server_sha=None, client_sha=None):
    env = dict(env, SENSORHUB_ROOT=str(root), SENSORHUB_S3_ENDPOINT=env["AWS_ENDPOINT_URL"],
               SENSORHUB_START=f'echo "started $UNIT" > {root}/started')
    args = ["bash", str(BOOTSTRAP), "--role", role, "--bucket", BUCKET, "--prefix", PREFIX,
            "--arch", "x86_64",
            "--server-sha256", server_sha or sha256(DIST / "sensor-server"),
            "--client-sha256", client_sha or sha256(DIST / "sensor-client")]
    if role == "client":
        args += ["--server", "10.42.1.10:5000", "--sensor", "client1-temperature",
                 "--kind", "temperature", "--interval-ms", "1000"]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)


def test_bootstrap_hardening_is_the_shared_hardening():
    shared = directives((REPO / "deploy/systemd/hardening.conf").read_text())
    embedded = directives(BOOTSTRAP.read_text())
    assert shared and embedded == shared


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


def test_correct_checksums_install_binaries_and_units(moto, tmp_path):
    for role, unit in (("server", "sensorhub-server.service"),
                       ("client", "sensorhub-client.service")):
        root = tmp_path / role
        result = bootstrap(moto, root, role)
        assert result.returncode == 0, result.stderr
        for tool in ("sensor-server", "sensor-client"):
            installed = root / "usr/local/bin" / tool
            assert installed.read_bytes() == (DIST / tool).read_bytes()
            assert os.access(installed, os.X_OK)
        text = (root / "etc/systemd/system" / unit).read_text()
        assert directives(text) == directives((REPO / "deploy/systemd/hardening.conf").read_text())
        assert (root / "started").read_text() == f"started {unit}\n"
        if role == "client":
            assert "--server 10.42.1.10:5000 --sensor client1-temperature" in text


def test_a_wrong_checksum_installs_nothing_and_fails(moto, tmp_path):
    result = bootstrap(moto, tmp_path, "server", server_sha="0" * 64)
    assert result.returncode != 0
    assert "SHA-256 mismatch" in result.stderr
    assert not (tmp_path / "usr").exists()
    assert not (tmp_path / "etc").exists()
    assert not (tmp_path / "started").exists()


def test_units_verify_and_score_well_in_systemd_analyze(moto, tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze not installed")
    scores = {}
    for role, unit in (("server", "sensorhub-server.service"),
                       ("client", "sensorhub-client.service")):
        root = tmp_path / role
        assert bootstrap(moto, root, role).returncode == 0
        path = root / "etc/systemd/system" / unit
        # verify resolves dependencies (sysinit.target, ...) inside the root.
        shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system",
                        symlinks=True, dirs_exist_ok=True)
        verify = subprocess.run(["systemd-analyze", "verify", f"--root={root}", str(path)],
                                capture_output=True, text=True, timeout=60)
        assert verify.returncode == 0, verify.stderr
        security = subprocess.run(
            ["systemd-analyze", "security", "--offline=true", f"--root={root}", str(path)],
            capture_output=True, text=True, timeout=60)
        match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\S+)", security.stdout)
        assert match, security.stdout + security.stderr
        scores[unit] = (float(match.group(1)), match.group(2))
        print(f"systemd-analyze security {unit}: {match.group(1)} {match.group(2)}")
    for unit, (score, _) in scores.items():
        assert score < 2.0, f"{unit}: exposure {score}"


def test_deploy_uploads_and_creates_the_stack(moto, tmp_path):
    env = dict(moto)
    bucket = "sensorhub-deploy-test"
    aws(env, "s3", "mb", f"s3://{bucket}")
    # The template's ImageId resolves the public AL2023 parameter, which moto serves.
    result = subprocess.run(
        [str(REPO / "infra/deploy.sh"), "--bucket", bucket, "--stack", "sensorhub-test",
         "--region", REGION, "--arch", "x86_64", "--allow-dirty", "--builder", "cargo"],
        env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    keys = aws(env, "s3", "ls", "--recursive", f"s3://{bucket}/")
    for key in ("x86_64/sensor-server", "x86_64/sensor-client", "bootstrap.sh"):
        assert key in keys, keys
    stack = json.loads(aws(env, "cloudformation", "describe-stacks", "--stack-name",
                           "sensorhub-test"))["Stacks"][0]
    assert stack["StackStatus"] == "CREATE_COMPLETE", stack["StackStatus"]
    resources = json.loads(aws(env, "cloudformation", "describe-stack-resources",
                               "--stack-name", "sensorhub-test"))["StackResources"]
    types = {r.get("LogicalResourceId"): r.get("ResourceType") for r in resources}
    for name in ("Vpc", "ServerSubnet", "ClientSubnet", "ServerSecurityGroup", "InstanceRole",
                 "Server", "Client1", "Client2"):
        assert name in types, sorted(types)
    # A second run of the same commit changes nothing and still succeeds.
    again = subprocess.run(
        [str(REPO / "infra/deploy.sh"), "--bucket", bucket, "--stack", "sensorhub-test",
         "--region", REGION, "--allow-dirty", "--builder", "cargo"],
        env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert again.returncode == 0, again.stdout + again.stderr


def test_deploy_refuses_clearly(moto, tmp_path):
    env = dict(moto)
    missing = subprocess.run(
        [str(REPO / "infra/deploy.sh"), "--bucket", "no-such-bucket", "--stack", "s",
         "--allow-dirty"], env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert missing.returncode != 0 and "does not exist" in missing.stderr
    no_aws = subprocess.run(
        [str(REPO / "infra/deploy.sh"), "--bucket", "b", "--stack", "s", "--allow-dirty"],
        env=dict(env, PATH="/usr/bin:/bin"), capture_output=True, text=True, timeout=60,
        cwd=REPO)
    assert no_aws.returncode != 0 and "aws CLI" in no_aws.stderr
    no_creds = subprocess.run(
        [str(REPO / "infra/deploy.sh"), "--bucket", "b", "--stack", "s", "--allow-dirty"],
        env={k: v for k, v in env.items() if not k.startswith("AWS_ACCESS")
             and not k.startswith("AWS_SECRET")} | {"AWS_CONFIG_FILE": "/dev/null",
                                                     "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"},
        capture_output=True, text=True, timeout=60, cwd=REPO)
    assert no_creds.returncode != 0 and "credentials" in no_creds.stderr
