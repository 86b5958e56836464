{
  description = "sensorhub: sensor-telemetry ingest server and simulating client";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs = { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      version = (lib.importTOML ./Cargo.toml).package.version;
      # What `--version` names (build.rs): the flake's source has no .git.
      commit = self.rev or self.dirtyRev or "unknown";

      # Only what the build and its tests read (tests/cli.rs reads README.md,
      # BENCHMARKS.md and docs/): editing Nix or infra files does not rebuild. (.cargo/
      # is left out on purpose: its rust-lld linker setting is for builds without Nix,
      # and would override nixpkgs' cross linker.)
      src = lib.fileset.toSource {
        root = ./.;
        fileset = lib.fileset.unions [
          ./Cargo.toml
          ./Cargo.lock
          ./build.rs
          ./src
          ./tests
          ./benches
          # tests/cli.rs checks what the documents cite.
          ./README.md
          ./BENCHMARKS.md
          ./docs
        ];
      };

      # `pkgs` decides the platform: native, pkgsStatic, or a cross static set.
      sensorhubFor = pkgs: args: pkgs.callPackage ./nix/package.nix ({ inherit src version commit; } // args);

      # Fails unless every binary of `pkg` has no ELF interpreter and no NEEDED entry.
      staticCheck = pkgs: pkg:
        pkgs.runCommand "${pkg.name}-is-static" { nativeBuildInputs = [ pkgs.binutils ]; } ''
          bash ${./scripts/check-static.sh} ${pkg}/bin/sensor-server ${pkg}/bin/sensor-client
          touch $out
        '';

      staticPackages = pkgs:
        {
          # Tests run in `sensorhub`; the static builds only build.
          sensorhub-static = sensorhubFor pkgs.pkgsStatic { doCheck = false; };
        }
        // lib.optionalAttrs (pkgs.stdenv.hostPlatform.system == "x86_64-linux") {
          sensorhub-static-aarch64 =
            sensorhubFor pkgs.pkgsCross.aarch64-multiplatform.pkgsStatic { doCheck = false; };
        };
    in
    {
      packages = forAllSystems (pkgs:
        let static = staticPackages pkgs;
        in static // {
          sensorhub = sensorhubFor pkgs { };
          default = static.sensorhub-static;
        });

      checks = forAllSystems (pkgs:
        let
          system = pkgs.stdenv.hostPlatform.system;
          packages = self.packages.${system};
        in
        lib.mapAttrs' (name: pkg: lib.nameValuePair "static-${name}" (staticCheck pkgs pkg)) (staticPackages pkgs)
        // {
          # The native build runs `cargo test` (unit and integration tests).
          tests = packages.sensorhub;
        }
        // lib.optionalAttrs (system == "x86_64-linux") {
          topology = import ./nixos-tests/topology.nix {
            inherit pkgs;
            module = self.nixosModules.default;
          };
          topology-tls = import ./nixos-tests/topology.nix {
            inherit pkgs;
            module = self.nixosModules.default;
            tls = true;
            package = packages.sensorhub;
          };
          fleet = import ./nixos-tests/fleet.nix {
            inherit pkgs;
            module = self.nixosModules.default;
          };
          fleet-tls = import ./nixos-tests/fleet.nix {
            inherit pkgs;
            module = self.nixosModules.default;
            tls = true;
            package = packages.sensorhub;
          };
        });

      apps = forAllSystems (pkgs:
        let pkg = self.packages.${pkgs.stdenv.hostPlatform.system}.sensorhub;
        in {
          server = {
            type = "app";
            program = "${pkg}/bin/sensor-server";
            meta.description = "Run sensor-server";
          };
          client = {
            type = "app";
            program = "${pkg}/bin/sensor-client";
            meta.description = "Run sensor-client";
          };
        });

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = with pkgs; [
            cargo
            rustc
            clippy
            rustfmt
            rust-analyzer
            python3Packages.cfn-lint # nixpkgs has no top-level cfn-lint
            awscli2
            jq
            nixpkgs-fmt
            deadnix
          ];
        };
      });

      formatter = forAllSystems (pkgs: pkgs.nixpkgs-fmt);

      nixosModules.default = { lib, pkgs, ... }: {
        imports = [ ./nix/module.nix ];
        services.sensorhub.package =
          lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.sensorhub-static;
      };
    };
}
