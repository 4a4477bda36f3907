# NixOS module for pershome: home directories on FAT or exFAT USB sticks, mounted at login by
# a PAM session hook (pam_exec running `pershome-config session`).
#
#   imports = [ ./nixos-module ];
#   services.pershome = { enable = true; users = [ "joseph" ]; };
#
# It writes /etc/ltsp/persistent_homes and /etc/pershome/config.toml from its options and adds
# the session rule to the chosen PAM services. Not evaluated on the project's build machines
# (they cannot fetch nixpkgs): see docs/install.md.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  cfg = config.services.pershome;
  inherit (lib)
    mkEnableOption
    mkOption
    mkIf
    types
    literalExpression
    ;

  settingsFormat = pkgs.formats.toml { };

  # The keys are those of src/sysconfig.rs (documented in docs/admin-guide.md); the typed
  # options win over the free-form `settings`.
  configFile = settingsFormat.generate "pershome-config.toml" (
    cfg.settings
    // {
      commit_interval = cfg.commitInterval;
      honour_user_file = cfg.honourUserFile;
    }
  );

  # The rule `pershome-config add-user` applies (src/homes_list.rs, check_user_name): 1 to 32
  # of A-Z a-z 0-9 . _ -, not starting with '-', not . or .., not all digits. A name the hook
  # would reject must fail the build, not every login of that user.
  validUserName =
    name:
    builtins.match "[A-Za-z0-9._][A-Za-z0-9._-]{0,31}" name != null
    && builtins.match "[0-9]+" name == null
    && name != "."
    && name != "..";
  invalidUsers = builtins.filter (u: !validUserName u) cfg.users;
in
{
  options.services.pershome = {
    enable = mkEnableOption ''
      pershome: users listed in {option}`services.pershome.users` (or, with
      {option}`services.pershome.honourUserFile`, users who created
      {file}`~/.persistent_home`) get their home directory from the {file}`pershome/`
      directory of their USB stick at login, through the FUSE filesystem pershomefs
    '';

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ../packaging/nix/package.nix { };
      defaultText = literalExpression "pkgs.callPackage ./packaging/nix/package.nix { }";
      description = "The pershome package (pershomefs, pershome and pershome-config).";
    };

    users = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [
        "joseph"
        "maria"
      ];
      description = ''
        Users whose home directory lives on their stick, written one per line to
        {file}`/etc/ltsp/persistent_homes`. The file is read-only on NixOS: manage the list
        here instead of with `pershome-config add-user`.
      '';
    };

    pamServices = mkOption {
      type = types.listOf types.str;
      default = [
        "login"
        "sshd"
        "su"
      ];
      example = [
        "login"
        "gdm-password"
        "lightdm"
      ];
      description = ''
        PAM services whose sessions get the pershome hook (an optional `pam_exec` session
        rule): the ways people log in on this machine, such as `login`, `sshd`,
        `gdm-password` or `lightdm`. A name no program uses only creates an unused
        {file}`/etc/pam.d` file with NixOS's default stack.
      '';
    };

    commitInterval = mkOption {
      type = types.ints.between 1 3600;
      default = 5;
      description = ''
        Seconds between metadata commits of a mounted home (`commit_interval` in
        {file}`/etc/pershome/config.toml`). A stick pulled without logging out loses at most
        this much metadata (names, modes, times); file contents are written through.
      '';
    };

    honourUserFile = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Whether a user may ask for a stick home by creating {file}`~/.persistent_home` in
        their normal home (`honour_user_file` in {file}`/etc/pershome/config.toml`). When
        false, only {option}`services.pershome.users` counts.
      '';
    };

    settings = mkOption {
      type = settingsFormat.type;
      default = { };
      example = literalExpression ''
        {
          on_missing_stick = "fallback";
          logout_timeout = 10;
          stick.filesystems = [ "vfat" "exfat" ];
        }
      '';
      description = ''
        Further keys of {file}`/etc/pershome/config.toml` (see docs/admin-guide.md). An
        unknown key or a bad value makes the login hook log an error and fall back to the
        normal home; `pershome-config doctor` reports it.
      '';
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = invalidUsers == [ ];
        message = ''
          services.pershome.users contains invalid user names: ${lib.concatStringsSep ", " invalidUsers}.
          A name is 1 to 32 of A-Z a-z 0-9 . _ -, not starting with '-', not all digits
          (the rule of `pershome-config add-user`); use the login names of users.users.
        '';
      }
      {
        assertion = cfg.users != [ ] || cfg.honourUserFile;
        message = ''
          services.pershome is enabled but nobody can get a stick home: add users to
          services.pershome.users, or set services.pershome.honourUserFile = true so that
          users can ask for one with ~/.persistent_home.
        '';
      }
      {
        assertion = cfg.pamServices != [ ];
        message = ''
          services.pershome.pamServices is empty, so no login would mount a stick home: list
          the PAM services people log in through, e.g. [ "login" "sshd" ].
        '';
      }
    ];

    environment.systemPackages = [ cfg.package ];
    # `mount -t fuse.pershomefs` and fstab entries: mount.fuse3 runs `pershomefs` from PATH.
    system.fsPackages = [ cfg.package ];

    environment.etc."ltsp/persistent_homes".text = ''
      # Managed by NixOS (services.pershome.users): edits here are lost on the next rebuild.
      ${lib.concatMapStrings (u: "${u}\n") cfg.users}'';

    environment.etc."pershome/config.toml".source = configFile;

    # The hook mounts pershomefs as root with allow_other, which needs no fuse.conf setting;
    # `user_allow_other` is only needed when users mount pershomefs themselves with
    # allow_other (pam_mount's mount-home, which mounts as the user). Enable it then, and
    # only then: it lets every user's FUSE mounts be opened by others.
    programs.fuse.userAllowOther = lib.mkIf config.security.pam.mount.enable true;

    # The session hook: pam_exec runs `pershome-config session` as root at session open and
    # close. `optional`, so pershome can never refuse a login; ordered after pam_unix's
    # session rule, as pam-auth-update places the Debian profile, so the user's session is
    # set up before the home is mounted over.
    security.pam.services = lib.genAttrs cfg.pamServices (name: {
      rules.session.pershome = {
        order = config.security.pam.services.${name}.rules.session.unix.order + 10;
        control = "optional";
        modulePath = "${pkgs.pam}/lib/security/pam_exec.so";
        args = [
          "quiet"
          "stdout"
          "${cfg.package}/bin/pershome-config"
          "session"
        ];
      };
    });
  };
}
