# NixOS module: services.sensorhub.server and services.sensorhub.clients.<name>.
# flake.nix's nixosModules.default imports this and sets services.sensorhub.package
# to the flake's build.
{ config, lib, ... }:

let
  inherit (lib) mkOption mkEnableOption mkIf types;
  cfg = config.services.sensorhub;

  # The sandbox shared with the EC2 units (deploy/systemd/hardening.conf).
  hardening = import ./hardening.nix ../deploy/systemd/hardening.conf;

  server = cfg.server;
  serverArgs = [
    "--listen"
    "${server.listenAddress}:${toString server.port}"
    "--data-dir"
    "/var/lib/sensorhub"
    "--fsync"
    server.fsync
    "--max-connections"
    (toString server.maxConnections)
    "--idle-timeout"
    (toString server.idleTimeout)
  ]
  ++ lib.optionals (server.httpListen != null) [ "--http-listen" server.httpListen ]
  ++ lib.optionals (server.workers != null) [ "--workers" (toString server.workers) ]
  ++ server.extraArgs;

  clientArgs = c: [
    "--server"
    c.server
    "--sensor"
    c.sensor
    "--kind"
    c.kind
    "--interval-ms"
    (toString c.intervalMs)
  ] ++ c.extraArgs;

  clientModule = { name, ... }: {
    options = {
      server = mkOption {
        type = types.str;
        example = "10.0.1.10:5000";
        description = "HOST:PORT of the sensor-server to send readings to.";
      };
      sensor = mkOption {
        type = types.strMatching "[A-Za-z0-9._:-]{1,64}";
        default = name;
        description = "Sensor id (1 to 64 of A-Z a-z 0-9 . _ : -).";
      };
      kind = mkOption {
        type = types.strMatching "[a-z0-9_]{1,32}";
        default = "temperature";
        example = "humidity";
        description = "Kind of reading: temperature, humidity, or another [a-z0-9_] name.";
      };
      intervalMs = mkOption {
        type = types.ints.positive;
        default = 1000;
        description = "Milliseconds between readings.";
      };
      extraArgs = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "--record" "/var/lib/sensorhub-client-x/answers.txt" ];
        description = "More sensor-client arguments.";
      };
    };
  };
in
{
  options.services.sensorhub = {
    package = mkOption {
      type = types.package;
      description = "The sensorhub package (both binaries).";
    };

    server = {
      enable = mkEnableOption "the sensorhub ingest server";
      package = mkOption {
        type = types.package;
        default = cfg.package;
        defaultText = lib.literalExpression "config.services.sensorhub.package";
        description = "Package providing sensor-server.";
      };
      listenAddress = mkOption {
        type = types.str;
        default = "0.0.0.0";
        description = "Address for sensor connections (IPv6 in brackets).";
      };
      port = mkOption {
        type = types.port;
        default = 5000;
        description = "Port for sensor connections.";
      };
      httpListen = mkOption {
        type = types.nullOr types.str;
        default = "127.0.0.1:9000";
        description = "ADDR:PORT of the HTTP side port (/healthz, /metrics, /sensors), or null for none.";
      };
      workers = mkOption {
        type = types.nullOr types.ints.positive;
        default = null;
        description = "Worker threads; null for one per core.";
      };
      fsync = mkOption {
        type = types.enum [ "always" "never" ];
        default = "always";
        description = "Acknowledge readings after fsync (always) or after the write (never).";
      };
      maxConnections = mkOption {
        type = types.ints.positive;
        default = 10000;
        description = "Sensor connections served at once; more are told \"server busy\".";
      };
      idleTimeout = mkOption {
        type = types.ints.unsigned;
        default = 300;
        description = "Seconds before a silent connection is closed (0 = never).";
      };
      openFirewall = mkOption {
        type = types.bool;
        default = false;
        description = "Open the sensor port in the firewall (to everyone; restrict sources with firewall rules of your own).";
      };
      extraArgs = mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = "More sensor-server arguments.";
      };
    };

    clients = mkOption {
      type = types.attrsOf (types.submodule clientModule);
      default = { };
      example = lib.literalExpression ''
        { client1-temperature = { server = "10.0.1.10:5000"; kind = "temperature"; }; }
      '';
      description = "Simulated sensors, one sensor-client service each.";
    };
  };

  config = lib.mkMerge [
    (mkIf server.enable {
      networking.firewall.allowedTCPPorts = lib.optional server.openFirewall server.port;
      systemd.services.sensorhub-server = {
        description = "sensorhub ingest server";
        wantedBy = [ "multi-user.target" ];
        after = [ "network.target" ];
        serviceConfig = hardening // {
          ExecStart = "${lib.getExe' server.package "sensor-server"} ${lib.escapeShellArgs serverArgs}";
          Restart = "always";
          RestartSec = "1s";
          StateDirectory = "sensorhub";
          # Connections plus the store, listeners and a margin.
          LimitNOFILE = server.maxConnections + 1024;
          # SIGTERM drains within 10 s by contract.
          TimeoutStopSec = "15s";
        };
      };
    })
    {
      systemd.services = lib.mapAttrs'
        (name: c: lib.nameValuePair "sensorhub-client-${name}" {
          description = "sensorhub simulated sensor ${c.sensor}";
          wantedBy = [ "multi-user.target" ];
          wants = [ "network-online.target" ];
          after = [ "network-online.target" ];
          serviceConfig = hardening // {
            ExecStart = "${lib.getExe' cfg.package "sensor-client"} ${lib.escapeShellArgs (clientArgs c)}";
            Restart = "always";
            RestartSec = "1s";
            StateDirectory = "sensorhub-client-${name}";
          };
        })
        cfg.clients;
    }
  ];
}
