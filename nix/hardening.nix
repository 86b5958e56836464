# deploy/systemd/hardening.conf as systemd serviceConfig attributes: `Key=value` lines
# become attributes, a key given twice becomes a list (systemd accumulates it), and
# comments and section headers are skipped. Builtins only, so that CI can evaluate it
# without nixpkgs (infra/test_infra.py compares the result with the file).
file:
let
  lines = builtins.filter builtins.isString (builtins.split "\n" (builtins.readFile file));
  directive = line: builtins.match "[[:space:]]*([A-Za-z]+)=(.*[^[:space:]]|)[[:space:]]*" line;
  directives = builtins.filter (d: d != null) (map directive lines);
  byKey = builtins.groupBy (d: builtins.elemAt d 0) directives;
in
builtins.mapAttrs
  (_: ds:
  let values = map (d: builtins.elemAt d 1) ds;
  in if builtins.length values == 1 then builtins.head values else values)
  byKey
