#!/usr/bin/env python3
"""Fails when a tracked .nix file uses a NixOS option path under services., systemd.,
networking. or virtualisation. that nix/NIXPKGS.md does not list (with the nixpkgs file
that defines it). Nothing here can evaluate nixpkgs, so the list is how every option
the flake relies on gets looked up once, and stays looked up as the files change.

A used path matches a listed option when they agree on every component they share
(`<name>` in the list, and `${...}` or "..." in the file, stand for any one name):
`systemd.services.sensorhub-server` (set as an attribute set) matches
`systemd.services.<name>.serviceConfig`, and `services.minio.enable` matches nothing.

    scripts/check-nixpkgs-list.py [--self-test]
"""
import re
import subprocess
import sys
from pathlib import Path

ROOTS = ("services", "systemd", "networking", "virtualisation")
COMPONENT = r'(?:[A-Za-z_][\w\'-]*|"[^"\n]*"|\$\{[^}\n]*\})'
USED = re.compile(
    r"(?<![\w.$-])(?:config\.|options\.)?"
    rf"((?:{'|'.join(ROOTS)})(?:\.{COMPONENT})+)"
)
LISTED = re.compile(r"^- `((?:" + "|".join(ROOTS) + r")\.[^`]+)` -> \S")


def components(path):
    return re.findall(COMPONENT, path)


def wildcard(component):
    return component == "<name>" or component.startswith(("${", '"'))


def matches(used, listed):
    # The list's names hold no quotes or dots of their own: split it plainly.
    pairs = zip(components(used), listed.split("."))
    return all(u == l or wildcard(u) or wildcard(l) for u, l in pairs)


def used_paths(text):
    """Option paths in Nix code, comments left out."""
    code = "\n".join(line.split("#", 1)[0] if not line.lstrip().startswith("#") else ""
                     for line in text.splitlines())
    return set(USED.findall(code))


def listed_options(text):
    return [m.group(1) for m in map(LISTED.match, text.splitlines()) if m]


def missing(files, listed):
    for name, text in files:
        for path in sorted(used_paths(text)):
            if not any(matches(path, option) for option in listed):
                yield name, path


def self_test():
    listed = ["systemd.services.<name>.serviceConfig", "services.haproxy.enable",
              "networking.interfaces.<name>.ipv4.routes", "services.sensorhub"]
    text = """
      systemd.services."sensorhub-client-${name}".serviceConfig = { };
      systemd.services.moto-s3 = { };
      services.haproxy = { enable = true; };
      networking.interfaces.eth1.ipv4.routes = [ ];
      cfg = config.services.sensorhub.server;
      # services.commented.out = true;
      services.minio.enable = true;   # services.trailing.comment
      networking.firewall.enable = false;
      s3.wait_for_unit("moto-s3.service")
    """
    found = sorted(p for _, p in missing([("t.nix", text)], listed))
    assert found == ["networking.firewall.enable", "services.minio.enable"], found
    print("check-nixpkgs-list: self-test passed")


def main():
    if sys.argv[1:] == ["--self-test"]:
        return self_test()
    root = Path(__file__).resolve().parent.parent
    listed = listed_options((root / "nix/NIXPKGS.md").read_text())
    names = subprocess.run(["git", "ls-files", "*.nix"], cwd=root, check=True,
                           capture_output=True, text=True).stdout.split()
    files = [(name, (root / name).read_text()) for name in names]
    gaps = list(missing(files, listed))
    for name, path in gaps:
        print(f"{name}: {path} is not in nix/NIXPKGS.md (look it up in nixpkgs, then list it)")
    if gaps:
        sys.exit(1)
    print(f"check-nixpkgs-list: every option path in {len(files)} .nix files is listed "
          f"({len(listed)} options in nix/NIXPKGS.md)")


if __name__ == "__main__":
    main()
