package main

import (
	"fmt"
	"os"

	"github.com/cwrun/cwrun/launcher"
	"github.com/spf13/cobra"
)

func newVTPMCACmd() *cobra.Command {
	var dir string
	var path bool
	cmd := &cobra.Command{
		Use:   "vtpm-ca",
		Short: "Print this host's software-TPM CA certificate, for the key broker to trust",
		Long: `Runs of images sealed with --tee tpm get a fresh software TPM (swtpm) each,
whose endorsement key (EK) certificate is signed by this host's vTPM CA. A key
broker releases keys to those TPMs only if it trusts that CA: list the
certificate in the broker's [tpm] ek_ca, and give it to
'cwrun build --tee tpm --kbs ... --tpm-ek-ca FILE' so that the workload
registers it.

The CA is made on first use (here or by the first tpm run) in --dir: its
private key never leaves that folder. The certificate (PEM) goes to stdout.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cert, err := launcher.TPMCA(dir)
			if err != nil {
				return err
			}
			if path {
				fmt.Fprintln(cmd.OutOrStdout(), cert)
				return nil
			}
			b, err := os.ReadFile(cert)
			if err != nil {
				return err
			}
			_, err = cmd.OutOrStdout().Write(b)
			return err
		},
	}
	cmd.Flags().StringVar(&dir, "dir", launcher.DefaultTPMCADir(), "the vTPM CA folder (as `cwrun run --vtpm-ca`)")
	cmd.Flags().BoolVar(&path, "path", false, "print the certificate's path instead of the certificate")
	return cmd
}
