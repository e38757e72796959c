package main

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/cwrun/cwrun/attest/kbs"
	"github.com/cwrun/cwrun/attest/kbs/config"
	"github.com/spf13/cobra"
)

// kbsClientOpts are the flags every admin verb shares; dir, where set,
// is the config folder their defaults come from (DefaultDir otherwise).
type kbsClientOpts struct{ url, adminKey, caCert, dir string }

func (o *kbsClientOpts) addFlags(cmd *cobra.Command) {
	pf := cmd.PersistentFlags()
	pf.StringVar(&o.url, "kbs", os.Getenv("CWRUN_KBS_URL"), "the broker's URL, e.g. https://kbs:8443 (env CWRUN_KBS_URL; default: from the config in "+config.DefaultDir()+")")
	pf.StringVar(&o.adminKey, "admin-key", os.Getenv("CWRUN_KBS_ADMIN_KEY"), "PEM private key the broker's admin_keys trust (env CWRUN_KBS_ADMIN_KEY; default: "+config.DefaultDir()+"/admin.key)")
	pf.StringVar(&o.caCert, "cacert", os.Getenv("CWRUN_KBS_CACERT"), "PEM certificate to trust for the broker's TLS (env CWRUN_KBS_CACERT; default: "+config.DefaultDir()+"/ca.crt, or tls.crt, when it exists)")
}

func (o *kbsClientOpts) client() (*kbs.AdminClient, error) {
	return config.NewAdminClient(config.ClientOptions{URL: o.url, AdminKey: o.adminKey, CACert: o.caCert, Dir: o.dir})
}

func newKbsWorkloadCmd() *cobra.Command {
	o := &kbsClientOpts{}
	cmd := &cobra.Command{
		Use:   "workload",
		Short: "Register, list, show and remove the broker's workloads",
	}
	o.addFlags(cmd)
	cmd.AddCommand(newKbsWorkloadAddCmd(o), newKbsWorkloadListCmd(o), newKbsWorkloadShowCmd(o), newKbsWorkloadRmCmd(o))
	return cmd
}

type workloadAddOpts struct {
	passFile, policyFile         string
	passStdin, replace, noPolicy bool
	refs                         []string
	spec                         kbs.WorkloadSpec
}

func newKbsWorkloadAddCmd(co *kbsClientOpts) *cobra.Command {
	o := &workloadAddOpts{}
	cmd := &cobra.Command{
		Use:   "add [flags] ID",
		Short: "Register a workload: its disk passphrase and the reference values that release it",
		Long: `Register a workload with the broker. The passphrase is released only to a
guest of TEE --tee whose verified evidence matches every --ref: for each
claim name, one of the values given for it (repeat --ref name=value to
accept several). An existing workload is never overwritten, unless
--replace. What --replace is not given it keeps from the stored
workload: the passphrase, the reference values (when no --ref), the
policy (when no --policy-file; --no-policy drops it), cpus and memory;
it says what it kept. References and policy never carry over to another
--tee. So a replace never loosens a workload by leaving
something out.

The passphrase never comes from argv: use --passphrase-file or
--passphrase-stdin.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error { return runWorkloadAdd(cmd, co, o, args[0]) },
	}
	f := cmd.Flags()
	f.StringVar(&o.spec.Tee, "tee", "", "the workload's TEE: snp, tdx, tpm, sample (sample: no security)")
	f.StringVar(&o.passFile, "passphrase-file", "", "read the disk passphrase from this file (one trailing newline is dropped)")
	f.BoolVar(&o.passStdin, "passphrase-stdin", false, "read the disk passphrase from stdin")
	f.StringArrayVar(&o.refs, "ref", nil, "reference value NAME=VALUE, e.g. measurement=<hex> (repeatable)")
	f.StringVar(&o.policyFile, "policy-file", "", "Rego policy for this workload (data.policy.allow)")
	f.IntVar(&o.spec.CPUs, "cpus", 0, "the workload VM's vCPUs (recorded for reference)")
	f.IntVar(&o.spec.MemoryMiB, "memory", 0, "the workload VM's RAM in MiB (recorded for reference)")
	f.BoolVar(&o.replace, "replace", false, "replace an existing workload instead of refusing (what is not given is kept)")
	f.BoolVar(&o.noPolicy, "no-policy", false, "with --replace: drop the workload's stored policy")
	cmd.MarkFlagRequired("tee")
	return cmd
}

func runWorkloadAdd(cmd *cobra.Command, co *kbsClientOpts, o *workloadAddOpts, id string) error {
	spec := o.spec
	spec.ID = id
	var err error
	if spec.References, err = parseRefs(o.refs); err != nil {
		return err
	}
	if o.policyFile != "" {
		b, err := os.ReadFile(o.policyFile)
		if err != nil {
			return fmt.Errorf("--policy-file: %w", err)
		}
		spec.Policy = string(b)
	}
	var pass []byte
	switch {
	case o.passFile != "" && o.passStdin:
		return errors.New("--passphrase-file and --passphrase-stdin exclude each other")
	case o.passFile != "":
		if pass, err = readPassphrase(o.passFile); err != nil {
			return err
		}
	case o.passStdin:
		if pass, err = readPassphraseFrom(cmd.InOrStdin(), "stdin"); err != nil {
			return err
		}
	case !o.replace:
		return errors.New("no passphrase: give --passphrase-file FILE or --passphrase-stdin (never on the command line)")
	}
	defer clear(pass)
	spec.Passphrase = string(pass)
	if spec.Tee == "sample" {
		fmt.Fprintf(cmd.ErrOrStderr(), "cwrun: WARNING: workload %s is --tee sample: any host that asks gets its passphrase. For development only.\n", id)
	}
	if o.noPolicy && (!o.replace || o.policyFile != "") {
		return errors.New("--no-policy goes with --replace, and not with --policy-file")
	}
	c, err := co.client()
	if err != nil {
		return err
	}
	verb := "registered"
	if o.replace {
		verb = "replaced"
		var old kbs.WorkloadInfo
		if old, err = c.Workload(cmd.Context(), id); err != nil {
			return fmt.Errorf("workload %s: %w", id, adminHint(err))
		}
		kept := keepUnset(cmd, &spec, old, o)
		if len(kept) > 0 {
			fmt.Fprintf(cmd.ErrOrStderr(), "cwrun: kept workload %s's %s\n", id, strings.Join(kept, ", "))
		}
		_, err = c.ReplaceWorkload(cmd.Context(), spec)
	} else {
		_, err = c.AddWorkload(cmd.Context(), spec)
	}
	if errors.Is(err, kbs.ErrExists) {
		return fmt.Errorf("workload %s: %w (pass --replace to replace it)", id, err)
	}
	if err != nil {
		return fmt.Errorf("workload %s: %w", id, adminHint(err))
	}
	fmt.Fprintf(cmd.OutOrStdout(), "%s workload %s (tee %s, %d reference values)\n", verb, id, spec.Tee, countRefs(spec.References))
	return nil
}

// keepUnset fills what the user did not give for a replace from the
// stored workload old, and names what it kept. The passphrase is kept
// by the broker itself when none is sent; reference values and policy
// only while the TEE stays the same.
func keepUnset(cmd *cobra.Command, spec *kbs.WorkloadSpec, old kbs.WorkloadInfo, o *workloadAddOpts) []string {
	var kept []string
	if spec.Passphrase == "" {
		kept = append(kept, "passphrase")
	}
	if spec.Tee != old.Tee {
		// Claims and policies are the TEE's: none carries over.
		return kept
	}
	if len(spec.References) == 0 && len(old.References) > 0 {
		spec.References = old.References
		kept = append(kept, fmt.Sprintf("reference values (%d)", countRefs(old.References)))
	}
	if o.policyFile == "" && !o.noPolicy && old.Policy != "" {
		spec.Policy = old.Policy
		kept = append(kept, "policy")
	}
	if f := cmd.Flags(); !f.Changed("cpus") && old.CPUs != 0 {
		spec.CPUs = old.CPUs
		kept = append(kept, "cpus")
	}
	if f := cmd.Flags(); !f.Changed("memory") && old.MemoryMiB != 0 {
		spec.MemoryMiB = old.MemoryMiB
		kept = append(kept, "memory")
	}
	return kept
}

// adminHint adds what to do to the failures an admin meets most.
func adminHint(err error) error {
	var ua x509.UnknownAuthorityError
	var hn x509.HostnameError
	switch {
	case errors.As(err, &ua):
		return fmt.Errorf("%w (pass --cacert with the broker's ca.crt, or set CWRUN_KBS_CACERT)", err)
	case errors.As(err, &hn):
		return fmt.Errorf("%w (use a name the broker's certificate holds: openssl x509 -in tls.crt -noout -ext subjectAltName; add one with cwrun kbs renew-tls --host)", err)
	case errors.Is(err, kbs.ErrUnauthorized):
		return fmt.Errorf("%w (is --admin-key the private half of a key in the broker's admin_keys?)", err)
	case errors.Is(err, syscall.ECONNREFUSED):
		return fmt.Errorf("%w (is `cwrun kbs serve` running there?)", err)
	}
	return err
}

// parseRefs turns NAME=VALUE flags into claim name → accepted values.
func parseRefs(refs []string) (map[string][]string, error) {
	if len(refs) == 0 {
		return nil, nil
	}
	out := map[string][]string{}
	for _, r := range refs {
		name, value, ok := strings.Cut(r, "=")
		name, value = strings.TrimSpace(name), strings.TrimSpace(value)
		if !ok || name == "" || value == "" {
			return nil, fmt.Errorf("--ref %q: want NAME=VALUE, e.g. measurement=<96 hex digits>", r)
		}
		// Claims carry lower-case hex; a digest pasted in upper case is the same value.
		out[name] = append(out[name], strings.ToLower(value))
	}
	return out, nil
}

func countRefs(m map[string][]string) int {
	n := 0
	for _, v := range m {
		n += len(v)
	}
	return n
}

// readPassphraseFrom reads a passphrase as readPassphrase does a file.
func readPassphraseFrom(r io.Reader, what string) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(r, 4097))
	if err != nil {
		return nil, fmt.Errorf("reading the passphrase from %s: %w", what, err)
	}
	if len(b) > 4096 {
		clear(b)
		return nil, fmt.Errorf("passphrase on %s is over 4 KiB", what)
	}
	b = bytes.TrimSuffix(b, []byte("\n"))
	if len(b) == 0 {
		return nil, fmt.Errorf("passphrase on %s is empty", what)
	}
	return b, nil
}

func newKbsWorkloadListCmd(co *kbsClientOpts) *cobra.Command {
	var format string
	cmd := &cobra.Command{
		Use:     "list [flags]",
		Aliases: []string{"ls"},
		Short:   "List the registered workloads",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if format != "table" && format != "json" {
				return fmt.Errorf("--format %q: want table or json", format)
			}
			c, err := co.client()
			if err != nil {
				return err
			}
			ws, err := c.Workloads(cmd.Context())
			if err != nil {
				return fmt.Errorf("listing workloads: %w", adminHint(err))
			}
			sort.Slice(ws, func(i, j int) bool { return ws[i].ID < ws[j].ID })
			if format == "json" {
				if ws == nil {
					ws = []kbs.WorkloadInfo{}
				}
				return writeJSON(cmd.OutOrStdout(), ws)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tTEE\tREFERENCES\tPOLICY\tCPUS\tMEMORY\tCREATED")
			for _, w := range ws {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", w.ID, w.Tee, refNames(w.References),
					yesNo(w.Policy != ""), orDash(w.CPUs, ""), orDash(w.MemoryMiB, " MiB"), w.Created.Local().Format(time.DateTime))
			}
			return tw.Flush()
		},
	}
	cmd.Flags().StringVar(&format, "format", "table", "output format: table or json")
	return cmd
}

func newKbsWorkloadShowCmd(co *kbsClientOpts) *cobra.Command {
	var format string
	cmd := &cobra.Command{
		Use:   "show [flags] ID",
		Short: "Show a workload: its TEE, reference values and policy (never its passphrase)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if format != "text" && format != "json" {
				return fmt.Errorf("--format %q: want text or json", format)
			}
			c, err := co.client()
			if err != nil {
				return err
			}
			w, err := c.Workload(cmd.Context(), args[0])
			if err != nil {
				return fmt.Errorf("workload %s: %w", args[0], adminHint(err))
			}
			if format == "json" {
				return writeJSON(cmd.OutOrStdout(), w)
			}
			printWorkload(cmd.OutOrStdout(), w)
			return nil
		},
	}
	cmd.Flags().StringVar(&format, "format", "text", "output format: text or json")
	return cmd
}

func printWorkload(out io.Writer, w kbs.WorkloadInfo) {
	row := func(k, f string, a ...any) { fmt.Fprintf(out, "%-12s "+f+"\n", append([]any{k}, a...)...) }
	row("id", "%s", w.ID)
	row("tee", "%s", w.Tee)
	row("created", "%s", w.Created.Local().Format(time.RFC3339))
	if w.CPUs != 0 {
		row("cpus", "%d", w.CPUs)
	}
	if w.MemoryMiB != 0 {
		row("memory", "%d MiB", w.MemoryMiB)
	}
	names := make([]string, 0, len(w.References))
	for n := range w.References {
		names = append(names, n)
	}
	sort.Strings(names)
	if len(names) == 0 {
		row("references", "(none: any %s guest gets the passphrase)", w.Tee)
	}
	for _, n := range names {
		row("reference", "%s = %s", n, strings.Join(w.References[n], " | "))
	}
	if w.Policy != "" {
		fmt.Fprintf(out, "policy:\n%s\n", strings.TrimRight(w.Policy, "\n"))
	}
}

func newKbsWorkloadRmCmd(co *kbsClientOpts) *cobra.Command {
	return newRmCmd(co, "ID...", "Remove workloads: their passphrases are no longer released", "workload",
		(*kbs.AdminClient).DeleteWorkload)
}

// newRmCmd is an admin verb that removes each of its arguments, one
// what ("workload", "resource") at a time, stopping at the first error.
func newRmCmd(co *kbsClientOpts, args, short, what string, del func(*kbs.AdminClient, context.Context, string) error) *cobra.Command {
	return &cobra.Command{
		Use:     "rm " + args,
		Aliases: []string{"remove", "delete"},
		Short:   short,
		Args:    cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := co.client()
			if err != nil {
				return err
			}
			for _, a := range args {
				if err := del(c, cmd.Context(), a); err != nil {
					return fmt.Errorf("removing %s %s: %w", what, a, adminHint(err))
				}
				fmt.Fprintf(cmd.OutOrStdout(), "removed %s %s\n", what, a)
			}
			return nil
		},
	}
}

func newKbsResourceCmd() *cobra.Command {
	o := &kbsClientOpts{}
	cmd := &cobra.Command{
		Use:   "resource",
		Short: "Set, get, list and remove the broker's resources (repo/type/tag)",
		Long: `Resources are secrets the broker releases at /kbs/v0/resource/REPO/TYPE/TAG
to guests its resource policy allows. They are sealed at rest.`,
	}
	o.addFlags(cmd)
	var out string
	get := &cobra.Command{
		Use:   "get [flags] PATH",
		Short: "Print a resource (or write it to -o FILE, mode 0600)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := o.client()
			if err != nil {
				return err
			}
			b, err := c.Resource(cmd.Context(), args[0])
			if err != nil {
				return fmt.Errorf("resource %s: %w", args[0], adminHint(err))
			}
			defer clear(b)
			if out == "" || out == "-" {
				_, err = cmd.OutOrStdout().Write(b)
				return err
			}
			return writeSecretFile(out, b)
		},
	}
	get.Flags().StringVarP(&out, "output", "o", "", "write the resource to this file (mode 0600) instead of stdout")
	set := &cobra.Command{
		Use:   "set PATH FILE|-",
		Short: "Store a resource from a file or stdin (-)",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			b, err := readInput(cmd, args[1], 16<<20)
			if err != nil {
				return err
			}
			defer clear(b)
			c, err := o.client()
			if err != nil {
				return err
			}
			if err := c.SetResource(cmd.Context(), args[0], b); err != nil {
				return fmt.Errorf("resource %s: %w", args[0], adminHint(err))
			}
			fmt.Fprintf(cmd.OutOrStdout(), "stored resource %s (%d bytes)\n", args[0], len(b))
			return nil
		},
	}
	list := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List the stored resources' paths (never their contents)",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := o.client()
			if err != nil {
				return err
			}
			paths, err := c.ResourcePaths(cmd.Context())
			if err != nil {
				return fmt.Errorf("listing resources: %w", adminHint(err))
			}
			for _, p := range paths {
				fmt.Fprintln(cmd.OutOrStdout(), p)
			}
			return nil
		},
	}
	rm := newRmCmd(o, "PATH...", "Remove resources: they are no longer released", "resource",
		(*kbs.AdminClient).DeleteResource)
	cmd.AddCommand(set, get, list, rm)
	return cmd
}

func newKbsPolicyCmd() *cobra.Command {
	o := &kbsClientOpts{}
	cmd := &cobra.Command{
		Use:   "policy",
		Short: "Set and get the broker-wide resource policy (Rego)",
		Long: `The resource policy is Rego defining data.policy.allow over the attestation
token's claims and the requested resource path. It gates every resource;
a workload's own --policy-file gates its passphrase as well.`,
	}
	o.addFlags(cmd)
	set := &cobra.Command{
		Use:   "set FILE|-",
		Short: "Replace the resource policy with a Rego file (or stdin)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			b, err := readInput(cmd, args[0], 1<<20)
			if err != nil {
				return err
			}
			c, err := o.client()
			if err != nil {
				return err
			}
			if err := c.SetResourcePolicy(cmd.Context(), string(b)); err != nil {
				return fmt.Errorf("setting the resource policy: %w", adminHint(err))
			}
			fmt.Fprintln(cmd.OutOrStdout(), "resource policy set")
			return nil
		},
	}
	get := &cobra.Command{
		Use:   "get",
		Short: "Print the resource policy",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := o.client()
			if err != nil {
				return err
			}
			p, err := c.ResourcePolicy(cmd.Context())
			if err != nil {
				return fmt.Errorf("reading the resource policy: %w", adminHint(err))
			}
			if p == "" {
				fmt.Fprintln(cmd.ErrOrStderr(), "no resource policy set: the default applies (resources go to guests of secure TEEs only)")
				return nil
			}
			fmt.Fprint(cmd.OutOrStdout(), p)
			if !strings.HasSuffix(p, "\n") {
				fmt.Fprintln(cmd.OutOrStdout())
			}
			return nil
		},
	}
	cmd.AddCommand(set, get)
	return cmd
}

// readInput reads a file, or stdin for "-", refusing more than max bytes.
func readInput(cmd *cobra.Command, name string, max int64) ([]byte, error) {
	var r io.Reader
	if name == "-" {
		r = cmd.InOrStdin()
		name = "stdin"
	} else {
		f, err := os.Open(name)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		r = f
	}
	b, err := io.ReadAll(io.LimitReader(r, max+1))
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", name, err)
	}
	if int64(len(b)) > max {
		return nil, fmt.Errorf("%s is over %d bytes: is it the right file?", name, max)
	}
	return b, nil
}

func writeSecretFile(path string, b []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return f.Close()
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func refNames(m map[string][]string) string {
	if len(m) == 0 {
		return "-"
	}
	names := make([]string, 0, len(m))
	for n := range m {
		names = append(names, n)
	}
	sort.Strings(names)
	return strings.Join(names, ",")
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func orDash(n int, unit string) string {
	if n == 0 {
		return "-"
	}
	return fmt.Sprint(n) + unit
}
