//! `nixdispatch-hook`: the Nix build hook. Set `build-hook = /path/to/nixdispatch-hook` in
//! nix.conf (or `--option build-hook` on the daemon for Nix 2.25 to 2.33); see `docs/hook.md`.

fn main() -> std::process::ExitCode {
    nixdispatch::hook::main()
}
