#!/bin/bash
# Builds the qemu stage's VM: Debian bookworm, systemd as PID 1, pure cgroup v2.
#   build-image.sh OUTDIR   ->  OUTDIR/rootfs.img (ext4, 2 GB sparse), OUTDIR/vmlinuz, OUTDIR/initrd.img
# This file, aero-vm-stage.service and provision.sh define the image: qemu-stage hashes them
# and rebuilds when they change. Runs as root (mmdebstrap --mode=root, chroot).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$1
root=$out/root
overlay=$out/overlay

source "$here/apt-sources.sh"   # host_sources: the apt mirror this host already uses
mapfile -t mirrors < <(host_sources)
[ "${#mirrors[@]}" -gt 0 ] || { echo "build-image: no bookworm apt source found on the host" >&2; exit 1; }

# Files laid into the root before any package is unpacked, so the kernel's first (and only)
# initramfs is already the small one: MODULES=list + just what is needed to find /dev/vda.
rm -rf "$overlay"
mkdir -p "$overlay/etc/initramfs-tools/conf.d" "$overlay/etc/initramfs-tools/hooks" \
         "$overlay/etc/modules-load.d" "$overlay/etc/systemd/system"
echo 'MODULES=list' > "$overlay/etc/initramfs-tools/conf.d/aero-vm.conf"
cat > "$overlay/etc/initramfs-tools/hooks/aero-vm" <<'HOOK'
#!/bin/sh
# force_load = copy into the initramfs and load at boot (udev would find virtio, not ext4).
[ "$1" = prereqs ] && exit 0
. /usr/share/initramfs-tools/hook-functions
force_load virtio_pci
force_load virtio_blk
force_load ext4
HOOK
chmod 755 "$overlay/etc/initramfs-tools/hooks/aero-vm"
printf '%s\n' 9p 9pnet 9pnet_virtio > "$overlay/etc/modules-load.d/aero-9p.conf"
cp "$here/aero-vm-stage.service" "$overlay/etc/systemd/system/"

packages=systemd,systemd-sysv,dbus,dbus-user-session,libpam-systemd,udev,systemd-container
packages+=,python3,python3-venv,python3-pip,procps,iproute2,kmod,util-linux,nodejs
packages+=,linux-image-amd64,initramfs-tools
packages+=,podman,catatonit   # tests/container: the Dockerfile and pod examples, as root

rm -rf "$root"
mmdebstrap --mode=root --variant=minbase --quiet \
    --include="$packages" \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --setup-hook="cp -a '$overlay/.' \"\$1/\"" \
    --customize-hook='echo aero-vm > "$1/etc/hostname"' \
    --customize-hook='chroot "$1" systemctl enable aero-vm-stage.service' \
    --customize-hook="chroot \"\$1\" /bin/bash -s -- --user-only < '$here/provision.sh'" \
    bookworm "$root" "${mirrors[@]}"

# The guest must be able to mount the 9p shares.
for m in 9p 9pnet 9pnet_virtio; do
    find "$root/lib/modules" -name "$m.ko*" | grep -q . || { echo "build-image: module $m missing" >&2; exit 1; }
done

cp "$root"/boot/vmlinuz-* "$out/vmlinuz"
cp "$root"/boot/initrd.img-* "$out/initrd.img"
# No loop mount needed: mkfs copies the tree in. Sparse, so 2 GB costs only what is used.
mkfs.ext4 -q -L aero-root -d "$root" "$out/rootfs.img" 2G
rm -rf --one-file-system "$root" "$overlay"
