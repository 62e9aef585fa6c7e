# The launchd job of the nixdispatch agent on macOS, as plain data: the nix-darwin module
# puts it into `launchd.daemons.nixdispatch-agent.serviceConfig`, and the test suite
# (tests/deploy.rs) compares it with deploy/agent/org.nixos.nixdispatch-agent.plist after
# reading that file with a real plist reader (Python's plistlib).
{
  program ? "/usr/local/bin/nixdispatch-agent",
  configFile ? "/etc/nixdispatch/agent.toml",
  path ? "/nix/var/nix/profiles/default/bin:/usr/local/bin:/usr/bin:/bin",
}:
{
  Label = "org.nixos.nixdispatch-agent";
  ProgramArguments = [
    program
    "--config"
    configFile
  ];
  EnvironmentVariables = {
    PATH = path;
    RUST_LOG = "info";
  };
  # Start at boot and restart when the process dies (a down scheduler is retried inside).
  RunAtLoad = true;
  KeepAlive = true;
  ThrottleInterval = 5;
  # SIGTERM makes the agent say goodbye; SIGKILL after this many seconds.
  ExitTimeOut = 10;
  ProcessType = "Background";
  StandardErrorPath = "/var/log/nixdispatch-agent.log";
  StandardOutPath = "/var/log/nixdispatch-agent.log";
}
