#!/usr/bin/env bash
# bench-tpm.sh: what measured boot with a TPM costs a cold start. A
# --tee tpm image, registered with a real broker by `cwrun build --kbs`,
# run with OVMF and a fresh swtpm under TCG: the firmware's share apart
# from the guest's, and attestation (TPM commands, broker round trips)
# apart from both. The broker's handshakes/s with TPM evidence are in
# bench-kbs.sh (BenchmarkHandshakeTPM).
#
# The work is TestTPMAttestedRun/bench in tests/tpm_test.go; needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PATH:/usr/local/go/bin
out=$(mktemp /tmp/cwrun-bench-tpm.XXXXXX)
trap 'rm -f "$out"' EXIT
echo "bench: tpm cold start (load average $(cut -d' ' -f1-3 /proc/loadavg))"
CWRUN_BENCH=1 CWRUN_BENCH_TPM_OUT=$out go test -tags "containers_image_openpgp exclude_graphdriver_btrfs" \
	-run '^TestTPMAttestedRun$/^bench$' -count=1 -timeout 20m ./tests/ >/dev/null || {
	echo "bench-tpm: the benchmark failed; rerun with: CWRUN_BENCH=1 CWRUN_BENCH_TPM_OUT=/tmp/x go test -v -run 'TestTPMAttestedRun/bench' ./tests/" >&2
	exit 1
}
cat "$out"
