# Independent derivations for the queue's end-to-end benchmark: only a static busybox, no
# nixpkgs. Each one records, on the machine that builds it, when it started and ended (the
# kernel's uptime, which every namespace of the test machine shares) and where (the builders
# have /nix/builder-id in their own /nix; the sandbox is off): one line
# `<name> <builder> <start> <end>` in the file `<stamps>/<name>` (the builders see the host's
# /tmp) and in its output.
# `plain` builds of this machine's system; `i686` builds of i686-linux; `kvm` builds that
# require the `kvm` feature.
{ tag, stamps, plain ? 6, i686 ? 0, kvm ? 0, sleep ? "4" }:
let
  bbdir = builtins.path { path = ./bb; name = "busybox-static"; };
  bb = "${bbdir}/busybox";
  now = "$(${bb} cut -d' ' -f1 /proc/uptime)";
  mk = kind: i: system: features: let name = "${kind}${toString i}-${tag}"; in derivation {
    inherit name system;
    builder = bb;
    requiredSystemFeatures = features;
    args = [ "sh" "-c" ''
      s=${now}; ${bb} sleep ${sleep}; e=${now}
      h=$(${bb} cat /nix/builder-id 2>/dev/null || echo local)
      echo "${name} $h $s $e" > ${stamps}/${name}
      echo "${name} $h $s $e" > $out
    '' ];
  };
  n = count: f: builtins.genList (i: f (i + 1)) count;
in
  n plain (i: mk "plain" i builtins.currentSystem [ ])
  ++ n i686 (i: mk "i686-" i "i686-linux" [ ])
  ++ n kvm (i: mk "kvm" i builtins.currentSystem [ "kvm" ])
