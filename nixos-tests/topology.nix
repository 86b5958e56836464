# The original design's topology as NixOS VMs: `server` in the server subnet (vlan 1),
# `client1` (temperature) and `client2` (humidity) in the client subnet (vlan 2),
# `router` forwarding between them. The steps and assertions live in scenario.py,
# shared with the network-namespace run (netns.py); this file only says how to act on
# VMs. Exposed as checks.x86_64-linux.topology.
#
# Addresses come from the test driver (nixos/lib/testing/network.nix):
# 192.168.<vlan>.<node number>, node numbers in name order: client1 = 1,
# client2 = 2, router = 3, server = 4; interfaces eth1, eth2 in vlan order.
{ pkgs, module }:

let
  intervalMs = 100;
  serverAddress = "192.168.1.4";
  routerOnServerSide = "192.168.1.3";
  routerOnClientSide = "192.168.2.3";

  clientNode = name: kind: { lib, ... }: {
    imports = [ module ];
    virtualisation.vlans = [ 2 ];
    networking.interfaces.eth1.ipv4.routes = [
      { address = "192.168.1.0"; prefixLength = 24; via = routerOnClientSide; }
    ];
    services.sensorhub.clients.${name} = {
      server = "${serverAddress}:5000";
      sensor = "${name}-${kind}";
      inherit kind intervalMs;
      extraArgs = [ "--record" "/var/lib/sensorhub-client-${name}/answers.txt" ];
    };
    # The scenario starts the clients after the server.
    systemd.services."sensorhub-client-${name}".wantedBy = lib.mkForce [ ];
  };
in
pkgs.testers.runNixOSTest {
  name = "sensorhub-topology";

  nodes = {
    router = {
      virtualisation.vlans = [ 1 2 ];
      boot.kernel.sysctl."net.ipv4.ip_forward" = 1;
      networking.firewall.enable = false;
    };

    server = { pkgs, ... }: {
      imports = [ module ];
      virtualisation.vlans = [ 1 ];
      networking.interfaces.eth1.ipv4.routes = [
        { address = "192.168.2.0"; prefixLength = 24; via = routerOnServerSide; }
      ];
      services.sensorhub.server = {
        enable = true;
        httpListen = "127.0.0.1:9000";
      };
      # The sensor port is open to the client subnet only (the VPC's security group).
      networking.firewall.extraCommands = ''
        iptables -A nixos-fw -p tcp -s 192.168.2.0/24 --dport 5000 -j nixos-fw-accept
      '';
      environment.systemPackages = [ pkgs.curl ];
    };

    client1 = clientNode "client1" "temperature";
    client2 = clientNode "client2" "humidity";
  };

  # The scenario is loaded from scenario.py at run time, which the type checker
  # cannot follow; pyflakes still lints this script.
  skipTypeCheck = true;

  testScript = ''
    import importlib.util

    spec = importlib.util.spec_from_file_location("scenario", "${./scenario.py}")
    assert spec is not None and spec.loader is not None
    scenario = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scenario)

    machines = {"client1": client1, "client2": client2}


    class Vms:
        interval_ms = ${toString intervalMs}

        def http(self, path):
            return server.succeed(f"curl -sf http://127.0.0.1:9000{path}")

        def start_server(self):
            server.succeed("systemctl start sensorhub-server")
            server.wait_for_open_port(5000)

        def crash_server(self):
            server.succeed("systemctl kill --signal=SIGKILL sensorhub-server")

        def stop_server(self):
            server.succeed("systemctl stop sensorhub-server")
            server.succeed("test $(systemctl show -P ExecMainStatus sensorhub-server) = 0")

        def start_client(self, name):
            machines[name].succeed(f"systemctl start sensorhub-client-{name}")

        def stop_client(self, name):
            machines[name].succeed(f"systemctl stop sensorhub-client-{name}")

        def cut(self, name):
            machines[name].block()

        def restore(self, name):
            machines[name].unblock()

        def exchange(self, name, data, timeout):
            command = scenario.exchange_command("${serverAddress}", 5000, data, timeout)
            return machines[name].succeed(command).encode()

        def store_text(self):
            return server.succeed("cat /var/lib/sensorhub/*.jsonl")

        def answers(self, name):
            return machines[name].succeed(f"cat /var/lib/sensorhub-client-{name}/answers.txt")

        def summary(self, name):
            return machines[name].succeed(
                f"journalctl -u sensorhub-client-{name} -o cat | grep '^sent' | tail -n 1"
            )

        def sensor(self, name):
            return {"client1": "client1-temperature", "client2": "client2-humidity"}[name]


    start_all()
    server.wait_for_unit("sensorhub-server.service")
    server.wait_for_open_port(5000)
    router.wait_for_unit("network.target")
    for machine in (client1, client2):
        machine.wait_for_unit("network.target")
        machine.wait_until_succeeds("ping -c 1 ${serverAddress}")

    with subtest("the sensor port is closed to hosts outside the client subnet"):
        router.fail("timeout 5 bash -c 'exec 3<>/dev/tcp/${serverAddress}/5000'")
        client1.succeed("timeout 5 bash -c 'exec 3<>/dev/tcp/${serverAddress}/5000'")

    with subtest("scenario: readings flow, faults lose nothing"):
        for line in scenario.run(Vms(), log=print):
            print(line)
  '';
}
