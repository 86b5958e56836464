# The original design's topology as NixOS VMs: `server` in the server subnet (vlan 1),
# `client1` (temperature) and `client2` (humidity) in the client subnet (vlan 2),
# `router` forwarding between them. The steps and assertions live in scenario.py,
# shared with the network-namespace and qemu runs (netns.py, qemu.py); this file only
# says how to act on VMs. Exposed as checks.x86_64-linux.topology.
#
# Addresses and names come from topology.json, which every driver reads; they match
# what the test driver assigns (nixos/lib/testing/network.nix):
# 192.168.<vlan>.<node number>, node numbers in name order, interfaces eth1, eth2 in
# vlan order.
#
# With `tls = true` (checks.x86_64-linux.topology-tls) the sensor port requires a client
# certificate per sensor; `package`'s `sensor-server certs` makes them at build time,
# and the module stages them into each unit (the scenario's hostile peer then checks
# that plain bytes are refused).
{ pkgs, module, tls ? false, package ? null }:

let
  topology = builtins.fromJSON (builtins.readFile ./topology.json);
  layout = topology.topology;
  serverAddress = layout.hosts.server.address;
  pki =
    if tls then
      import ./pki.nix
        {
          inherit pkgs package;
          serverName = serverAddress;
          sensors = map (name: topology.sensors.${name}.sensor) (builtins.attrNames topology.sensors);
        } else null;
  common = import ./common.nix { inherit module layout pki; target = serverAddress; };
  inherit (common) sensorPort httpPort clientNode;
in
pkgs.testers.runNixOSTest {
  name = if tls then "sensorhub-topology-tls" else "sensorhub-topology";

  nodes = {
    inherit (common) router;

    server = { pkgs, ... }: {
      imports = [ module ];
      virtualisation.vlans = [ 1 ];
      networking.interfaces.eth1.ipv4.routes = common.toClientSubnet;
      services.sensorhub.server = {
        enable = true;
        httpListen = "127.0.0.1:${httpPort}";
      } // pkgs.lib.optionalAttrs tls {
        tls = {
          certificate = "${pki}/server.pem";
          key = "${pki}/server.key";
          clientCa = "${pki}/ca.pem";
        };
      };
      # The sensor port is open to the client subnet only (the VPC's security group).
      networking.firewall.extraCommands = ''
        iptables -A nixos-fw -p tcp -s ${topology.client_subnet} --dport ${sensorPort} -j nixos-fw-accept
      '';
      environment.systemPackages = [ pkgs.curl ];
    };

    client1 = clientNode "client1";
    client2 = clientNode "client2";
  };

  # Why skipTypeCheck: the scenario module is loaded from a file at run time
  # (importlib), so mypy sees `scenario` as Any and the driver class's methods as
  # untyped calls it cannot check against the VMs' API; pyflakes still lints this
  # script, and the same scenario runs in CI under the namespace and qemu drivers.
  skipTypeCheck = true;

  testScript = ''
    import importlib.util

    # The whole directory, so that scenario.py finds topology.json beside it.
    spec = importlib.util.spec_from_file_location("scenario", "${./.}/scenario.py")
    assert spec is not None and spec.loader is not None
    scenario = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scenario)

    machines = {"client1": client1, "client2": client2}


    class Vms:
        interval_ms = scenario.TOPOLOGY["interval_ms"]
        tls = ${if tls then "True" else "False"}

        def http(self, path):
            return server.succeed(f"curl -sf http://127.0.0.1:${httpPort}{path}")

        def start_server(self):
            server.succeed("systemctl start sensorhub-server")
            server.wait_for_open_port(${sensorPort})

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
            command = scenario.exchange_command("${serverAddress}", ${sensorPort}, data, timeout)
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
            return scenario.TOPOLOGY["sensors"][name]["sensor"]


    start_all()
    server.wait_for_unit("sensorhub-server.service")
    server.wait_for_open_port(${sensorPort})
    router.wait_for_unit("network.target")
    for machine in (client1, client2):
        machine.wait_for_unit("network.target")
        machine.wait_until_succeeds("ping -c 1 ${serverAddress}")

    with subtest("the sensor port is closed to hosts outside the client subnet"):
        router.fail("timeout 5 bash -c 'exec 3<>/dev/tcp/${serverAddress}/${sensorPort}'")
        client1.succeed("timeout 5 bash -c 'exec 3<>/dev/tcp/${serverAddress}/${sensorPort}'")

    # One subtest per scenario step.
    for line in scenario.run(Vms(), log=print, step=subtest):
        print(line)
  '';
}
