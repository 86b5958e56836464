# What the NixOS topology and fleet tests share: the constants of topology.json, the
# router node, static routes, and the simulated sensor node. `layout` is topology.json's
# "topology" or "fleet"; `target` is where sensors send (the server, or the balancer).
# With `pki` (a directory `sensor-server certs` made), the sensors speak TLS with a
# client certificate each.
{ module, layout, target, pki ? null }:

let
  topology = builtins.fromJSON (builtins.readFile ./topology.json);

  # "192.168.1.0/24" -> { address = "192.168.1.0"; prefixLength = 24; }
  route = subnet: via:
    let parts = builtins.split "/" subnet;
    in { address = builtins.elemAt parts 0; prefixLength = builtins.fromJSON (builtins.elemAt parts 2); inherit via; };
in
{
  inherit topology route;
  sensorPort = toString topology.sensor_port;
  httpPort = toString topology.http_port;
  toServerSubnet = [ (route topology.server_subnet layout.router.client_side) ];
  toClientSubnet = [ (route topology.client_subnet layout.router.server_side) ];

  router = {
    virtualisation.vlans = [ 1 2 ];
    boot.kernel.sysctl."net.ipv4.ip_forward" = 1;
    networking.firewall.enable = false;
  };

  # A simulated sensor in the client subnet; the scenario starts it.
  clientNode = name: { lib, ... }: {
    imports = [ module ];
    virtualisation.vlans = [ 2 ];
    networking.interfaces.eth1.ipv4.routes = [ (route topology.server_subnet layout.router.client_side) ];
    services.sensorhub.clients.${name} = {
      server = "${target}:${toString topology.sensor_port}";
      inherit (topology.sensors.${name}) sensor kind;
      intervalMs = topology.interval_ms;
      extraArgs = [ "--record" "/var/lib/sensorhub-client-${name}/answers.txt" ];
    } // lib.optionalAttrs (pki != null) {
      # Test keys from the store (made at build time); the module warns about that,
      # rightly for real keys.
      tls = {
        ca = "${pki}/ca.pem";
        certificate = "${pki}/sensor-${topology.sensors.${name}.sensor}.pem";
        key = "${pki}/sensor-${topology.sensors.${name}.sensor}.key";
      };
    };
    systemd.services."sensorhub-client-${name}".wantedBy = lib.mkForce [ ];
  };
}
