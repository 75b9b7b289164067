#!/usr/bin/env bash
# Installs what the QEMU tests need, caching downloads under .cache/qemu:
# QEMU 10 from Debian's bookworm-backports (the apt source is derived from the
# machine's own debian.sources), busybox-static, cpio, debootstrap, Debian's
# 6.1 cloud kernel (extracted, not installed) and vhost-device-vsock.
# Prints "qemu-setup: ok" at the end, or the reason it cannot run.
set -euo pipefail
cd "$(dirname "$0")/../.."
C=.cache/qemu
mkdir -p "$C"

if [ "$(id -u)" != 0 ]; then
  echo "qemu-setup: skipped: needs root (apt, device setup)"; exit 3
fi
src=/etc/apt/sources.list.d/debian.sources
if ! command -v qemu-system-x86_64 >/dev/null || ! qemu-system-x86_64 --version | grep -q "version 10"; then
  [ -f "$src" ] || { echo "qemu-setup: skipped: no $src to derive a backports source from"; exit 3; }
  uris=$(sed -n 's/^URIs: //p' "$src" | head -1)
  cat > /etc/apt/sources.list.d/bookworm-backports.sources <<X
Types: deb
URIs: $uris
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
X
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 >/dev/null
fi
need=()
for p in busybox-static cpio debootstrap; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if [ ! -d "$C/kernel/boot" ]; then
  kpkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
  (cd "$C" && apt-get download -qq "$kpkg" && rm -rf kernel && dpkg -x "${kpkg}"_*.deb kernel && rm -f "${kpkg}"_*.deb)
fi
if [ ! -x "$C/tools/bin/vhost-device-vsock" ]; then
  cargo install -q --locked vhost-device-vsock --version 0.3.0 --root "$C/tools"
fi
# A minimal Debian with systemd for the systemd VM (cached; ~1 min once).
if [ ! -x "$C/rootfs/sbin/init" ]; then
  mirror=$(sed -n 's/^URIs: //p' "$src" | head -1)
  rm -rf "$C/rootfs.tmp"
  debootstrap --variant=minbase --include=systemd,systemd-sysv,udev,kmod bookworm "$C/rootfs.tmp" "$mirror" >/dev/null
  chroot "$C/rootfs.tmp" passwd -d root >/dev/null
  mv "$C/rootfs.tmp" "$C/rootfs"
fi
echo "qemu-setup: ok"
