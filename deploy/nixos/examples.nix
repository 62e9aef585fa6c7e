# Example `settings` of each module, as plain data: the modules show them as their options'
# examples, and the test suite (tests/deploy.rs) evaluates this file, renders each example to
# TOML and loads it with the binary's real configuration loader, so an example that a binary
# would reject fails the tests. Secrets appear only as paths under /run/credentials (systemd
# LoadCredential=): the Nix store never holds them.
{
  # services.nixdispatch.scheduler.settings → nixdispatch-scheduler --config
  scheduler = {
    listen = "0.0.0.0:50051";
    metrics_listen = "127.0.0.1:9464";
    agents = {
      report_interval_millis = 10000;
    };
    placement = {
      policy = "least-loaded";
    };
    probe = {
      enabled = true;
      key_file = "/run/credentials/nixdispatch-scheduler.service/probe-key";
      user = "nix-probe";
    };
  };

  # services.nixdispatch.agent.settings → nixdispatch-agent --config
  agent = {
    scheduler = "http://scheduler.example.org:50051";
    host_id = "build01";
    store_uri = "ssh-ng://nix-remote@build01.example.org";
    host_key_file = "/etc/ssh/ssh_host_ed25519_key.pub";
    speed_factor = 2.0;
    credential_file = "/run/credentials/nixdispatch-agent.service/token";
    timing = {
      reconnect_max_millis = 30000;
    };
    # The builder-side gate asks through this socket (services.nixdispatch.agent.gateSocket
    # sets it where the gate is enabled).
    gate = {
      socket = "/run/nixdispatch-agent/gate.sock";
    };
  };

  # services.nixdispatch.member.settings → the hook's NIXDISPATCH_HOOK_CONFIG file
  hook = {
    scheduler = "http://scheduler.example.org:50051";
    client_id = "alice-laptop";
    ssh_identity = "/etc/nix/id_nixdispatch";
    credential_file = "/run/credentials/nix-daemon.service/nixdispatch-token";
    max_host_attempts = 3;
    timeouts = {
      connect_millis = 1000;
    };
    # One persistent SSH connection per builder, joined by every build (docs/hook.md).
    ssh_reuse = {
      enabled = true;
      persist_secs = 60;
    };
  };

  # services.nixdispatch.gate.settings → nixdispatch-gate --config (branch `gate`)
  gate = {
    agent_socket = "/run/nixdispatch-agent/gate.sock";
    host_id = "build01";
    log_file = "/var/log/nixdispatch/gate.log";
  };
}
