# NixOS module: the nixdispatch scheduler.
#
#   services.nixdispatch.scheduler = {
#     enable = true;
#     settings = { listen = "0.0.0.0:50051"; probe.enabled = true; };  # scheduler.toml
#     credentials.probe-key = "/var/lib/secrets/nixdispatch-probe-key";
#   };
#
# `settings` is the scheduler's TOML configuration as Nix data (every key is documented in
# scheduler/src/config.rs and deploy/scheduler/scheduler.example.toml; unknown keys stop the
# scheduler at start, naming the key). Secrets never go into `settings`, which lands in the
# Nix store: name them in `credentials` (systemd LoadCredential=) and refer to them as
# /run/credentials/nixdispatch-scheduler.service/<name>.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.nixdispatch.scheduler;
  opts = import ../nix/options.nix { inherit lib pkgs; };
  configFile = opts.toml.generate "nixdispatch-scheduler.toml" cfg.settings;
  units = import ./units.nix {
    schedulerExec = "${lib.getExe' cfg.package "nixdispatch-scheduler"} --config ${configFile} --log-format json";
    schedulerCredentials = opts.loadCredential cfg.credentials;
  };
  listen = cfg.settings.listen or "127.0.0.1:50051";
  port = lib.toInt (lib.last (lib.splitString ":" listen));
  metricsPort = lib.toInt (lib.last (lib.splitString ":" cfg.settings.metrics_listen));
in
{
  options.services.nixdispatch.scheduler = {
    enable = lib.mkEnableOption "the nixdispatch remote-build scheduler";
    package = opts.package "nixdispatch-scheduler";
    settings = opts.settings {
      role = "scheduler";
      file = "scheduler's (scheduler.toml)";
    };
    credentials = opts.credentials {
      unit = "nixdispatch-scheduler.service";
      example.probe-key = "/var/lib/secrets/nixdispatch-probe-key";
    };
    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Open the gRPC port (from settings.listen) and the metrics port, if any.";
    };
  };

  config = lib.mkIf cfg.enable {
    systemd.services.nixdispatch-scheduler = {
      description = "nixdispatch remote-build scheduler";
      documentation = [ "https://github.com/nix-community/nixdispatch" ];
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      serviceConfig = units.scheduler;
    };
    networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall (
      [ port ] ++ lib.optional (cfg.settings ? metrics_listen) metricsPort
    );
  };
}
