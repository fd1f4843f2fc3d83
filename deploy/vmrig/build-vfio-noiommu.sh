#!/usr/bin/env bash
# Build a vfio.ko with VFIO's no-IOMMU mode for the test guest's kernel.
# Debian builds vfio without CONFIG_VFIO_NOIOMMU, so the mode (and
# /dev/vfio/noiommu-N) does not exist there; the VM test of the NVMe
# driver's no-IOMMU path loads this module instead. Only vfio.ko is
# rebuilt, from the matching linux-source package, against the matching
# headers (installed here, as root).
#
#   deploy/vmrig/build-vfio-noiommu.sh        prints the module's path
#
# Cached next to the guest build while the kernel package is unchanged.
set -euo pipefail
cache=${VMRIG_CACHE:-$HOME/.cache/appliance-vmrig}
mkdir -p "$cache" && chmod 755 "$cache"
exec 9>"$cache/.vfio-lock"
flock 9
kpkg=${KPKG:-$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')}
[ -n "$kpkg" ] || { apt-get update -qq >&2 || true; kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}'); }
[ -n "$kpkg" ] || { echo "cannot resolve the guest kernel package" >&2; exit 1; }
kver=${kpkg#linux-image-}
out=$cache/vfio-noiommu-$kver.ko
if [ -f "$out" ]; then echo "$out"; exit 0; fi
series=$(echo "$kver" | cut -d. -f1,2)
[ "$series" = 6.1 ] || { echo "vfio's source files are listed for 6.1, the guest runs $kver" >&2; exit 1; }
install_headers() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "linux-headers-$kver" >&2; }
[ -d "/usr/src/linux-headers-$kver" ] || install_headers || { apt-get update -qq >&2; install_headers; }
src=$cache/vfio-src-$series
if [ ! -f "$src/container.c" ]; then
  (cd "$cache" && { ls linux-source-"$series"_*.deb >/dev/null 2>&1 || apt-get download -q "linux-source-$series" >&2; })
  rm -rf "$src.tmp" && mkdir -p "$src.tmp"
  dpkg-deb --fsys-tarfile "$cache"/linux-source-"$series"_*.deb |
    tar -xO "./usr/src/linux-source-$series.tar.xz" | xz -dc |
    tar -x -C "$src.tmp" --strip-components=3 --wildcards "linux-source-$series/drivers/vfio/*.[ch]"
  mv "$src.tmp" "$src"
  rm -f "$cache"/linux-source-"$series"_*.deb
fi
b=$(mktemp -d)
trap 'rm -rf "$b"' EXIT
cp "$src"/{vfio_main.c,iova_bitmap.c,container.c,vfio.h} "$b/"
printf '%s\n' 'obj-m := vfio.o' 'vfio-y := vfio_main.o iova_bitmap.o container.o' \
  'ccflags-y := -DCONFIG_VFIO_NOIOMMU=1' > "$b/Kbuild"
make -s -C "/usr/src/linux-headers-$kver" M="$b" modules >&2
modinfo -F parm "$b/vfio.ko" | grep -q enable_unsafe_noiommu_mode ||
  { echo "the module built has no enable_unsafe_noiommu_mode" >&2; exit 1; }
cp "$b/vfio.ko" "$out.tmp" && mv "$out.tmp" "$out"
echo "$out"
