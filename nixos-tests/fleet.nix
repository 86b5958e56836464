# The fleet as NixOS VMs: `servera` and `serverb` (the NixOS module, archiving to S3)
# behind `balancer` (services.haproxy, the NLB's local stand-in) in the server subnet
# with `s3` (moto_server, as the namespace run uses), the two simulated sensors in the client subnet connecting to the
# balancer, `router` between the subnets. The steps and the verdict are
# scenario.run_fleet, shared with the network-namespace run (netns.py --fleet), whose
# verdict comes from the repo's Athena SQL run by DuckDB over the downloaded bucket.
# Exposed as checks.x86_64-linux.fleet. Addresses and names: topology.json.
#
# With `tls = true` (checks.x86_64-linux.fleet-tls) TLS runs end to end through the
# balancer's TCP pass-through: the servers require a client certificate per sensor, and
# their certificate names the balancer's address, which the sensors dial (as
# netns.py --fleet --tls).
{ pkgs, module, tls ? false, package ? null }:

let
  inherit (pkgs) lib;
  topology = builtins.fromJSON (builtins.readFile ./topology.json);
  layout = topology.fleet;
  hosts = layout.hosts;
  pki =
    if tls then
      import ./pki.nix
        {
          inherit pkgs package;
          serverName = hosts.balancer.address;
          sensors = map (name: topology.sensors.${name}.sensor) (builtins.attrNames topology.sensors);
        } else null;
  common = import ./common.nix { inherit module layout pki; target = hosts.balancer.address; };
  inherit (common) sensorPort httpPort toClientSubnet clientNode;
  s3Port = toString topology.s3_port;
  s3Endpoint = "http://${hosts.s3.address}:${s3Port}";

  # Test-only credentials for the servers' and the driver's AWS CLI (moto takes any).
  credentials = {
    user = "sensorhub";
    password = "sensorhub-test-secret";
  };
  # The S3 stand-in: moto_server, the one the namespace run (netns.py --fleet) and the
  # tests use, so both drivers see the same S3. Not MinIO: nixpkgs marks it insecure
  # (knownVulnerabilities; abandoned upstream), and a test node cannot permit it.
  # moto_server needs flask and flask-cors beside moto (its "server" extra).
  motoServer = pkgs.python3.withPackages (p: [ p.moto p.flask p.flask-cors ]);
  awsEnvironment = pkgs.writeText "aws-environment" ''
    AWS_ACCESS_KEY_ID=${credentials.user}
    AWS_SECRET_ACCESS_KEY=${credentials.password}
    AWS_DEFAULT_REGION=us-east-1
  '';

  haproxyConfig = builtins.replaceStrings
    [ "@SENSOR_PORT@" "@HTTP_PORT@" "@SERVERS@" ]
    [
      sensorPort
      httpPort
      (lib.concatMapStringsSep "\n"
        (name: "    server ${name} ${hosts.${name}.address}:${sensorPort} check")
        layout.servers)
    ]
    (builtins.readFile ./haproxy.cfg);

  serverNode = name: { lib, ... }: {
    imports = [ module ];
    virtualisation.vlans = [ 1 ];
    networking.interfaces.eth1.ipv4.routes = toClientSubnet;
    services.sensorhub.server = {
      enable = true;
      # The balancer checks /healthz from its own address.
      httpListen = "0.0.0.0:${httpPort}";
      segmentMaxAge = layout.segment_max_age;
      archive = {
        inherit (layout) bucket prefix;
        endpoint = s3Endpoint;
        hostId = name;
        stopTimeout = layout.archive_stop_timeout;
        environmentFile = awsEnvironment;
      };
    } // lib.optionalAttrs tls {
      tls = {
        certificate = "${pki}/server.pem";
        key = "${pki}/server.key";
        clientCa = "${pki}/ca.pem";
      };
    };
    networking.firewall.allowedTCPPorts = [ topology.sensor_port topology.http_port ];
    # The scenario starts, kills and restarts the servers itself: systemd must not.
    systemd.services.sensorhub-server = {
      wantedBy = lib.mkForce [ ];
      serviceConfig.Restart = lib.mkForce "no";
    };
    environment.systemPackages = [ pkgs.curl ];
  };

in
pkgs.testers.runNixOSTest {
  name = if tls then "sensorhub-fleet-tls" else "sensorhub-fleet";

  nodes = {
    inherit (common) router;

    balancer = { lib, ... }: {
      virtualisation.vlans = [ 1 ];
      networking.interfaces.eth1.ipv4.routes = toClientSubnet;
      services.haproxy = {
        enable = true;
        config = haproxyConfig;
      };
      systemd.services.haproxy.wantedBy = lib.mkForce [ ];
      networking.firewall.allowedTCPPorts = [ topology.sensor_port ];
    };

    s3 = {
      virtualisation.vlans = [ 1 ];
      systemd.services.moto-s3 = {
        description = "moto_server, the S3 stand-in";
        wantedBy = [ "multi-user.target" ];
        after = [ "network.target" ];
        serviceConfig = {
          ExecStart = "${motoServer}/bin/moto_server -H 0.0.0.0 -p ${s3Port}";
          DynamicUser = true;
        };
      };
      networking.firewall.allowedTCPPorts = [ topology.s3_port ];
      environment.systemPackages = [ pkgs.awscli2 ];
    };

    servera = serverNode "servera";
    serverb = serverNode "serverb";
    client1 = clientNode "client1";
    client2 = clientNode "client2";
  };

  # DuckDB runs the repo's SQL over the archive in the driver, as in CI.
  extraPythonPackages = p: [ p.duckdb ];

  # Why skipTypeCheck: the scenario and archive_sql modules are loaded from files at
  # run time (importlib), so mypy sees them as Any and cannot check the driver class's
  # calls; pyflakes still lints this script, and the same scenario runs in CI under
  # the namespace driver.
  skipTypeCheck = true;

  testScript = ''
    import importlib.util
    import json
    from pathlib import Path


    def load(name, path):
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


    # The whole directory, so that scenario.py finds topology.json beside it.
    scenario = load("scenario", "${./.}/scenario.py")
    archive_sql = load("archive_sql", "${../infra/athena}/archive_sql.py")
    layout = scenario.TOPOLOGY["fleet"]
    servers = {"servera": servera, "serverb": serverb}
    clients = {"client1": client1, "client2": client2}
    aws = ("AWS_ACCESS_KEY_ID=${credentials.user} AWS_SECRET_ACCESS_KEY=${credentials.password} "
           "AWS_DEFAULT_REGION=us-east-1 aws --endpoint-url http://127.0.0.1:${s3Port}")


    class Vms:
        interval_ms = scenario.TOPOLOGY["interval_ms"]

        def start_s3(self):
            s3.wait_for_unit("moto-s3.service")
            s3.wait_for_open_port(${s3Port})
            s3.wait_until_succeeds(f"{aws} s3api create-bucket --bucket {layout['bucket']}")

        def cut_s3(self):
            s3.block()

        def restore_s3(self):
            s3.unblock()

        def start_balancer(self):
            balancer.succeed("systemctl start haproxy")
            balancer.wait_for_open_port(${sensorPort})

        def start_server(self, name):
            servers[name].succeed("systemctl start sensorhub-server")
            servers[name].wait_for_open_port(${sensorPort})

        def crash_server(self, name):
            servers[name].succeed("systemctl kill --signal=SIGKILL sensorhub-server")

        def stop_server(self, name):
            servers[name].succeed("systemctl stop sensorhub-server")
            servers[name].succeed("test $(systemctl show -P ExecMainStatus sensorhub-server) = 0")

        def server_log(self, name):
            return servers[name].succeed("journalctl -u sensorhub-server -o cat")

        def http(self, name, path):
            return servers[name].succeed(f"curl -sf http://127.0.0.1:${httpPort}{path}")

        def start_client(self, name):
            clients[name].succeed(f"systemctl start sensorhub-client-{name}")

        def stop_client(self, name):
            clients[name].succeed(f"systemctl stop sensorhub-client-{name}")

        def answers(self, name):
            return clients[name].succeed(f"cat /var/lib/sensorhub-client-{name}/answers.txt")

        def summary(self, name):
            return clients[name].succeed(
                f"journalctl -u sensorhub-client-{name} -o cat | grep '^sent' | tail -n 1"
            )

        def sensor(self, name):
            return scenario.TOPOLOGY["sensors"][name]["sensor"]

        def archive_sql(self, name):
            root = s3.out_dir / "archive"
            if not root.exists():
                s3.succeed(f"{aws} s3 cp --recursive --only-show-errors "
                           f"s3://{layout['bucket']}/{layout['prefix']} /tmp/archive")
                s3.copy_from_vm("/tmp/archive", "")
            return archive_sql.query(archive_sql.connect(root), name)

        def stored_records(self, name):
            text = servers[name].succeed("cat /var/lib/sensorhub/*.jsonl")
            return [json.loads(line) for line in text.splitlines()]


    start_all()
    router.wait_for_unit("network.target")
    for machine in (*servers.values(), *clients.values(), balancer):
        machine.wait_for_unit("network.target")
    for machine in clients.values():
        machine.wait_until_succeeds("ping -c 1 ${hosts.balancer.address}")

    # One subtest per scenario step.
    for line in scenario.run_fleet(Vms(), log=print, step=subtest):
        print(line)
    print("archive copy kept in", Path(s3.out_dir) / "archive")
  '';
}
