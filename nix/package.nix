# sensorhub as a nixpkgs-style package. Called with the `rustPlatform` of the package
# set it is built for: `pkgs` (native, tests run), `pkgs.pkgsStatic` (static musl) or
# `pkgs.pkgsCross.aarch64-multiplatform.pkgsStatic` (static musl for Graviton).
#
# Static linking follows `stdenv.hostPlatform.isStatic`: nixpkgs' rustc sets
# `crt-static` from it (pkgs/development/compilers/rust/rustc.nix), so `pkgsMusl`
# alone would give a dynamically linked musl binary; `pkgsStatic` gives a static one.
# `checks.*.static-*` in flake.nix prove it with readelf.
{ lib
, rustPlatform
, procps
, util-linux
, src
, version
, commit ? "unknown"
, doCheck ? true
}:

rustPlatform.buildRustPackage {
  pname = "sensorhub";
  inherit version src doCheck;

  # `--version` names the source commit (build.rs); the source has no .git.
  env.SENSORHUB_COMMIT = commit;

  # Every dependency comes from crates.io with a checksum in Cargo.lock, so no
  # separate vendor hash is needed (pkgs/build-support/rust/import-cargo-lock.nix).
  cargoLock.lockFile = ../Cargo.lock;

  # The integration tests start the real binaries on 127.0.0.1 and signal them with
  # kill(1); one runs the server under prlimit(1).
  nativeCheckInputs = [ procps util-linux ];
  # The archive's tests need a local S3 (moto_server) and the AWS CLI on PATH, which
  # the build sandbox does not run; CI runs them (scripts/test.sh).
  checkFlags = [ "--skip=s3::" ];

  meta = {
    description = "Sensor-telemetry ingest: a mio event-loop server with a durable store, and a simulating client";
    license = with lib.licenses; [ mit asl20 ];
    mainProgram = "sensor-server";
    platforms = lib.platforms.linux;
  };
}
