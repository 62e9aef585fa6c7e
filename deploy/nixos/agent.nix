# NixOS module: the nixdispatch agent on a Linux builder.
#
#   services.nixdispatch.agent = {
#     enable = true;
#     settings = { scheduler = "http://scheduler.example.org:50051"; };  # agent.toml
#     credentials.token = "/var/lib/secrets/nixdispatch-agent.token";
#   };
#
# `settings` is the agent's TOML configuration as Nix data (agent/src/config.rs,
# deploy/agent/agent.toml); what it leaves out is discovered from the local Nix (systems,
# features, max-jobs). Secrets go in `credentials` (LoadCredential=), referred to as
# /run/credentials/nixdispatch-agent.service/<name>, never in `settings`.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.nixdispatch.agent;
  opts = import ../nix/options.nix { inherit lib pkgs; };
  configFile = opts.toml.generate "nixdispatch-agent.toml" cfg.settings;
  units = import ./units.nix {
    agentExec = "${lib.getExe' cfg.package "nixdispatch-agent"} --config ${configFile}";
    agentCredentials = opts.loadCredential cfg.credentials;
  };
in
{
  options.services.nixdispatch.agent = {
    enable = lib.mkEnableOption "the nixdispatch agent, which reports this builder's capacity";
    package = opts.package "nixdispatch-agent";
    settings = opts.settings {
      role = "agent";
      file = "agent's (agent.toml)";
    };
    gateSocket = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default =
        if (config.services.nixdispatch.gate.enable or false) then
          "/run/nixdispatch-agent/gate.sock"
        else
          null;
      defaultText = lib.literalExpression ''
        if config.services.nixdispatch.gate.enable then "/run/nixdispatch-agent/gate.sock" else null
      '';
      description = ''
        Serve the builder-side gate on this Unix socket (`[gate] socket`, docs/gate.md), so
        that the gate, which runs as each member, never holds this builder's credential.
        It must be in /run/nixdispatch-agent (the unit's RuntimeDirectory). The socket is
        open to every local user (`settings.gate.mode`, default 0o666): the agent acts for
        each as the user it is.
      '';
    };
    credentials = opts.credentials {
      unit = "nixdispatch-agent.service";
      example.token = "/var/lib/secrets/nixdispatch-agent.token";
    };
  };

  config = lib.mkIf cfg.enable {
    services.nixdispatch.agent.settings = lib.mkIf (cfg.gateSocket != null) {
      gate.socket = lib.mkDefault cfg.gateSocket;
    };
    systemd.services.nixdispatch-agent = {
      description = "nixdispatch agent: reports this builder's capacity to the scheduler";
      documentation = [ "https://github.com/nix-community/nixdispatch" ];
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      # Discovery asks the local Nix for its settings.
      after = [
        "network-online.target"
        "nix-daemon.service"
      ];
      path = [ config.nix.package ];
      environment.RUST_LOG = "info";
      serviceConfig =
        units.agent
        // lib.optionalAttrs (cfg.gateSocket != null) {
          # The gate socket's directory; members' gates must reach the socket in it.
          RuntimeDirectory = "nixdispatch-agent";
          RuntimeDirectoryMode = "0755";
        };
    };
  };
}
