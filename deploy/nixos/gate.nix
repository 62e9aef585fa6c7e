# NixOS module: the builder-side gate (docs/gate.md, branch `gate`): sshd runs
# nixdispatch-gate as the forced command of every member, so that each remote build waits for
# a slot from the scheduler before it starts.
#
#   services.nixdispatch.gate = {
#     enable = true;
#     settings = { scheduler = "http://scheduler.example.org:50051"; host_id = "build01"; };
#   };
#
# The gate runs as the member (it is sshd's forced command, not a service), so it must not
# hold the builder's credential: by default it asks the local agent through its gate socket
# (`agentSocket`; services.nixdispatch.agent then serves it), and the agent, which holds the
# credential, acts for each member as the Unix user the gate runs as. `agentSocket = null`
# is the direct mode (`settings.scheduler`, `settings.credential_file`), where every gated
# member can read that credential and act as the builder towards the scheduler.
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
    agentSocket = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = "/run/nixdispatch-agent/gate.sock";
      description = ''
        The local agent's gate socket (the gate's `agent_socket`). null: the direct mode,
        in which a `settings.credential_file` must be readable by every member (who can then
        act as this builder towards the scheduler); docs/gate.md.
      '';
    };
    settings = opts.settings {
      role = "gate";
      file = "gate's (gate.toml)";
    };
  };

  config = lib.mkIf cfg.enable {
    services.nixdispatch.gate.settings = lib.mkIf (cfg.agentSocket != null) {
      agent_socket = lib.mkDefault cfg.agentSocket;
    };
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
