#!/usr/bin/env bash
# bench-run.sh: how fast `cwrun run` starts a sealed workload, against
# the floor.
#
# Floor: the same QEMU (TCG, -M pc, 512 MiB, 1 vCPU) and Debian cloud
# kernel booting an initrd whose init powers off at once (start to exit).
# cwrun: `cwrun run` of a sealed busybox image in local storage, from
# exec to the workload's first output line. Median of 5 runs, after one
# warm-up run of each. Target: at most 1.3x the floor; cwrun's own
# memory (QEMU not counted) at most 30 MiB, reported twice: the peak
# (VmHWM at exit) and while the workload runs (VmRSS, sampled from
# outside), each split into anonymous memory and the binary's pages.
#
# The work is tests/run_bench_test.go (it builds cwrun, cwrun-init and
# the floor's init itself); needs root (local storage's image mount).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PATH:/usr/local/go/bin
out=$(mktemp /tmp/cwrun-bench-run.XXXXXX)
trap 'rm -f "$out"' EXIT
CWRUN_BENCH=1 CWRUN_BENCH_OUT=$out go test -tags "containers_image_openpgp exclude_graphdriver_btrfs" \
	-run '^TestRunBenchmark$' -count=1 -timeout 20m ./tests/ >/dev/null || {
	echo "bench-run: the benchmark failed; rerun with: CWRUN_BENCH=1 go test -v -run TestRunBenchmark ./tests/" >&2
	exit 1
}
cat "$out"
