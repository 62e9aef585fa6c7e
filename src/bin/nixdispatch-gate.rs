//! `nixdispatch-gate`: the sshd forced command on builders that makes every member's remote
//! build wait for a slot from the scheduler; see `docs/gate.md`.

fn main() -> std::process::ExitCode {
    nixdispatch::gate::main()
}
