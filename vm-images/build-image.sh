#!/bin/bash
# Builds a bootable test VM for icr-probe from Debian's packages:
#
#   build-image.sh NAME OUTDIR [ARCH [LISTS]]
#
# NAME.env (beside this script) says which suite the userland and the kernel
# come from. ARCH is Debian's architecture (default amd64; arm64 needs
# qemu-user-static registered with binfmt_misc, which `cargo xtask vm-test
# --arch arm64` does, since debootstrap and apt run the guest's programs in
# the chroot). LISTS names the package lists beside this script to install
# (default "packages-kernel packages"); the Python venv of the lab is made only
# when python3 is among them. The result, OUTDIR, holds:
#   rootfs.ext4      the root file system (no partition table, no bootloader)
#   vmlinuz, initrd.img, kernel-release   the image's own kernel, for qemu -kernel
#   apt-policy.txt   where the kernel came from (apt-cache policy)
# qemu boots it with -kernel vmlinuz -initrd initrd.img
# -append "root=/dev/vda rw init=/sbin/icr-vm-init ..." (see xtask/src/vm.rs),
# or with init=/lib/systemd/systemd icr-vm.systemd, where icr-vm-run.service
# runs the same init once the system is up.
#
# Runs as root. Everything it mounts lives in a private mount namespace, so
# the mounts go away with it, also when it fails or is killed; its scratch
# directory (OUTDIR.build) is removed on exit. OUTDIR appears only complete.
set -euo pipefail

if [ "${ICR_VM_IN_NAMESPACE:-}" != 1 ]; then
    ICR_VM_IN_NAMESPACE=1 exec unshare --mount --propagation private -- "$0" "$@"
fi

here=$(cd "$(dirname "$0")" && pwd)
name=${1:?usage: build-image.sh NAME OUTDIR [ARCH [LISTS]]}
out=${2:?usage: build-image.sh NAME OUTDIR [ARCH [LISTS]]}
arch=${3:-amd64}
lists=${4:-packages-kernel packages}
[ -f "$here/$name.env" ] || { echo "build-image: no recipe $here/$name.env" >&2; exit 2; }
# shellcheck source=/dev/null
. "$here/$name.env"
: "${SUITE:?}" "${KERNEL_SUITE:?}"
mirror=${ICR_VM_MIRROR:-http://deb.debian.org/debian}
security_mirror=${ICR_VM_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

work="$out.build"
root="$work/root"
cleanup() {
    local status=$?
    for mount in dev/pts dev proc sys; do
        if mountpoint -q "$root/$mount" 2>/dev/null; then umount -l "$root/$mount" || true; fi
    done
    rm -rf "$work"
    [ $status = 0 ] || echo "build-image: $name failed ($status)" >&2
}
trap cleanup EXIT
rm -rf "$work" "$out"
mkdir -p "$work"

say() { echo "build-image [$name]: $*" >&2; }

say "debootstrap $SUITE (minbase, $arch) from $mirror"
debootstrap --variant=minbase --arch="$arch" "$SUITE" "$root" "$mirror"

{
    echo "deb $mirror $SUITE main"
    echo "deb $mirror $SUITE-updates main"
    echo "deb $security_mirror $SUITE-security main"
    if [ "$KERNEL_SUITE" != "$SUITE" ]; then echo "deb $mirror $KERNEL_SUITE main"; fi
} > "$root/etc/apt/sources.list"
# No service starts inside the chroot.
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"
cp /etc/resolv.conf "$root/etc/resolv.conf"
mount -t proc proc "$root/proc"
mount -t sysfs sys "$root/sys"
mount --bind /dev "$root/dev"
mount -t devpts devpts "$root/dev/pts"

in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"; }

packages=$(cd "$here" && sed -e 's/#.*//' $lists | xargs)
say "installing: $packages"
in_root apt-get update -q
in_root apt-get install -y -q --no-install-recommends $packages

kernel_package=linux-image-$arch
if [ "$arch" != "$(dpkg --print-architecture)" ]; then
    # Under qemu-user every program the initramfs hooks start is emulated:
    # MODULES=most took 14 minutes per initramfs (and apt makes two). This
    # one only mounts the root file system of the test VM (virtio-blk, ext4);
    # the rest loads from it.
    # (Not /etc/initramfs-tools/modules: a conffile of the package to come.)
    mkdir -p "$root/etc/initramfs-tools/conf.d" "$root/usr/share/initramfs-tools/modules.d"
    echo MODULES=list > "$root/etc/initramfs-tools/conf.d/icr-vm"
    printf '%s\n' virtio_pci virtio_blk ext4 > "$root/usr/share/initramfs-tools/modules.d/icr-vm"
fi
say "kernel: $kernel_package from $KERNEL_SUITE"
in_root apt-cache policy "$kernel_package" | tee "$work/apt-policy.txt" >&2
target=()
# Only for another suite: -t bookworm would prefer bookworm over bookworm-security.
if [ "$KERNEL_SUITE" != "$SUITE" ]; then target=(-t "$KERNEL_SUITE"); fi
if [ "${INITRAMFS_FROM_SUITE:-}" = 1 ]; then
    # An older suite's initramfs-tools would pull that suite's udev, which
    # conflicts with the userland's libudev1: take the userland's.
    in_root apt-get install -y -q --no-install-recommends initramfs-tools
    in_root apt-get install -y -q --no-install-recommends "${target[@]}" "$kernel_package"
else
    in_root apt-get install -y -q --no-install-recommends "${target[@]}" "$kernel_package" initramfs-tools
fi

# The lab's QUIC peer (aioquic) is on PyPI, not in Debian 12. pip checks
# certificates against the build machine's bundle (which may carry a local CA).
if [ -x "$root/usr/bin/python3" ]; then
    python_packages=$(sed -e 's/#.*//' "$here/python-packages" | xargs)
    say "lab Python: /opt/icr-lab-python with $python_packages"
    cp /etc/ssl/certs/ca-certificates.crt "$root/tmp/build-ca.crt"
    in_root python3 -m venv /opt/icr-lab-python
    in_root /opt/icr-lab-python/bin/pip install -q --no-cache-dir --cert /tmp/build-ca.crt $python_packages
    rm -f "$root/tmp/build-ca.crt"
    in_root /opt/icr-lab-python/bin/python3 -c 'import aioquic; print("aioquic", aioquic.__version__)' >&2
fi

install -m 755 "$here/init" "$root/sbin/icr-vm-init"
# The same init as a service, for the boot with systemd (kernel command line
# icr-vm.systemd): it runs once systemd has brought the system up.
install -m 644 "$here/icr-vm-run.service" "$root/etc/systemd/system/icr-vm-run.service"
mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
ln -sf /etc/systemd/system/icr-vm-run.service "$root/etc/systemd/system/multi-user.target.wants/icr-vm-run.service"
echo icr-vm > "$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 icr-vm\n::1 localhost\n' > "$root/etc/hosts"
printf '/dev/vda / ext4 rw 0 1\n' > "$root/etc/fstab"
: > "$root/etc/resolv.conf"
rm -f "$root/usr/sbin/policy-rc.d"
in_root apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin

# The kernel and initrd, for qemu -kernel/-initrd.
kernels=("$root"/boot/vmlinuz-*)
[ ${#kernels[@]} = 1 ] || { say "expected one kernel in /boot, found: ${kernels[*]}"; exit 1; }
release=${kernels[0]##*/vmlinuz-}
mkdir -p "$work/out"
cp "${kernels[0]}" "$work/out/vmlinuz"
cp "$root/boot/initrd.img-$release" "$work/out/initrd.img"
echo "$release" > "$work/out/kernel-release"
mv "$work/apt-policy.txt" "$work/out/"

for mount in dev/pts dev proc sys; do umount "$root/$mount"; done
# Room for the tests' files (/tmp is on the root file system in the guest).
used_mb=$(du -sm "$root" | cut -f1)
size_mb=$((used_mb + 1536))
say "root file system: ${used_mb} MiB used, image ${size_mb} MiB"
mkfs.ext4 -q -F -L icr-vm -d "$root" "$work/out/rootfs.ext4" "${size_mb}M"
mv "$work/out" "$out"
say "done: $out (kernel $release)"
