package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/cwrun/cwrun/attest/kbs"
	"github.com/cwrun/cwrun/attest/kbs/config"
	"github.com/cwrun/cwrun/attest/kbs/store/sqlite"
	"github.com/spf13/cobra"
	"golang.org/x/term"
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
  cwrun kbs check                    look a broker's setup over without starting it
  cwrun kbs renew-tls                a new TLS certificate from the broker's CA, before init's ends
  cwrun kbs rotate-secrets           a new secrets key (then reseal, then --drop-previous)
  cwrun kbs backup FILE              copy the SQLite store, beside a running broker
  cwrun kbs workload add ID ...      register a workload (admin API)`,
	}
	cmd.AddCommand(newKbsInitCmd(), newKbsServeCmd(g), newKbsCheckCmd(), newKbsRenewTLSCmd(),
		newKbsRotateSecretsCmd(), newKbsResealCmd(), newKbsBackupCmd(), newKbsRestoreCmd(),
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
		Short: "Make a broker config with fresh keys, a CA of its own and a TLS certificate",
		Long: `Make a working key broker configuration in --dir: config.toml, the token
signing key, the secrets key, an admin key pair, a CA of the broker's own
(ca.crt, ca.key: ECDSA P-256, ten years) and a TLS pair it issued (ECDSA
P-256, one year, valid for localhost, 127.0.0.1, ::1, this host's name and
every --host; tls.crt holds the CA's certificate after the broker's).
Clients trust ca.crt (or tls.crt, which carries it), so that renew-tls can
issue the next certificate without a new file for them. The folder is made
0700 and secret files 0600. Nothing is overwritten unless --force.`,
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
	f.BoolVar(&o.Force, "force", false, "replace existing files (secrets sealed with the old secrets.key become unreadable, and clients need the new ca.crt; to renew only the TLS certificate, use renew-tls; to change only the secrets key, rotate-secrets)")
	return cmd
}

func printInit(w io.Writer, dir, listen string, files []string) {
	fmt.Fprintf(w, "made a key broker configuration in %s:\n", dir)
	for _, f := range files {
		fmt.Fprintf(w, "  %s\n", f)
	}
	admin := adminFlags(dir, config.ListenURL(listen, true))
	fmt.Fprintf(w, "\nnext:\n")
	fmt.Fprintf(w, "  cwrun kbs serve --config %s\n", filepath.Join(dir, config.FileName))
	fmt.Fprintf(w, "  cwrun kbs workload add ID%s --tee snp --passphrase-file KEYFILE --ref measurement=HEX\n", admin)
	fmt.Fprintf(w, "\nkeep admin.key with the administrator (and ca.key, which only renew-tls needs, with whoever renews);\n")
	fmt.Fprintf(w, "clients trust the broker with --cacert %s (cwrun build and run: --kbs-cacert), never in the system's store\n",
		filepath.Join(dir, config.CACertFile))
}

// adminFlags are the flags an admin verb needs to reach the broker of
// dir at url: none in the default folder, where the verbs find the key
// and certificate by themselves.
func adminFlags(dir, url string) string {
	if abs, _ := filepath.Abs(dir); abs == config.DefaultDir() {
		return ""
	}
	return fmt.Sprintf(" --kbs %s --admin-key %s --cacert %s", url,
		filepath.Join(dir, config.AdminKeyFile), filepath.Join(dir, config.CACertFile))
}

func newKbsRenewTLSCmd() *cobra.Command {
	var (
		dir   string
		hosts []string
		newCA bool
		caKey string
	)
	cmd := &cobra.Command{
		Use:   "renew-tls [flags]",
		Short: "Issue the broker a new TLS certificate from its CA (a running broker picks it up)",
		Long: `Issue the broker a new TLS certificate and key in --dir, from the CA that
init made there (ca.crt, ca.key): a new key, one year from now, for the same
names and addresses plus every --host. A running broker serves it from its
next connection on, without a restart, and clients that trust ca.crt (or
init's tls.crt, which carries it) need nothing new.

A new CA is made, and its ca.crt must then be given to the clients once,
when the certificate signed itself (a folder from before init made a CA),
when the CA ends within 30 days, or with --new-ca. A certificate another CA
issued is refused unless --new-ca: renew it with that CA.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			r, err := config.RenewTLS(dir, config.RenewOptions{Hosts: hosts, NewCA: newCA, CAKey: caKey})
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			caFile := filepath.Join(dir, config.CACertFile)
			fmt.Fprintf(w, "renewed %s: valid until %s for %s\n", filepath.Join(dir, config.TLSCertFile),
				r.Cert.NotAfter.UTC().Format("2006-01-02"), strings.Join(config.CertNames(r.Cert), ", "))
			if r.NewCA {
				fmt.Fprintf(w, "issued by a NEW CA, %s (valid until %s): give it to the clients, which trust the broker with --cacert %s (cwrun build and run: --kbs-cacert); later renewals need nothing new\n",
					caFile, r.CA.NotAfter.UTC().Format("2006-01-02"), caFile)
			} else {
				fmt.Fprintf(w, "issued by the broker's CA, %s (valid until %s): clients that trust it need nothing new\n",
					caFile, r.CA.NotAfter.UTC().Format("2006-01-02"))
			}
			fmt.Fprintf(w, "a running broker serves it from its next connection on\n")
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&dir, "dir", config.DefaultDir(), "the folder init wrote")
	f.StringArrayVar(&hosts, "host", nil, "extra DNS name or IP address for the certificate (repeatable)")
	f.BoolVar(&newCA, "new-ca", false, "make a new CA too (its clients then need the new ca.crt)")
	f.StringVar(&caKey, "ca-key", "", "the CA's key, where it is kept between renewals (default: ca.key in --dir; a new CA's key is written there)")
	return cmd
}

func newKbsCheckCmd() *cobra.Command {
	var path string
	cmd := &cobra.Command{
		Use:   "check [flags]",
		Short: "Look a broker's setup over without starting it or changing anything",
		Long: `Look over the broker that --config describes, as serve would start it:
the config file, the key files it names and their modes, the listen
address, the TLS certificate (names, end date, issuer), the store (a
SQLite file looked at, a PostgreSQL database reached and its schema
version read; neither made nor migrated), the TEEs served and the admin
keys. Safe to run beside a running broker, say after editing the config
and before restarting it.

Each line says ok, note, warn or FAIL. The exit status is 1 when a line
says FAIL: serve would refuse to start, or the broker would not work.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			failed := 0
			w := cmd.OutOrStdout()
			for _, f := range config.Check(cmd.Context(), path, time.Now()) {
				fmt.Fprintf(w, "%-4s  %-6s  %s\n", f.Level, f.Part, f.Text)
				if f.Level == config.Fail {
					failed++
				}
			}
			if failed > 0 {
				return fmt.Errorf("kbs check: %d problem(s) in %s", failed, path)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&path, "config", filepath.Join(config.DefaultDir(), config.FileName), "the broker's config file")
	return cmd
}

func newKbsRotateSecretsCmd() *cobra.Command {
	var (
		path string
		drop bool
	)
	co := &kbsClientOpts{}
	cmd := &cobra.Command{
		Use:   "rotate-secrets [flags]",
		Short: "Put a new key first in the secrets key file; with --drop-previous, remove the earlier ones",
		Long: `The secrets key seals the stored passphrases and resources, and the session
cookies. Rotate it when it may have leaked, or on a schedule:

  1. cwrun kbs rotate-secrets          writes a new random key first in the
                                       file that secrets_key names, keeping
                                       the earlier keys after it
  2. give the file to every broker sharing the store and restart them:
     they seal under the new key and still open what the earlier ones sealed
  3. cwrun kbs reseal                  re-seals every record under the new key
  4. cwrun kbs rotate-secrets --drop-previous
                                       asks the broker to reseal once more, checks
                                       that it seals under this file's first key
                                       and that every record opens, and only then
                                       leaves the first key alone in the file;
                                       restart the brokers on it

--drop-previous talks to the broker with the admin verbs' flags, whose
defaults come from the folder of --config.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			w := cmd.OutOrStdout()
			if !drop {
				sf, err := config.RotateSecrets(path, time.Now())
				if err != nil {
					return err
				}
				fmt.Fprintf(w, "wrote a new secrets key first in %s (key id %s); %d earlier key(s) kept after it\n", sf.Path, sf.KeyID, sf.Previous)
				dir := filepath.Dir(path)
				admin := ""
				if url, err := config.URLFromDir(dir); err == nil {
					admin = adminFlags(dir, url)
				}
				fmt.Fprintf(w, "\nnext:\n")
				fmt.Fprintf(w, "  1. give %s to every broker that shares the store, and restart them\n", sf.Path)
				fmt.Fprintf(w, "  2. re-seal every record under the new key:\n     cwrun kbs reseal%s\n", admin)
				fmt.Fprintf(w, "  3. remove the earlier keys:\n     cwrun kbs rotate-secrets --drop-previous --config %s%s\n", path, admin)
				return nil
			}
			return dropPreviousSecrets(cmd, co, path)
		},
	}
	co.addFlags(cmd)
	f := cmd.Flags()
	f.StringVar(&path, "config", filepath.Join(config.DefaultDir(), config.FileName), "the broker's config file (its secrets_key names the file)")
	f.BoolVar(&drop, "drop-previous", false, "remove the earlier keys, once the broker has re-sealed every record under the first")
	return cmd
}

// dropPreviousSecrets ends a rotation (config.FinishRotation).
func dropPreviousSecrets(cmd *cobra.Command, co *kbsClientOpts, path string) error {
	w := cmd.OutOrStdout()
	// The broker of this config, unless the flags name another.
	co.dir = filepath.Dir(path)
	c, err := co.client()
	if err != nil {
		return fmt.Errorf("%w; nothing dropped (the broker must confirm that no record needs the earlier keys)", err)
	}
	sf, rep, err := config.FinishRotation(cmd.Context(), path, c)
	if err != nil {
		return adminHint(err)
	}
	if rep.KeyID == "" {
		fmt.Fprintf(w, "%s holds one key (key id %s): nothing to drop\n", sf.Path, sf.KeyID)
		return nil
	}
	fmt.Fprintf(w, "every stored record (%d) is sealed under key id %s; dropped the earlier key(s) from %s\n", rep.Resealed+rep.Current, sf.KeyID, sf.Path)
	fmt.Fprintf(w, "restart the brokers on this file so that they forget the earlier keys; backups of the old file still open backups of the store made before the reseal\n")
	return nil
}

func newKbsResealCmd() *cobra.Command {
	co := &kbsClientOpts{}
	cmd := &cobra.Command{
		Use:   "reseal [flags]",
		Short: "Have the broker re-seal every stored passphrase and resource under its current secrets key",
		Long: `After rotate-secrets, and once every broker sharing the store runs with the
new secrets key file: the broker re-seals every passphrase and resource that
an earlier key sealed under the file's first key. A record changed meanwhile
by an admin is read again, never overwritten. Running it twice is harmless.
The exit status is 1 when some record opens with no key the broker holds.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := co.client()
			if err != nil {
				return err
			}
			rep, err := c.Reseal(cmd.Context())
			if err != nil {
				return fmt.Errorf("reseal: %w", adminHint(err))
			}
			fmt.Fprintf(cmd.OutOrStdout(), "re-sealed %d record(s) under key id %s; %d already were\n", rep.Resealed, rep.KeyID, rep.Current)
			if !rep.Done() {
				return fmt.Errorf("reseal: no key the broker holds opens %d record(s): %s", len(rep.Unopened), strings.Join(rep.Unopened, ", "))
			}
			return nil
		},
	}
	co.addFlags(cmd)
	return cmd
}

func newKbsBackupCmd() *cobra.Command {
	var path string
	cmd := &cobra.Command{
		Use:   "backup [flags] FILE|-",
		Short: "Copy the broker's SQLite store to FILE (or stdout), safe beside a running broker",
		Long: `Copy the SQLite store that --config names to FILE, a new file of mode 0600:
one consistent snapshot, taken beside a running broker without stopping it.
The store holds the only copies of the disk passphrases registered with the
broker; without a backup, a lost disk loses every sealed disk with it.
With "-" the checked copy goes to standard output, to be piped off the
machine (cwrun kbs backup - | ssh vault 'cat > kbs.db'); the report goes to
standard error.

The copy is checked: a SQLite integrity check, and every sealed passphrase and
resource opened with the secrets key file (nothing is printed from them). The
backup opens only with that key, and the key is useless without the backup:
keep them in different places. A PostgreSQL store is backed up with
PostgreSQL's own tools.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := config.Load(path)
			if err != nil {
				return err
			}
			w, dest := cmd.OutOrStdout(), args[0]
			var res config.BackupResult
			if dest == "-" {
				if f, ok := w.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
					return fmt.Errorf("backup to standard output, which is a terminal: pipe it somewhere (cwrun kbs backup - | ssh vault 'cat > kbs.db'), or name a FILE")
				}
				res, err = c.BackupTo(cmd.Context(), w)
				w, dest = cmd.ErrOrStderr(), "standard output"
			} else {
				res, err = c.Backup(cmd.Context(), dest)
				dest += " (mode 0600)"
			}
			if err != nil {
				return err
			}
			fmt.Fprintf(w, "backed up %s to %s: %s\n", res.Store, dest, counts(res.Counts))
			printSealed(w, res.Sealed, c.SecretsKey)
			fmt.Fprintf(w, "keep the backup and %s in different places: each is useless without the other\n", c.SecretsKey)
			return nil
		},
	}
	cmd.Flags().StringVar(&path, "config", filepath.Join(config.DefaultDir(), config.FileName), "the broker's config file")
	return cmd
}

func newKbsRestoreCmd() *cobra.Command {
	var path string
	cmd := &cobra.Command{
		Use:   "restore [flags] FILE",
		Short: "Put a backup in place of the broker's SQLite store (the broker stopped)",
		Long: `Replace the SQLite store that --config names with the backup FILE, while the
broker is stopped (it refuses while one serves, and holds the broker's lock
so that none starts meanwhile). The backup is checked first, and nothing
changes unless every sealed passphrase and resource in it opens with the
secrets key file: a backup from before a secrets key rotation needs the
key it was sealed under, put after the first key in the file. The database
it replaces is kept beside it (kbs.db.before-restore-TIME). FILE itself is
not changed.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := config.Load(path)
			if err != nil {
				return err
			}
			res, err := c.Restore(cmd.Context(), args[0], time.Now())
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "restored %s into %s: %s\n", args[0], res.Store, counts(res.Counts))
			printSealed(w, res.Sealed, c.SecretsKey)
			if res.Aside != "" {
				fmt.Fprintf(w, "the database it replaced is in %s\n", res.Aside)
			}
			fmt.Fprintf(w, "next: cwrun kbs serve --config %s\n", path)
			return nil
		},
	}
	cmd.Flags().StringVar(&path, "config", filepath.Join(config.DefaultDir(), config.FileName), "the broker's config file")
	return cmd
}

func counts(s sqlite.Summary) string {
	return fmt.Sprintf("%d workload(s), %d resource(s), %d policy(ies)", s.Workloads, s.Resources, s.Policies)
}

// printSealed says which keys of the secrets key file open the sealed
// records: what the backup will need.
func printSealed(w io.Writer, r kbs.ResealReport, keyFile string) {
	fmt.Fprintf(w, "its %d sealed secret(s) open with %s", r.Current+r.Previous+len(r.Unopened), keyFile)
	switch {
	case len(r.Unopened) > 0:
		fmt.Fprintf(w, ", except %d: WARNING: no key in it opens %s\n", len(r.Unopened), strings.Join(r.Unopened, ", "))
	case r.Previous > 0:
		fmt.Fprintf(w, ", %d of them only with an earlier key in it (a rotation in progress): keep that key as long as this backup\n", r.Previous)
	default:
		fmt.Fprintf(w, " (key id %s)\n", r.KeyID)
	}
}
