#!/usr/bin/env bash
# deps.sh installs what cwrun's build, tests and demo need on Debian 12,
# idempotently: Debian packages through apt-get when run as root, Go
# modules through the module proxy. Where it cannot install (not root,
# not Debian), it prints the exact command to run and fails.
#
#   hack/deps.sh            packages for build + test + demo
#   hack/deps.sh --check    only say what is missing
set -euo pipefail

# The programs cwrun's tests drive for real, and the package each comes from.
#   mkfs.ext4 (e2fsprogs): builds the sealed disk's file system
#   cryptsetup (cryptsetup-bin): the judge of our LUKS output
#   python3-cryptography: a second, independent AES-XTS to decrypt our disks
#   busybox-static: the sample workload of the demo and the tests
#   podman, skopeo: local image storage as users have it; reference flattener
#   iptables, nftables: podman's -p forwards, which cwrun reads (iptables-save;
#     nft for netavark's nftables driver)
#   iproute2: the network namespaces of the port-forward tests
#   qemu-system-x86, ovmf, swtpm: booting sealed images
#   docker-registry: a real registry process for transport tests
#   debootstrap: the benchmark's Debian root file system
#   postgresql: the broker's shared store, started for real by its tests
#   tpm2-tools: reading the vTPM by hand when a measured-boot test fails
#   time: GNU time, for the benchmark's peak memory
#   dosfstools, mtools: cwrun's cloud-init seeds (run --disk --cloud-init), the test disk's ESP
#   systemd-boot-efi, binutils: the test disk's unified kernel image (stub + objcopy)
#   systemd: systemd-analyze, which checks the broker's unit files in contrib/
packages=(
	e2fsprogs cryptsetup-bin python3 python3-cryptography busybox-static
	podman skopeo uidmap fuse-overlayfs iptables nftables iproute2
	qemu-system-x86 qemu-utils ovmf swtpm swtpm-tools
	docker-registry debootstrap cpio time ca-certificates
	postgresql tpm2-tools
	dosfstools mtools systemd-boot-efi binutils systemd
)

missing=()
for p in "${packages[@]}"; do
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
		missing+=("$p")
	fi
done

if [ "${1:-}" = "--check" ]; then
	if [ ${#missing[@]} -gt 0 ]; then
		echo "missing Debian packages: ${missing[*]}"
		exit 1
	fi
	exit 0
fi

if [ ${#missing[@]} -gt 0 ]; then
	if ! command -v apt-get >/dev/null; then
		echo "deps: no apt-get here; install the equivalents of: ${missing[*]}" >&2
		exit 1
	fi
	if [ "$(id -u)" != 0 ]; then
		echo "deps: missing Debian packages; run as root:" >&2
		echo "  apt-get update && apt-get install -y ${missing[*]}" >&2
		exit 1
	fi
	echo "deps: installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v go >/dev/null; then
	if [ -x /usr/local/go/bin/go ]; then
		export PATH=$PATH:/usr/local/go/bin
	else
		echo "deps: no Go toolchain; install Go >= 1.26 from go.dev/dl into /usr/local/go" >&2
		exit 1
	fi
fi
cd "$(dirname "$0")/.."
go mod download
