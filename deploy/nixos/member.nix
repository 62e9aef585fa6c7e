# NixOS module: a member's machine offloads its builds through nixdispatch.
#
#   services.nixdispatch.member = {
#     enable = true;
#     settings = { scheduler = "http://scheduler.example.org:50051"; };  # the hook's TOML
#     credentials.nixdispatch-token = "/var/lib/secrets/nixdispatch-member.token";
#   };
#
# Installs nixdispatch (the hook, and `nixdispatch doctor` to check the result) and points the
# nix-daemon at the hook where this Nix version reads it (./hook-placement.nix): `build-hook`
# in nix.conf, or on Nix 2.25 to 2.33, which ignore it there, on the daemon's command line.
# The hook finds its configuration through NIXDISPATCH_HOOK_CONFIG in the daemon's
# environment. Secrets (the member's scheduler credential) are handed to the daemon with
# LoadCredential= and read by the hook from /run/credentials/nix-daemon.service/<name>.
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
    credentials = opts.credentials {
      unit = "nix-daemon.service";
      example.nixdispatch-token = "/var/lib/secrets/nixdispatch-member.token";
    };
  };

  config = lib.mkIf cfg.enable (
    lib.mkMerge [
      {
        inherit (member) assertions;
        environment.systemPackages = [ cfg.package ];
        systemd.services.nix-daemon = {
          environment.NIXDISPATCH_HOOK_CONFIG = "${configFile}";
          serviceConfig.LoadCredential = opts.loadCredential cfg.credentials;
        };
      }
      (lib.mkIf (member.placement == "nix.conf") {
        nix.settings.build-hook = hook;
      })
      (lib.mkIf (member.placement == "daemon-command-line") {
        # Replaces the ExecStart of the unit that Nix ships (the empty string clears it).
        systemd.services.nix-daemon.serviceConfig.ExecStart = [
          ""
          "@${lib.getExe' nix "nix-daemon"} nix-daemon --daemon --option build-hook ${hook}"
        ];
      })
    ]
  );
}
