# Evaluates the NixOS and nix-darwin modules with the real module system (nixpkgs' `lib`)
# against stubs of the options they set, and returns what they configure. A manual check for
# machines without nixpkgs (docs/deploy.md says what it covers); with a checkout of nixpkgs or
# of nix-community/nixpkgs.lib:
#   nix-instantiate --eval --strict --json -E \
#     'import ./deploy/nix/eval-modules.nix { lib = import /path/to/nixpkgs/lib; }'
# Packages are stubs: every store path in the answer is a placeholder.
{
  lib,
  nixVersion ? "2.26.3",
  nixPname ? "nix",
  darwin ? false,
}:
let
  fakePkg =
    pname: version:
    let
      self = {
        type = "derivation";
        name = "${pname}-${version}";
        inherit pname version;
        outPath = "/nix/store/00000000000000000000000000000000-${pname}-${version}";
        outputs = [ "out" ];
        out = self;
      };
    in
    self;
  pkgs = {
    nixdispatch = fakePkg "nixdispatch" "0.1.0";
    # What the modules use of pkgs.formats.toml; the file holds JSON instead of TOML.
    formats.toml = _: {
      type = lib.types.attrsOf lib.types.anything;
      generate = name: value: builtins.toFile name (builtins.toJSON value);
    };
  };
  inherit (lib) mkOption types;
  any = types.attrsOf types.anything;
  # The options of NixOS and nix-darwin the modules set, loosely typed.
  stubs = {
    options = {
      systemd.services = mkOption {
        type = types.attrsOf (
          types.submodule {
            freeformType = any;
            options.serviceConfig = mkOption {
              type = any;
              default = { };
            };
            options.environment = mkOption {
              type = types.attrsOf types.str;
              default = { };
            };
          }
        );
        default = { };
      };
      systemd.tmpfiles.rules = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      networking.firewall.allowedTCPPorts = mkOption {
        type = types.listOf types.port;
        default = [ ];
      };
      environment.systemPackages = mkOption {
        type = types.listOf types.anything;
        default = [ ];
      };
      nix.settings = mkOption {
        type = any;
        default = { };
      };
      nix.package = mkOption {
        type = types.anything;
        default = fakePkg nixPname nixVersion;
      };
      assertions = mkOption {
        type = types.listOf types.anything;
        default = [ ];
      };
      users.groups = mkOption {
        type = any;
        default = { };
      };
      services.openssh.extraConfig = mkOption {
        type = types.lines;
        default = "";
      };
      launchd.daemons = mkOption {
        type = types.attrsOf (
          types.submodule {
            options.serviceConfig = mkOption {
              type = any;
              default = { };
            };
            options.command = mkOption {
              type = types.str;
              default = "";
            };
          }
        );
        default = { };
      };
    };
  };
  ex = import ../nixos/examples.nix;
  nixos = lib.evalModules {
    specialArgs = { inherit pkgs; };
    modules = [
      stubs
      ../nixos/scheduler.nix
      ../nixos/agent.nix
      ../nixos/gate.nix
      ../nixos/member.nix
      {
        services.nixdispatch.scheduler = {
          enable = true;
          openFirewall = true;
          settings = ex.scheduler;
          credentials.probe-key = "/var/lib/secrets/probe-key";
        };
        services.nixdispatch.agent = {
          enable = true;
          settings = ex.agent;
          credentials.token = "/var/lib/secrets/agent.token";
        };
        services.nixdispatch.gate = {
          enable = true;
          settings = ex.gate;
        };
        services.nixdispatch.member = {
          enable = true;
          settings = ex.hook;
          credentials.nixdispatch-token = "/var/lib/secrets/member.token";
        };
      }
    ];
  };
  nixDarwin = lib.evalModules {
    specialArgs = { inherit pkgs; };
    modules = [
      stubs
      ../darwin/agent.nix
      ../darwin/member.nix
      {
        services.nixdispatch.agent = {
          enable = true;
          settings = ex.agent;
        };
        services.nixdispatch.member = {
          enable = true;
          settings = ex.hook;
        };
      }
    ];
  };
  c = (if darwin then nixDarwin else nixos).config;
  assertions = map (a: a.assertion) c.assertions;
in
if darwin then
  {
    inherit (c) launchd nix;
    inherit assertions;
  }
else
  {
    inherit (c) networking nix systemd;
    inherit assertions;
    sshd = c.services.openssh.extraConfig;
  }
