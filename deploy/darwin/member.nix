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
  opts = import ../nix/options.nix { inherit lib pkgs; };
  configFile = opts.toml.generate "nixdispatch-hook.toml" cfg.settings;
  hook = lib.getExe' cfg.package "nixdispatch-hook";
  nix = config.nix.package;
  member = opts.member nix;
in
{
  options.services.nixdispatch.member = {
    enable = lib.mkEnableOption "offloading this machine's builds through nixdispatch";
    package = opts.package "nixdispatch-hook and nixdispatch";
    settings = opts.settings {
      role = "hook";
      file = "hook's (docs/hook.md)";
    };
  };

  config = lib.mkIf cfg.enable (
    lib.mkMerge [
      {
        inherit (member) assertions;
        environment.systemPackages = [ cfg.package ];
        launchd.daemons.nix-daemon.serviceConfig.EnvironmentVariables.NIXDISPATCH_HOOK_CONFIG = "${configFile}";
      }
      (lib.mkIf (member.placement == "nix.conf") {
        nix.settings.build-hook = hook;
      })
      (lib.mkIf (member.placement == "daemon-command-line") {
        launchd.daemons.nix-daemon.command = lib.mkForce "${lib.getExe' nix "nix-daemon"} --option build-hook ${hook}";
      })
    ]
  );
}
