# nix-darwin module: the nixdispatch agent on a macOS builder (a launchd daemon).
#
#   services.nixdispatch.agent = {
#     enable = true;
#     settings = { scheduler = "http://scheduler.example.org:50051"; };  # agent.toml
#   };
#
# launchd has no credentials store: a `credential_file` in `settings` must name a file
# outside the Nix store, readable by root only (the daemon runs as root), e.g.
# /etc/nixdispatch/agent.token with mode 0400, provisioned by your secrets tool.
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
in
{
  options.services.nixdispatch.agent = {
    enable = lib.mkEnableOption "the nixdispatch agent, which reports this builder's capacity";
    package = opts.package "nixdispatch-agent";
    settings = opts.settings {
      role = "agent";
      file = "agent's (agent.toml)";
    };
  };

  config = lib.mkIf cfg.enable {
    launchd.daemons.nixdispatch-agent.serviceConfig = import ./launchd.nix {
      program = lib.getExe' cfg.package "nixdispatch-agent";
      configFile = "${configFile}";
      path = lib.makeBinPath [ config.nix.package ] + ":/usr/bin:/bin";
    };
  };
}
