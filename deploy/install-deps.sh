#!/usr/bin/env bash
# Install the Debian packages a task needs, idempotently and unattended.
#   deploy/install-deps.sh test    what the test suite needs
#   deploy/install-deps.sh bench   what the benchmarks need (peers, profilers)
# Packages already present are skipped; apt-get update runs at most once.
set -euo pipefail

want=()
case "${1:-test}" in
  # The test suite: the VM tests of later issues add qemu-system-x86 here.
  # make and xz-utils: the no-IOMMU VM test rebuilds vfio.ko (the kernel
  # headers it needs follow the guest kernel: build-vfio-noiommu.sh).
  # mount (losetup) and e2fsprogs: the host-safety test claims loop devices;
  # systemd: systemd-analyze checks the unit file.
  # nvme-cli: copied into the guest for the NVMe/TCP test (Linux's host).
  # iproute2: `ip` gives an NVMe/TCP test's own network namespace an
  # address, then takes it away.
  test) want=(qemu-system-x86 fio kmod e2fsprogs make xz-utils mount systemd nvme-cli iproute2) ;;
  # python3-matplotlib: the lab's plots (bench/lab/lab.py).
  bench) want=(fio valgrind python3-matplotlib) ;;
  *) echo "usage: $0 test|bench" >&2; exit 2 ;;
esac

missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing: ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
