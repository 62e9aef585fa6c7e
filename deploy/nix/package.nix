# nixdispatch's binaries (scheduler, agent, hook, CLI and, once merged, the gate) from this
# repository. protox compiles the .proto files in Rust and SQLite is bundled, so nothing but
# a C compiler (stdenv's) is needed besides cargo. The test suite is not run here: it starts
# sshd and network namespaces as root (tests/run.sh).
{
  lib,
  rustPlatform,
}:
rustPlatform.buildRustPackage {
  pname = "nixdispatch";
  version = (lib.importTOML ../../Cargo.toml).workspace.package.version;
  src = lib.fileset.toSource {
    root = ../..;
    fileset = lib.fileset.unions [
      ../../Cargo.toml
      ../../Cargo.lock
      ../../build.rs
      ../../src
      ../../proto
      ../../scheduler
      ../../agent
      ../../benches
      ../../deploy
    ];
  };
  cargoLock.lockFile = ../../Cargo.lock;
  cargoBuildFlags = [
    "--workspace"
    "--bins"
  ];
  doCheck = false;
  meta = {
    description = "A remote-build scheduler for Nix community builders";
    homepage = "https://github.com/nix-community/nixdispatch";
    license = with lib.licenses; [
      mit
      asl20
    ];
    mainProgram = "nixdispatch";
  };
}
