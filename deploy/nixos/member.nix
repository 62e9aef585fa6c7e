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
  toml = pkgs.formats.toml { };
  configFile = toml.generate "nixdispatch-hook.toml" cfg.settings;
  hook = lib.getExe' cfg.package "nixdispatch-hook";
  nix = config.nix.package;
  placement = import ./hook-placement.nix {
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
      example = (import ./examples.nix).hook;
      description = "The hook's configuration (docs/hook.md), rendered to TOML.";
    };
    credentials = lib.mkOption {
      type = lib.types.attrsOf lib.types.path;
      default = { };
      example = {
        nixdispatch-token = "/var/lib/secrets/nixdispatch-member.token";
      };
      description = ''
        Secret files handed to nix-daemon (which runs the hook) with LoadCredential=, as
        /run/credentials/nix-daemon.service/<name>.
      '';
    };
  };

  config = lib.mkIf cfg.enable (
    lib.mkMerge [
      {
        assertions = [
          {
            assertion = placement != "unsupported";
            message = "nixdispatch-hook does not support ${lib.getName nix} ${lib.getVersion nix} (Lix 2.94+ and Nix before 2.8 speak another hook protocol; see docs/hook.md).";
          }
        ];
        environment.systemPackages = [ cfg.package ];
        systemd.services.nix-daemon = {
          environment.NIXDISPATCH_HOOK_CONFIG = "${configFile}";
          serviceConfig.LoadCredential = lib.mapAttrsToList (name: path: "${name}:${path}") cfg.credentials;
        };
      }
      (lib.mkIf (placement == "nix.conf") {
        nix.settings.build-hook = hook;
      })
      (lib.mkIf (placement == "daemon-command-line") {
        # Replaces the ExecStart of the unit that Nix ships (the empty string clears it).
        systemd.services.nix-daemon.serviceConfig.ExecStart = [
          ""
          "@${lib.getExe' nix "nix-daemon"} nix-daemon --daemon --option build-hook ${hook}"
        ];
      })
    ]
  );
}
