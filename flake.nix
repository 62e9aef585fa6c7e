{
  description = "nixdispatch: a remote-build scheduler for Nix community builders";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
        "x86_64-darwin"
        "aarch64-darwin"
      ];
      forAll = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      # Each module with the overlay, so that `pkgs.nixdispatch` (the default package of
      # every module) is this flake's build.
      withOverlay = path: {
        imports = [ path ];
        nixpkgs.overlays = [ self.overlays.default ];
      };
    in
    {
      overlays.default = final: _prev: {
        nixdispatch = final.callPackage ./deploy/nix/package.nix { };
      };

      packages = forAll (pkgs: rec {
        nixdispatch = pkgs.callPackage ./deploy/nix/package.nix { };
        default = nixdispatch;
      });

      nixosModules = {
        scheduler = withOverlay ./deploy/nixos/scheduler.nix;
        agent = withOverlay ./deploy/nixos/agent.nix;
        gate = withOverlay ./deploy/nixos/gate.nix;
        member = withOverlay ./deploy/nixos/member.nix;
        default = {
          imports = [
            self.nixosModules.scheduler
            self.nixosModules.agent
            self.nixosModules.gate
            self.nixosModules.member
          ];
        };
      };

      darwinModules = {
        agent = withOverlay ./deploy/darwin/agent.nix;
        member = withOverlay ./deploy/darwin/member.nix;
        default = {
          imports = [
            self.darwinModules.agent
            self.darwinModules.member
          ];
        };
      };
    };
}
