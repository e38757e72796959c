package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"

	"github.com/spf13/cobra"
)

// kbsBinary is the key broker's program; see cmd/cwrun-kbs.
const kbsBinary = "cwrun-kbs"

// newKbsCmd hands `cwrun kbs ...` to cwrun-kbs, so that the broker's
// weight (policy engine, metrics, database drivers) stays out of the
// process that supervises every workload.
func newKbsCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "kbs VERB [flags]",
		Short: "Run and manage the key broker that releases disk keys after attestation",
		Long: `The key broker (KBS) keeps each sealed workload's disk passphrase and
reference values, and releases the passphrase to a guest that proves, by
remote attestation, that it is that workload in a genuine TEE.

  cwrun kbs init                     make a config, keys and a TLS pair
  cwrun kbs serve                    run the broker
  cwrun kbs renew-tls                a new self-signed TLS pair, before init's expires
  cwrun kbs workload add ID ...      register a workload (admin API)
  cwrun kbs --help                   everything else

It runs the ` + kbsBinary + ` program installed next to cwrun.`,
		DisableFlagParsing: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			bin, err := findKbs()
			if err != nil {
				return err
			}
			return syscall.Exec(bin, append([]string{kbsBinary}, args...), os.Environ())
		},
	}
}

// findKbs finds cwrun-kbs next to this binary, else on PATH.
func findKbs() (string, error) {
	if self, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(self), kbsBinary)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	p, err := exec.LookPath(kbsBinary)
	if errors.Is(err, exec.ErrNotFound) {
		return "", fmt.Errorf("%s not found next to cwrun nor on PATH: install it (make build puts it in bin/) to use the key broker", kbsBinary)
	}
	return p, err
}
