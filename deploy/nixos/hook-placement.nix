# Where a member's Nix must be told about nixdispatch-hook, by Nix implementation and
# version (docs/hook.md, "Which Nix and where build-hook goes"):
#   "nix.conf"            `build-hook` in nix.conf (Nix 2.8–2.24, 2.34 and later; Lix 2.90–2.93)
#   "daemon-command-line" `nix-daemon --option build-hook …`: Nix 2.25–2.33 re-apply the
#                         default after reading nix.conf, so nix.conf alone is silently ignored
#                         (NixOS/nix#15083, fixed in 2.34)
#   "unsupported"         Lix 2.94 and later (a Cap'n Proto hook protocol), Nix before 2.8
# Pure (builtins only): the member modules call it with their Nix package's pname and
# version, and tests/deploy.rs checks it against the table for the versions tested there.
{ pname, version }:
let
  atLeast = v: builtins.compareVersions version v >= 0;
in
if pname == "lix" then
  (if atLeast "2.94" then "unsupported" else "nix.conf")
else if !(atLeast "2.8") then
  "unsupported"
else if atLeast "2.25" && !(atLeast "2.34") then
  "daemon-command-line"
else
  "nix.conf"
