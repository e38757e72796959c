#!/usr/bin/env bash
# fuzz.sh TIME: run every fuzz target of the module for TIME each.
# The seed corpora in testdata/fuzz/ run in every `make test` anyway.
set -euo pipefail
cd "$(dirname "$0")/.."
time=${1:-30s}
tags="containers_image_openpgp exclude_graphdriver_btrfs"
for pkg in $(go list -tags "$tags" ./...); do
	for target in $(go test -tags "$tags" -list '^Fuzz' "$pkg" 2>/dev/null | grep '^Fuzz' || true); do
		echo "fuzz: $pkg $target ($time)"
		go test -tags "$tags" -run '^$' -fuzz "^${target}\$" -fuzztime "$time" "$pkg"
	done
done
