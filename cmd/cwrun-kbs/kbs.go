package main

import (
	"crypto/x509"
	"fmt"
	"io"
	"path/filepath"
	"slices"
	"strings"

	"github.com/cwrun/cwrun/attest/kbs/config"
	"github.com/spf13/cobra"
)

func newKbsCmd(g *globalOpts) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "kbs",
		Short: "Run and manage the key broker that releases disk keys after attestation",
		Long: `The key broker (KBS) keeps each sealed workload's disk passphrase and
reference values, and releases the passphrase to a guest that proves, by
remote attestation, that it is that workload in a genuine TEE. It speaks
Trustee's KBS protocol 0.4.0 and krun's endpoints.

  cwrun kbs init                     make a config, keys and a TLS pair
  cwrun kbs serve                    run the broker
  cwrun kbs renew-tls                a new self-signed TLS pair, before init's expires
  cwrun kbs workload add ID ...      register a workload (admin API)`,
	}
	cmd.AddCommand(newKbsInitCmd(), newKbsServeCmd(g), newKbsRenewTLSCmd(),
		newKbsWorkloadCmd(), newKbsResourceCmd(), newKbsPolicyCmd())
	return cmd
}

func newKbsInitCmd() *cobra.Command {
	var (
		dir string
		o   config.InitOptions
	)
	cmd := &cobra.Command{
		Use:   "init [flags]",
		Short: "Make a broker config with fresh keys and a self-signed TLS certificate",
		Long: `Make a working key broker configuration in --dir: config.toml, the token
signing key, the secrets key, an admin key pair and a self-signed TLS pair
(ECDSA P-256, one year, valid for localhost, 127.0.0.1, ::1, this host's
name and every --host). The folder is made 0700 and secret files 0600.
Nothing is overwritten unless --force.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			files, err := config.Init(dir, o)
			if err != nil {
				return err
			}
			printInit(cmd.OutOrStdout(), dir, o.Listen, files)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&dir, "dir", config.DefaultDir(), "folder to write the config and keys into")
	f.StringArrayVar(&o.Hosts, "host", nil, "extra DNS name or IP address for the TLS certificate (repeatable)")
	f.StringVar(&o.Listen, "listen", config.DefaultListen, "address the broker will listen on (\":8443\" for every address)")
	f.BoolVar(&o.Force, "force", false, "replace existing files (secrets sealed with the old secrets.key become unreadable)")
	return cmd
}

func printInit(w io.Writer, dir, listen string, files []string) {
	fmt.Fprintf(w, "made a key broker configuration in %s:\n", dir)
	for _, f := range files {
		fmt.Fprintf(w, "  %s\n", f)
	}
	// Outside the default folder the admin verbs cannot find the key and
	// certificate by themselves: spell them out.
	admin := ""
	if abs, _ := filepath.Abs(dir); abs != config.DefaultDir() {
		admin = fmt.Sprintf(" --kbs %s --admin-key %s --cacert %s", config.ListenURL(listen, true),
			filepath.Join(dir, config.AdminKeyFile), filepath.Join(dir, config.TLSCertFile))
	}
	fmt.Fprintf(w, "\nnext:\n")
	fmt.Fprintf(w, "  cwrun kbs serve --config %s\n", filepath.Join(dir, config.FileName))
	fmt.Fprintf(w, "  cwrun kbs workload add ID%s --tee snp --passphrase-file KEYFILE --ref measurement=HEX\n", admin)
	fmt.Fprintf(w, "\nkeep admin.key with the administrator; clients trust the broker with --cacert %s\n",
		filepath.Join(dir, config.TLSCertFile))
}

func newKbsRenewTLSCmd() *cobra.Command {
	var (
		dir   string
		hosts []string
	)
	cmd := &cobra.Command{
		Use:   "renew-tls [flags]",
		Short: "Replace init's self-signed TLS pair with a fresh one (a running broker picks it up)",
		Long: `Replace the self-signed TLS certificate and key that init wrote in --dir
with a new pair: a new key, one year from now, for the same names and
addresses plus every --host. A running broker serves it from its next
connection on, without a restart. Clients that trust the broker with
--cacert (cwrun run, the admin verbs) need the new tls.crt.

A certificate that a CA issued is refused: renew it with that CA.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cert, err := config.RenewTLS(dir, hosts)
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "renewed %s: valid until %s for %s\n", filepath.Join(dir, config.TLSCertFile),
				cert.NotAfter.UTC().Format("2006-01-02"), strings.Join(certNames(cert), ", "))
			fmt.Fprintf(w, "a running broker serves it from its next connection on; give the new %s to the clients that trust it with --cacert\n", config.TLSCertFile)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&dir, "dir", config.DefaultDir(), "the folder init wrote")
	f.StringArrayVar(&hosts, "host", nil, "extra DNS name or IP address for the certificate (repeatable)")
	return cmd
}

// certNames lists a certificate's DNS names and addresses.
func certNames(c *x509.Certificate) []string {
	names := slices.Clone(c.DNSNames)
	for _, ip := range c.IPAddresses {
		names = append(names, ip.String())
	}
	return names
}
