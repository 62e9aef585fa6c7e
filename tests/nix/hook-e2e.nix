# Derivations for the build-hook end-to-end tests: only a static busybox, no nixpkgs.
# Every output records where it was built: builders have /nix/builder-id in their own /nix
# (the sandbox is off), the client has none and writes `local`.
# With `gate`, each leaf waits until that file exists (the builders see the host's /tmp), so a
# test can look at builds while they run and then let them finish.
{ tag, leaves ? 4, sleep ? "0", fail ? false, gate ? "" }:
let
  bbdir = builtins.path { path = ./bb; name = "busybox-static"; };
  bb = "${bbdir}/busybox";
  mk = name: script: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = bb;
    args = [ "sh" "-c" script ];
  };
  where = "$(${bb} cat /nix/builder-id 2>/dev/null || echo local)";
  wait = if gate == "" then "" else "while ! ${bb} test -e ${gate}; do ${bb} sleep 0.1; done; ";
  leaf = i: mk "leaf${toString i}-${tag}" "${wait}${bb} sleep ${sleep}; echo leaf${toString i} ${where} > $out";
  all = builtins.genList (i: leaf (i + 1)) leaves;
in
if fail then
  mk "fail-${tag}" "echo nixdispatch-e2e-failure-marker on ${where}; exit 3"
else
  mk "top-${tag}" "(${bb} cat ${toString all}; echo top ${where}) > $out"
