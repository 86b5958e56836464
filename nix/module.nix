# NixOS module: services.sensorhub.server and services.sensorhub.clients.<name>.
# flake.nix's nixosModules.default imports this and sets services.sensorhub.package
# to the flake's build.
{ config, lib, pkgs, utils, ... }:

let
  inherit (lib) mkOption mkEnableOption mkIf types;
  cfg = config.services.sensorhub;

  # The sandbox shared with the EC2 units (deploy/systemd/hardening.conf).
  hardening = import ./hardening.nix ../deploy/systemd/hardening.conf;

  server = cfg.server;
  archive = server.archive;

  # TLS files are read where the user keeps them (agenix, sops-nix, ACME: root-only
  # paths outside the world-readable store) by a root step before each start and on
  # reload ("+": outside the sandbox), which copies them into the unit's runtime
  # directory, owned by its dynamic user, each replaced whole. Not LoadCredential=:
  # systemd does not refresh credentials on reload (systemd issue 21099), and the
  # server's SIGHUP re-read must see the new files without a restart.
  tlsStage = dir: files: pkgs.writeShellScript "sensorhub-stage-tls" (''
    set -eu
    owner=$(${pkgs.coreutils}/bin/stat -c %u /run/${dir})
  '' + lib.concatMapStrings
    (name: ''
      ${pkgs.coreutils}/bin/install -m 0400 -o "$owner" ${lib.escapeShellArg files.${name}} /run/${dir}/.${name}.new
      ${pkgs.coreutils}/bin/mv -f /run/${dir}/.${name}.new /run/${dir}/${name}
    '')
    (builtins.attrNames files));
  tlsUnit = dir: stage: {
    RuntimeDirectory = dir;
    RuntimeDirectoryMode = "0700";
    ExecStartPre = "+${stage}";
  };
  serverStage = tlsStage "sensorhub-tls" (tlsFiles server.tls);
  tlsFiles = t: lib.filterAttrs (_: v: v != null) {
    "cert.pem" = t.certificate;
    "key.pem" = t.key;
    "ca.pem" = t.clientCa or t.ca;
  };
  # A secret in the store is readable by every user of the machine (and every
  # machine the closure is copied to).
  storeWarnings = what: paths: map (p: "${what} ${p} is in the Nix store, readable by every user; keep keys outside it")
    (lib.filter (p: p != null && lib.hasPrefix builtins.storeDir p) paths);
  serverTls = server.tls.certificate != null;
  serverTlsArgs = lib.optionals serverTls ([
    "--tls-cert"
    "/run/sensorhub-tls/cert.pem"
    "--tls-key"
    "/run/sensorhub-tls/key.pem"
    "--tls-handshake-timeout"
    (toString server.tls.handshakeTimeout)
  ] ++ lib.optionals (server.tls.clientCa != null) [ "--tls-client-ca" "/run/sensorhub-tls/ca.pem" ]);
  clientTlsArgs = name: c: lib.optionals (c.tls.ca != null) ([
    "--tls-ca"
    "/run/sensorhub-client-${name}-tls/ca.pem"
  ] ++ lib.optionals (c.tls.certificate != null) [
    "--tls-cert"
    "/run/sensorhub-client-${name}-tls/cert.pem"
    "--tls-key"
    "/run/sensorhub-client-${name}-tls/key.pem"
  ] ++ lib.optionals (c.tls.serverName != null) [ "--tls-server-name" c.tls.serverName ]);
  archiveArgs = lib.optionals (archive.bucket != null) ([
    "--archive"
    "s3://${archive.bucket}/${archive.prefix}"
    "--host-id"
    archive.hostId
    "--keep-shipped-bytes"
    (toString archive.keepShippedBytes)
    "--archive-stop-timeout"
    (toString archive.stopTimeout)
    "--archive-cli"
    (lib.getExe' archive.cli "aws")
  ] ++ lib.optionals (archive.endpoint != null) [ "--archive-endpoint" archive.endpoint ]);
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
    "--segment-max-age"
    (toString server.segmentMaxAge)
  ]
  ++ archiveArgs
  ++ lib.optionals (server.httpListen != null) [ "--http-listen" server.httpListen ]
  ++ lib.optionals (server.workers != null) [ "--workers" (toString server.workers) ]
  ++ serverTlsArgs
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
  ] ++ clientTlsArgs c.name c ++ c.extraArgs;

  # An absolute path as a string: a Nix path literal would copy the file into the store.
  filePath = types.strMatching "/.+";
  # A PEM file of the TLS options, null for none.
  pemFile = example: description: mkOption {
    type = types.nullOr filePath;
    default = null;
    inherit example description;
  };

  clientModule = { name, ... }: {
    options = {
      name = mkOption {
        type = types.str;
        default = name;
        internal = true;
        description = "The attribute name (the unit is sensorhub-client-NAME).";
      };
      tls = {
        ca = pemFile "/etc/sensorhub/ca.pem" "PEM CA that signed the server's certificate; set, the client speaks TLS (PROTOCOL.md v1.2).";
        certificate = pemFile "/run/secrets/sensor-greenhouse-1.pem" "PEM client certificate naming this sensor (sensor-server certs makes one); with key.";
        key = pemFile "/run/secrets/sensor-greenhouse-1.key" "Its PEM private key: a path outside the Nix store, read as root before each start.";
        serverName = mkOption {
          type = types.nullOr types.str;
          default = null;
          description = "The name to verify in the server's certificate; null for the host of `server`.";
        };
      };
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
      tls = {
        certificate = pemFile "/run/secrets/sensorhub-server.pem" "PEM certificate (chain) of the sensor port; set (with key), the port speaks only TLS (PROTOCOL.md v1.2). Read as root before each start and on `systemctl reload sensorhub-server`, which rotates it without dropping a connection.";
        key = pemFile "/run/secrets/sensorhub-server.key" "PEM private key of the certificate: a path outside the Nix store (root-only is fine).";
        clientCa = pemFile "/etc/sensorhub/ca.pem" "PEM CA every sensor's client certificate must chain to; its names are the sensor ids it may write for.";
        handshakeTimeout = mkOption {
          type = types.ints.positive;
          default = 5;
          description = "Seconds a TLS handshake may take before the connection is closed.";
        };
      };
      segmentMaxAge = mkOption {
        type = types.ints.positive;
        default = 60;
        description = "Seconds after which a non-empty store segment is sealed (and, with an archive, shipped).";
      };
      archive = {
        bucket = mkOption {
          type = types.nullOr (types.strMatching "[a-z0-9.-]{3,63}");
          default = null;
          example = "my-readings";
          description = "S3 bucket that sealed segments are shipped to; null for no archive.";
        };
        prefix = mkOption {
          type = types.str;
          default = "sensorhub";
          description = "Key prefix: objects are PREFIX/readings/dt=YYYY-MM-DD/host=HOST/segment-N-STOREID.jsonl.gz.";
        };
        endpoint = mkOption {
          type = types.nullOr types.str;
          default = null;
          example = "http://minio:9000";
          description = "S3 endpoint override (MinIO, a local S3); null for AWS.";
        };
        hostId = mkOption {
          type = types.strMatching "[A-Za-z0-9._-]{1,64}";
          default = config.networking.hostName;
          defaultText = lib.literalExpression "config.networking.hostName";
          description = "This server's stable id in object keys; unique per data directory.";
        };
        keepShippedBytes = mkOption {
          type = types.ints.unsigned;
          default = 1024 * 1024 * 1024;
          description = "Shipped segments kept on local disk; older ones are deleted. Unshipped ones never are.";
        };
        stopTimeout = mkOption {
          type = types.ints.unsigned;
          default = 8;
          description = "Seconds a stop keeps shipping pending segments before exiting; the rest ships at the next start.";
        };
        environmentFile = mkOption {
          type = types.nullOr types.path;
          default = null;
          example = "/run/secrets/sensorhub-s3";
          description = ''
            systemd EnvironmentFile with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
            AWS_DEFAULT_REGION, for an S3 outside AWS; on EC2 the instance profile needs none.
          '';
        };
        cli = mkOption {
          type = types.package;
          default = pkgs.awscli2;
          defaultText = lib.literalExpression "pkgs.awscli2";
          description = "Package providing the `aws` CLI that uploads segments.";
        };
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
      assertions = [
        {
          assertion = (server.tls.certificate == null) == (server.tls.key == null);
          message = "services.sensorhub.server.tls: set certificate and key together";
        }
        {
          assertion = server.tls.clientCa == null || serverTls;
          message = "services.sensorhub.server.tls.clientCa needs tls.certificate and tls.key";
        }
      ];
      warnings = storeWarnings "services.sensorhub.server.tls.key" [ server.tls.key ];
      networking.firewall.allowedTCPPorts = lib.optional server.openFirewall server.port;
      systemd.services.sensorhub-server = {
        description = "sensorhub ingest server";
        wantedBy = [ "multi-user.target" ];
        after = [ "network.target" ];
        # The AWS CLI keeps its caches under $HOME.
        environment = lib.mkIf (archive.bucket != null) { HOME = "/var/lib/sensorhub"; };
        serviceConfig = hardening // {
          ExecStart = utils.escapeSystemdExecArgs ([ (lib.getExe' server.package "sensor-server") ] ++ serverArgs);
          Restart = "always";
          RestartSec = "1s";
          StateDirectory = "sensorhub";
          # Connections plus the store, listeners and a margin.
          LimitNOFILE = server.maxConnections + 1024;
          # SIGTERM drains within 10 s by contract, then ships for up to stopTimeout.
          TimeoutStopSec = "${toString (15 + archive.stopTimeout)}s";
        } // lib.optionalAttrs (archive.environmentFile != null) {
          EnvironmentFile = archive.environmentFile;
        } // lib.optionalAttrs serverTls (tlsUnit "sensorhub-tls" serverStage // {
          ExecReload = [ "+${serverStage}" "${pkgs.coreutils}/bin/kill -HUP $MAINPID" ];
        });
      };
    })
    {
      assertions = lib.concatLists (lib.mapAttrsToList
        (name: c: [
          {
            assertion = (c.tls.certificate == null) == (c.tls.key == null);
            message = "services.sensorhub.clients.${name}.tls: set certificate and key together";
          }
          {
            assertion = c.tls.certificate == null || c.tls.ca != null;
            message = "services.sensorhub.clients.${name}.tls.certificate needs tls.ca (the server's CA)";
          }
        ])
        cfg.clients);
      warnings = lib.concatLists (lib.mapAttrsToList
        (name: c: storeWarnings "services.sensorhub.clients.${name}.tls.key" [ c.tls.key ])
        cfg.clients);
      systemd.services = lib.mapAttrs'
        (name: c: lib.nameValuePair "sensorhub-client-${name}" {
          description = "sensorhub simulated sensor ${c.sensor}";
          wantedBy = [ "multi-user.target" ];
          wants = [ "network-online.target" ];
          after = [ "network-online.target" ];
          serviceConfig = hardening // {
            ExecStart = utils.escapeSystemdExecArgs ([ (lib.getExe' cfg.package "sensor-client") ] ++ clientArgs c);
            Restart = "always";
            RestartSec = "1s";
            StateDirectory = "sensorhub-client-${name}";
          } // lib.optionalAttrs (c.tls.ca != null) (tlsUnit "sensorhub-client-${name}-tls" (tlsStage "sensorhub-client-${name}-tls" (tlsFiles c.tls)));
        })
        cfg.clients;
    }
  ];
}
