# NixOS module: the builder-side gate (docs/gate.md, branch `gate`): sshd runs
# nixdispatch-gate as the forced command of every member, so that each remote build waits for
# a slot from the scheduler before it starts.
#
#   services.nixdispatch.gate = {
#     enable = true;
#     settings = { scheduler = "http://scheduler.example.org:50051"; host_id = "build01"; };
#   };
#
# The gate runs as the member (it is sshd's forced command, not a service), so it cannot get
# systemd credentials: a `credential_file` in `settings` must be a file outside the Nix store
# that the members' group may read.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.nixdispatch.gate;
  opts = import ../nix/options.nix { inherit lib pkgs; };
  configFile = opts.toml.generate "nixdispatch-gate.toml" cfg.settings;
  logDir = "/var/log/nixdispatch";
in
{
  options.services.nixdispatch.gate = {
    enable = lib.mkEnableOption "the nixdispatch gate as sshd's forced command for members";
    package = opts.package "nixdispatch-gate";
    group = lib.mkOption {
      type = lib.types.str;
      default = "nix-members";
      description = "Members log in as users of this group; sshd forces the gate on it.";
    };
    trustMembers = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = ''
        Make the group's users Nix trusted-users, as any remote builder needs for
        build-remote to import members' closures without signatures.
      '';
    };
    settings = opts.settings {
      role = "gate";
      file = "gate's (gate.toml)";
    };
  };

  config = lib.mkIf cfg.enable {
    users.groups.${cfg.group} = { };
    nix.settings.trusted-users = lib.mkIf cfg.trustMembers [ "@${cfg.group}" ];
    # The gate logs as the member: a sticky directory every member may write to.
    systemd.tmpfiles.rules = [ "d ${logDir} 1733 root root -" ];
    services.openssh.extraConfig = ''
      # Drop NAT state of silent ssh:// sessions that wait for a slot.
      ClientAliveInterval 60
      Match Group ${cfg.group}
        ForceCommand ${lib.getExe' cfg.package "nixdispatch-gate"} --config ${configFile}
        AllowTcpForwarding no
        AllowAgentForwarding no
        AllowStreamLocalForwarding no
        X11Forwarding no
        PermitTunnel no
      Match all
    '';
  };
}
