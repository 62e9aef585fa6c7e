# nix-darwin module: a member's Mac offloads its builds through nixdispatch.
#
#   services.nixdispatch.member = {
#     enable = true;
#     settings = { scheduler = "http://scheduler.example.org:50051"; };  # the hook's TOML
#   };
#
# As on NixOS (../nixos/member.nix): `build-hook` in nix.conf, or on Nix 2.25 to 2.33, which
# ignore it there, on the nix-daemon's command line; NIXDISPATCH_HOOK_CONFIG in the daemon's
# environment. A `credential_file` must name a root-only file outside the Nix store (launchd
# has no credentials store).
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.nixdispatch.member;
  toml = pkgs.formats.toml { };
  configFile = toml.generate "nixdispatch-hook.toml" cfg.settings;
  hook = lib.getExe' cfg.package "nixdispatch-hook";
  nix = config.nix.package;
  placement = import ../nixos/hook-placement.nix {
    pname = lib.getName nix;
    version = lib.getVersion nix;
  };
in
{
  options.services.nixdispatch.member = {
    enable = lib.mkEnableOption "offloading this machine's builds through nixdispatch";
    package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.nixdispatch;
      defaultText = lib.literalExpression "pkgs.nixdispatch";
      description = "The package providing nixdispatch-hook and nixdispatch.";
    };
    settings = lib.mkOption {
      type = toml.type;
      default = { };
      example = (import ../nixos/examples.nix).hook;
      description = "The hook's configuration (docs/hook.md), rendered to TOML.";
    };
  };

  config = lib.mkIf cfg.enable (
    lib.mkMerge [
      {
        assertions = [
          {
            assertion = placement != "unsupported";
            message = "nixdispatch-hook does not support ${lib.getName nix} ${lib.getVersion nix} (see docs/hook.md).";
          }
        ];
        environment.systemPackages = [ cfg.package ];
        launchd.daemons.nix-daemon.serviceConfig.EnvironmentVariables.NIXDISPATCH_HOOK_CONFIG = "${configFile}";
      }
      (lib.mkIf (placement == "nix.conf") {
        nix.settings.build-hook = hook;
      })
      (lib.mkIf (placement == "daemon-command-line") {
        launchd.daemons.nix-daemon.command = lib.mkForce "${lib.getExe' nix "nix-daemon"} --option build-hook ${hook}";
      })
    ]
  );
}
