# NixOS VM test: a machine with the pershome module and a USB stick (one FAT32 partition with
# a pershome/ directory) logs a user in on the console; their home must be pershomefs over the
# stick, and after logout the file they wrote must be on the stick.
#
# Run (needs nixpkgs and KVM or patience):
#   nix-build packaging/nix/vm-test.nix
#   nix-build packaging/nix/vm-test.nix -A driverInteractive   # then ./result/bin/nixos-test-driver
#
# Not run on the project's build machines: they cannot fetch nixpkgs (see docs/install.md).
{
  pkgs ? import <nixpkgs> { },
}:

let
  # A stick as a shop sells it: MBR, one FAT32 partition from 1 MiB, made without a loop
  # device; then the pershome/ directory `pershome prepare` would create.
  stickImage =
    pkgs.runCommand "pershome-stick.img"
      {
        nativeBuildInputs = [
          pkgs.dosfstools
          pkgs.mtools
          pkgs.util-linux
        ];
      }
      ''
        truncate -s 64M stick.img
        echo 'start=2048, type=c' | sfdisk stick.img
        mkfs.vfat -F 32 -n STICK --offset 2048 stick.img $(( (64 * 1024 * 1024 / 512 - 2048) / 2 ))
        mmd -i stick.img@@1M ::/pershome
        cp stick.img $out
      '';
in
pkgs.testers.runNixOSTest {
  name = "pershome";

  nodes.machine =
    { pkgs, ... }:
    {
      imports = [ ../../nixos-module ];

      services.pershome = {
        enable = true;
        users = [ "alice" ];
        pamServices = [ "login" ];
        commitInterval = 2;
      };

      users.users.alice = {
        isNormalUser = true;
        password = "stick-home";
      };

      environment.systemPackages = [ pkgs.mtools ];

      # The stick on an xHCI controller, as a removable USB mass-storage device. -blockdev
      # (not -drive) so a test can unplug and re-plug it through QMP. The image is copied
      # into the VM's state directory (qemu's working directory) before boot.
      virtualisation.qemu.options = [
        "-device qemu-xhci,id=xhci"
        "-blockdev driver=file,filename=stick.img,node-name=stickfile"
        "-blockdev driver=raw,file=stickfile,node-name=stick"
        "-device usb-storage,bus=xhci.0,drive=stick,id=stickdev,removable=on"
      ];
    };

  testScript = ''
    import os
    import shutil

    stick = machine.state_dir / "stick.img"
    shutil.copy("${stickImage}", stick)
    os.chmod(stick, 0o644)

    machine.start()
    machine.wait_for_unit("multi-user.target")
    machine.wait_until_succeeds("test -b /dev/sda1")

    with subtest("the configuration files come from the module"):
        machine.succeed("grep -qx alice /etc/ltsp/persistent_homes")
        machine.succeed("grep -q 'commit_interval = 2' /etc/pershome/config.toml")
        machine.succeed("grep -q pam_exec.so /etc/pam.d/login")
        machine.succeed("pershome-config wants alice")
        machine.succeed("pershome-config doctor")

    with subtest("logging in on the console mounts pershomefs over the stick as the home"):
        machine.wait_for_unit("getty@tty1.service")
        machine.wait_until_tty_matches("1", "login: ")
        machine.send_chars("alice\n")
        machine.wait_until_tty_matches("1", "Password: ")
        machine.send_chars("stick-home\n")
        machine.wait_until_succeeds("pgrep -u alice bash")
        machine.send_chars("findmnt -n -o FSTYPE --target ~ > /tmp/home-fstype\n")
        machine.wait_for_file("/tmp/home-fstype")
        fstype = machine.succeed("cat /tmp/home-fstype").strip()
        assert fstype == "fuse.pershomefs", f"expected fuse.pershomefs, got {fstype!r}"
        machine.send_chars("echo written-at-login > ~/proof.txt && ln -s proof.txt ~/link\n")
        machine.wait_until_succeeds("test -f /home/alice/proof.txt")

    with subtest("logging out unmounts the home and leaves the file on the stick"):
        machine.send_chars("exit\n")
        machine.wait_until_fails("findmnt -n -t fuse.pershomefs /home/alice")
        machine.wait_until_fails("findmnt -n /dev/sda1")
        listing = machine.succeed("MTOOLS_SKIP_CHECK=1 mdir -i /dev/sda1 -b ::/pershome")
        assert "proof.txt" in listing, f"expected proof.txt on the stick, got:\n{listing}"
        content = machine.succeed("MTOOLS_SKIP_CHECK=1 mtype -i /dev/sda1 ::/pershome/proof.txt").strip()
        assert content == "written-at-login", f"expected written-at-login, got {content!r}"
  '';
}
