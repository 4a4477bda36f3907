# pershome: a POSIX home directory on a FAT or exFAT USB stick, through FUSE.
#
# Build:  nix-build -E 'with import <nixpkgs> { }; callPackage ./packaging/nix/package.nix { }'
#
# The binaries are built and installed by buildRustPackage; every other file (man pages and
# shell completions generated from the clap definitions, the pam-auth-update profile, the XDG
# autostart entry of the login notice, the docs, the example /etc/ltsp/persistent_homes) is
# laid out by `cargo xtask install`, the same recipe the Debian package uses, so the two
# packages cannot ship different files. See docs/install.md.
#
# Not evaluated on the project's build machines: they cannot fetch nixpkgs. Only its syntax is
# checked there (`cargo xtask nix-check`).
{
  lib,
  rustPlatform,
  makeWrapper,
  util-linux,
  fuse3,
  exfat,
}:

let
  root = ../..;
in
rustPlatform.buildRustPackage {
  pname = "pershome";
  version = "0.1.0";

  src = lib.fileset.toSource {
    inherit root;
    fileset = lib.fileset.unions [
      (root + "/Cargo.toml")
      (root + "/Cargo.lock")
      (root + "/README.md")
      (root + "/src")
      (root + "/tests")
      (root + "/xtask")
      (root + "/docs")
      (root + "/packaging")
      (lib.fileset.maybeMissing (root + "/data"))
    ];
  };

  cargoLock.lockFile = root + "/Cargo.lock";

  # The workspace also holds the xtask; only the pershome crate's binaries are installed.
  cargoBuildFlags = [
    "-p"
    "pershome"
  ];
  # The integration tests mount FUSE filesystems and switch users, which the build sandbox
  # forbids (no /dev/fuse, no root): run the library's unit tests only.
  cargoTestFlags = [
    "-p"
    "pershome"
    "--lib"
  ];

  nativeBuildInputs = [ makeWrapper ];

  postInstall = ''
    # The shared install recipe, minus the binaries (installed above). The zsh completion
    # goes where nixpkgs' zsh looks; configuration examples land in $out/etc, from where the
    # NixOS module does not use them (it writes /etc itself) but they document the format.
    cargo run --offline --release -p xtask -- install \
      --no-bins \
      --prefix "$out" \
      --sysconfdir "$out/etc" \
      --zsh-dir share/zsh/site-functions
  '';

  # The login hook runs under pam_exec, whose environment has no PATH: give the binaries the
  # tools they run (blkid, mount, umount, fusermount3, mount.exfat-fuse). /run/wrappers/bin
  # comes first so that a user's pershomefs finds NixOS's setuid fusermount3; the system
  # profile comes last for systemd-run and zenity (the login notice), which a server has or
  # not as its administrator chose.
  postFixup = ''
    for program in pershomefs pershome pershome-config; do
      wrapProgram "$out/bin/$program" \
        --prefix PATH : "/run/wrappers/bin:${
          lib.makeBinPath [
            util-linux
            fuse3
            exfat
          ]
        }" \
        --suffix PATH : /run/current-system/sw/bin
    done
  '';

  meta = {
    description = "POSIX home directory on a FAT or exFAT USB stick, through FUSE";
    longDescription = ''
      pershome lets a person carry a full Linux home directory on an ordinary USB stick that
      stays formatted FAT32 or exFAT. pershomefs, a FUSE filesystem, layers owners,
      permissions, symlinks, hard links, special files, any file name and extended attributes
      over the stick's pershome/ directory while writing only FAT-legal names; a PAM session
      hook mounts it as the home directory at login.
    '';
    license = lib.licenses.gpl3Plus;
    platforms = lib.platforms.linux;
    mainProgram = "pershome";
  };
}
