#!/usr/bin/env bash
# Build the test guest: Debian's kernel (booted as an uncompressed vmlinux,
# which QEMU starts through its PVH note, much faster under TCG) and a
# busybox initramfs with the modules and tools the VM tests need.
#
#   deploy/vmrig/build-guest.sh [OUT]     (default OUT: $VMRIG_CACHE/guest)
#
# Cached: the kernel and busybox .debs and the built files are reused while
# the kernel package and this script are unchanged. Prints OUT.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${VMRIG_CACHE:-$HOME/.cache/appliance-vmrig}
out=${1:-$cache/guest}
mkdir -p "$cache" "$out"
chmod 755 "$cache"   # apt-get download runs as _apt and writes here
# Tests build the guest from several processes at once: one at a time.
exec 9>"$cache/.lock"
flock 9

resolve_kernel() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}'; }
kpkg=${KPKG:-$(resolve_kernel)}
if [ -z "$kpkg" ]; then
  # Package lists never fetched on this machine: fetch them once.
  apt-get update -qq >&2 || true
  kpkg=$(resolve_kernel)
fi
[ -n "$kpkg" ] || { echo "cannot resolve the guest kernel package" >&2; exit 1; }
stamp="$kpkg $(sha256sum "$0" "$here/init" | sha256sum | cut -c1-16)"
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] && [ -f "$out/initramfs.cpio.gz" ]; then
  echo "$out"; exit 0
fi

cd "$cache"
ls "${kpkg}"_*.deb >/dev/null 2>&1 || apt-get download -q "$kpkg" >&2
ls busybox-static_*.deb >/dev/null 2>&1 || apt-get download -q busybox-static >&2
ls mdadm_*.deb >/dev/null 2>&1 || apt-get download -q mdadm >&2
rm -rf "$cache/mdadm-root" && mkdir -p "$cache/mdadm-root" && dpkg-deb -x "$cache"/mdadm_*.deb "$cache/mdadm-root"
kroot=$cache/kroot-$kpkg
if [ ! -d "$kroot" ]; then
  rm -rf "$kroot.tmp" && mkdir -p "$kroot.tmp"
  dpkg-deb -x "${kpkg}"_*.deb "$kroot.tmp"
  mv "$kroot.tmp" "$kroot"
fi
kver=$(ls "$kroot/lib/modules" | head -1)
[ -f "$kroot/lib/modules/$kver/modules.dep" ] || depmod -b "$kroot" "$kver"
python3 - "$kroot/boot/vmlinuz-$kver" "$out/vmlinux" <<'PY'
import lzma, sys
data = open(sys.argv[1], "rb").read()
start = data.find(b"\xfd7zXZ\x00")
if start < 0:
    sys.exit("no xz payload in the kernel image")
open(sys.argv[2], "wb").write(lzma.LZMADecompressor().decompress(data[start:]))
PY

st=$(mktemp -d)
trap 'rm -rf "$st"' EXIT
mkdir -p "$st"/{bin,sbin,etc,proc,sys,dev,tmp,run,mnt,root,rig,lib64,usr/local/bin,usr/sbin}
dpkg-deb --fsys-tarfile "$cache"/busybox-static_*.deb | tar -x -C "$st" ./bin/busybox
cp "$st/bin/busybox" "$out/busybox"
for applet in $("$st/bin/busybox" --list); do [ -e "$st/bin/$applet" ] || ln -s busybox "$st/bin/$applet"; done
ln -sf ../bin/busybox "$st/sbin/modprobe"

# Modules and everything they depend on, resolved by the host's kmod.
mods="virtio_pci virtio_blk ext4 crc32c_generic nvme vfio_pci vfio_iommu_type1 raid1 raid456 md_mod virtio_net nvme_tcp"
for m in $mods; do
  modprobe -d "$kroot" -S "$kver" --show-depends "$m" 2>/dev/null | awk '/^insmod/{print $2}'
done | awk '!seen[$0]++' | while read -r ko; do
  rel=${ko#"$kroot"/}
  mkdir -p "$st/$(dirname "$rel")" && cp "$ko" "$st/$rel"
done
cp "$kroot/lib/modules/$kver"/modules.{order,builtin,builtin.modinfo} "$st/lib/modules/$kver/"
depmod -b "$st" "$kver"

# Host tools the tests run in the guest, with their shared libraries.
add_bin() {
  cp -L "$1" "$st/$2/"
  ldd "$1" | awk '/=> \//{print $3} /^\t\/lib64/{print $1}' | while read -r lib; do
    mkdir -p "$st/$(dirname "$lib")"
    [ -e "$st/$lib" ] || cp -L "$lib" "$st/$lib"
  done
}
add_bin "$(command -v fio)" usr/local/bin
add_bin "$(command -v mke2fs)" usr/sbin
add_bin "$(command -v e2fsck)" usr/sbin
add_bin "$cache/mdadm-root/sbin/mdadm" usr/sbin
# nvme-cli (the host package: deploy/install-deps.sh test installs it).
add_bin "$(command -v nvme)" usr/sbin
ln -sf mke2fs "$st/usr/sbin/mkfs.ext4"
cp "$here/init" "$st/init" && chmod +x "$st/init"
(cd "$st" && find . | "$st/bin/busybox" cpio -o -H newc 2>/dev/null) | gzip -1 > "$out/initramfs.cpio.gz"
echo "$stamp" > "$out/stamp"
echo "$out"
