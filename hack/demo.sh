#!/usr/bin/env bash
# demo.sh: cwrun's main job on a sample. Builds a busybox image from
# Debian's busybox-static into podman's local storage, seals it, and
# shows what was made: the image as podman sees it, what the sealed image
# says about itself, and cryptsetup's view of the encrypted disk.
set -euo pipefail
cd "$(dirname "$0")/.."
cwrun=$PWD/bin/cwrun
work=$(mktemp -d /var/tmp/cwrun-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "a sample image from Debian's busybox-static"
mkdir -p "$work/root/bin" "$work/root/etc" "$work/root/tmp"
cp /bin/busybox "$work/root/bin/busybox"
for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -s busybox "$work/root/bin/$a"; done
echo demo > "$work/root/etc/hostname"
tar -C "$work/root" -cf "$work/root.tar" .
podman import -q \
	--change 'CMD ["/bin/sh","-c","echo hello from a sealed busybox; echo FOO=$FOO"]' \
	--change 'ENV FOO=bar' --change 'WORKDIR /tmp' \
	"$work/root.tar" localhost/cwrun-demo/busybox:latest >/dev/null
podman images localhost/cwrun-demo/busybox

say "cwrun build --tee sample cwrun-demo/busybox cwrun-demo/busybox:sealed"
podman rmi -f localhost/cwrun-demo/busybox:sealed >/dev/null 2>&1 || true
"$cwrun" build --tee sample --passphrase-out "$work/passphrase" --timings \
	cwrun-demo/busybox localhost/cwrun-demo/busybox:sealed

say "podman images: the sealed image is an ordinary image"
podman images localhost/cwrun-demo/busybox

say "cwrun inspect cwrun-demo/busybox:sealed"
"$cwrun" inspect localhost/cwrun-demo/busybox:sealed

say "outside, the sealed image says nothing about its workload"
podman image inspect --format '{{json .Config}}' localhost/cwrun-demo/busybox:sealed

say "its root file system: the krun layout"
ctr=$(podman create localhost/cwrun-demo/busybox:sealed)
podman export "$ctr" | tar -tvf - | sed 's/^/  /'
podman export "$ctr" | tar -xf - -C "$work" disk.img
podman rm "$ctr" >/dev/null

say "cryptsetup's view of disk.img"
cryptsetup luksDump "$work/disk.img" | grep -E '^Version|cipher:|sector:|offset:|length:|PBKDF:|Iterations:' | sed 's/^[[:space:]]*/  /'
cryptsetup open --test-passphrase --key-file "$work/passphrase" "$work/disk.img" &&
	echo "  the generated passphrase opens it"
printf 'wrong' > "$work/wrong"
cryptsetup open --test-passphrase --key-file "$work/wrong" "$work/disk.img" 2>/dev/null ||
	echo "  a wrong passphrase does not"

say "cwrun run: boot it as a microVM (QEMU; TCG where KVM is unusable)"
"$cwrun" run --passphrase-file "$work/passphrase" --timings localhost/cwrun-demo/busybox:sealed
