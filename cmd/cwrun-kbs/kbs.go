package main

import (
	"fmt"
	"io"
	"path/filepath"

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
  cwrun kbs workload add ID ...      register a workload (admin API)`,
	}
	cmd.AddCommand(newKbsInitCmd(), newKbsServeCmd(g),
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
