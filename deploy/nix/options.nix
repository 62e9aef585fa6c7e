# What every nixdispatch module (NixOS and nix-darwin) shares: the `package`, `settings` and
# `credentials` options, the TOML format, and the checks of the member's Nix.
{ lib, pkgs }:
rec {
  toml = pkgs.formats.toml { };

  # The `package` option; `provides` names the binaries the module runs.
  package =
    provides:
    lib.mkOption {
      type = lib.types.package;
      default = pkgs.nixdispatch;
      defaultText = lib.literalExpression "pkgs.nixdispatch";
      description = "The package providing ${provides}.";
    };

  # The `settings` option: the binary's TOML configuration as Nix data. `role` picks the
  # example in ../nixos/examples.nix.
  settings =
    { role, file }:
    lib.mkOption {
      type = toml.type;
      default = { };
      example = (import ../nixos/examples.nix).${role};
      description = "The ${file} configuration, rendered to TOML (docs/deploy.md).";
    };

  # The `credentials` option: secret files systemd hands to `unit` with LoadCredential=.
  credentials =
    { unit, example }:
    lib.mkOption {
      type = lib.types.attrsOf lib.types.path;
      default = { };
      inherit example;
      description = ''
        Secret files handed to ${unit} with systemd's LoadCredential=, as
        /run/credentials/${unit}/<name>. Give paths as strings outside the Nix store.
      '';
    };

  # `credentials` as LoadCredential= lines.
  loadCredential = lib.mapAttrsToList (name: path: "${name}:${path}");

  # Where the member's Nix reads `build-hook` (../nixos/hook-placement.nix), and the
  # assertion that it is a Nix the hook supports.
  member = nix: rec {
    placement = import ../nixos/hook-placement.nix {
      pname = lib.getName nix;
      version = lib.getVersion nix;
    };
    assertions = [
      {
        assertion = placement != "unsupported";
        message = "nixdispatch-hook does not support ${lib.getName nix} ${lib.getVersion nix} (Lix 2.94+ and Nix before 2.8 speak another hook protocol; see docs/hook.md).";
      }
    ];
  };
}
