# Test certificates for the TLS variants of the NixOS tests, made at build time by the
# package's own `sensor-server certs`: a CA, a server certificate for `serverName` (the
# address sensors dial) and one certificate per sensor id. Test keys live in the store
# (world-readable): fine for a throwaway VM, and the module warns about it, as it should
# for real keys.
{ pkgs, package, serverName, sensors }:

pkgs.runCommand "sensorhub-test-pki" { } ''
  ${package}/bin/sensor-server certs --dir $out --server ${serverName} \
    ${pkgs.lib.concatMapStringsSep " " (id: "--sensor ${id}") sensors}
''
