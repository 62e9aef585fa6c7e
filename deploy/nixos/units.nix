# The systemd service settings of nixdispatch's services, as plain data: the NixOS modules
# put them into `systemd.services.<name>.serviceConfig`, and the test suite renders the same
# data into unit files for `systemd-analyze verify` and `systemd-analyze security`
# (tests/deploy.rs), so that what is checked here is what the modules deploy.
#
# Arguments are the command lines and credentials; nothing here needs nixpkgs.
{
  # The scheduler's ExecStart.
  schedulerExec ? "/usr/local/bin/nixdispatch-scheduler --config /etc/nixdispatch/scheduler.toml",
  # The agent's ExecStart.
  agentExec ? "/usr/local/bin/nixdispatch-agent --config /etc/nixdispatch/agent.toml",
  # `LoadCredential=` lines (`name:path`) of each: secrets are copied by systemd into
  # $CREDENTIALS_DIRECTORY (/run/credentials/<unit>/), readable by the service only, and
  # never enter the Nix store.
  schedulerCredentials ? [ ],
  agentCredentials ? [ ],
}:
let
  # What every nixdispatch service gets: no privileges, no view of the rest of the system
  # beyond what it reads, a bounded footprint.
  common = {
    DynamicUser = true;
    NoNewPrivileges = true;
    ProtectSystem = "strict";
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectClock = true;
    ProtectHostname = true;
    PrivateDevices = true;
    PrivateMounts = true;
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
    MemoryDenyWriteExecute = true;
    RemoveIPC = true;
    SystemCallArchitectures = "native";
    SystemCallFilter = [
      "@system-service"
      "~@privileged"
    ];
    SystemCallErrorNumber = "EPERM";
    CapabilityBoundingSet = "";
    AmbientCapabilities = "";
    DevicePolicy = "closed";
    UMask = "0077";
    RestrictAddressFamilies = [
      "AF_INET"
      "AF_INET6"
      "AF_UNIX"
    ];
    KillSignal = "SIGTERM";
  };
in
{
  scheduler = common // {
    Type = "exec";
    ExecStart = schedulerExec;
    # SIGTERM: health NOT_SERVING, agent streams close, in-flight calls get 10 s.
    TimeoutStopSec = 20;
    Restart = "on-failure";
    RestartSec = 2;
    # Operator state: $STATE_DIRECTORY/scheduler.sqlite3 (docs/operator-state.md).
    StateDirectory = "nixdispatch-scheduler";
    StateDirectoryMode = "0700";
    ProtectHome = true;
    PrivateTmp = true;
    ProtectProc = "invisible";
    ProcSubset = "pid";
    # Its own user namespace: no other user's files or processes are its own.
    PrivateUsers = true;
    SystemCallFilter = common.SystemCallFilter ++ [ "~@resources" ];
    LoadCredential = schedulerCredentials;
    # limits.max_connections (4096) stays well below.
    LimitNOFILE = 65536;
    # About 20 MiB for a thousand hosts and a few thousand leases; this stops a runaway.
    MemoryHigh = "512M";
    MemoryMax = "1G";
    TasksMax = 256;
  };

  agent = common // {
    Type = "exec";
    ExecStart = agentExec;
    # The agent says goodbye on SIGTERM (bounded at 2 s) and exits.
    TimeoutStopSec = 10;
    Restart = "always";
    RestartSec = 5;
    CacheDirectory = "nixdispatch-agent";
    Environment = [ "XDG_CACHE_HOME=%C/nixdispatch-agent" ];
    ProtectHome = "read-only";
    # Not PrivateTmp: the agent reports the free space of the real build directory.
    PrivateTmp = false;
    # Not ProtectProc=invisible, nor PrivateUsers: counting builds reads the build users'
    # processes as they are. Not ~@resources: `nix config show` (discovery) sets its stack
    # limit.
    LoadCredential = agentCredentials;
    # The agent stays under 10 MiB; this only stops a runaway.
    MemoryHigh = "48M";
    MemoryMax = "64M";
    TasksMax = 32;
  };
}
