package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/cwrun/cwrun/build"
	"github.com/cwrun/cwrun/sealed"
	"github.com/cwrun/cwrun/version"
	"github.com/spf13/cobra"
)

type buildOpts struct {
	tee, slop, passFile, passOut string
	addFiles                     []string
	quiet, timings               bool
	kbs                          kbsRegisterOpts
	opts                         build.Options
}

func newBuildCmd(g *globalOpts) *cobra.Command {
	o := &buildOpts{}
	cmd := &cobra.Command{
		Use:   "build [flags] SOURCE DESTINATION",
		Short: "Seal an OCI image: its root file system becomes a LUKS-encrypted disk in the krun layout",
		Long: `Seal an OCI image into a confidential-workload image.

SOURCE and DESTINATION are image references in any transport
(containers-storage:, docker://, oci:, oci-archive:, docker-archive:, dir:);
a bare name means local storage (podman's) first, then the registries of
registries.conf.

The disk passphrase never appears in argv, logs or the image. With --kbs,
cwrun generates it and registers it with the key broker, which releases it
only to a guest whose attestation matches the reference values (--ref);
without a broker, give your own with --passphrase-file, or let cwrun
generate one and save it with --passphrase-out.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error { return runBuild(cmd, g, o, args[0], args[1]) },
	}
	f := cmd.Flags()
	f.StringVar(&o.tee, "tee", "snp", "TEE to seal for: snp, tdx, tpm, sample (sample: no security, for development)")
	f.IntVar(&o.opts.CPUs, "cpus", 2, "vCPUs of the workload's VM (part of the launch measurement)")
	f.IntVar(&o.opts.MemoryMiB, "memory", 512, "RAM of the workload's VM in MiB (part of the launch measurement)")
	f.StringVar(&o.opts.WorkloadID, "workload-id", "", "the key broker's name for this workload (default: random)")
	f.StringVar(&o.passFile, "passphrase-file", "", "read the disk passphrase from this file (one trailing newline is dropped)")
	f.StringVar(&o.passOut, "passphrase-out", "", "write the generated passphrase to this new file (mode 0600)")
	f.StringVar(&o.opts.AttestationURL, "attestation-url", "", "the key broker's base URL, recorded in the image (default: --kbs)")
	o.kbs.addFlags(f)
	f.StringVar(&o.slop, "slop", "25%", "extra room on the disk: a percentage, a fraction or a size (64MiB)")
	f.StringArrayVar(&o.addFiles, "add-file", nil, "copy HOSTPATH:GUESTPATH into the sealed root file system (repeatable)")
	f.IntVar(&o.opts.LUKS, "luks", 2, "LUKS version: 2, or 1 for exactly the layout buildah mkcw writes")
	f.BoolVar(&o.opts.AllowOverrides, "allow-overrides", false, "let `cwrun run` replace the sealed command and environment from the host")
	f.StringVar(&o.opts.TmpDir, "tmpdir", "", "work folder for the seal, needs about twice the image's size (default $TMPDIR or /var/tmp)")
	f.BoolVarP(&o.quiet, "quiet", "q", false, "print only the sealed image's manifest digest")
	f.BoolVar(&o.timings, "timings", false, "print how long each stage took")
	return cmd
}

func runBuild(cmd *cobra.Command, g *globalOpts, o *buildOpts, src, dst string) (err error) {
	ctx := cmd.Context()
	opts := o.opts
	opts.Version = version.Version
	opts.Log = g.logger()
	if opts.TEE, err = sealed.ParseTEE(o.tee); err != nil {
		return fmt.Errorf("--tee: %w", err)
	}
	slop, err := build.ParseSlop(o.slop)
	if err != nil {
		return err
	}
	opts.Slop = &slop
	for _, a := range o.addFiles {
		af, err := build.ParseAddFile(a)
		if err != nil {
			return err
		}
		opts.AddFiles = append(opts.AddFiles, af)
	}
	if o.kbs.url != "" {
		if opts.Register, err = o.kbs.registrar(opts.TEE); err != nil {
			return err
		}
		if opts.AttestationURL == "" {
			opts.AttestationURL = o.kbs.url
		}
	}
	switch {
	case o.passFile != "" && o.passOut != "":
		return errors.New("--passphrase-file and --passphrase-out exclude each other: one gives the passphrase, the other saves a generated one")
	case o.passFile != "":
		if opts.Passphrase, err = readPassphrase(o.passFile); err != nil {
			return err
		}
		defer clear(opts.Passphrase)
	case o.passOut == "" && o.kbs.url == "":
		return errors.New("no way to recover the disk passphrase: give --passphrase-file FILE (your own) or --passphrase-out FILE (cwrun writes the generated one there, mode 0600)")
	}
	var out *os.File
	if o.passOut != "" {
		// Made before the seal so that a bad path fails in a second, not after it.
		if out, err = os.OpenFile(o.passOut, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600); err != nil {
			return fmt.Errorf("--passphrase-out: %w (cwrun never overwrites a passphrase file)", err)
		}
		defer func() {
			out.Close()
			if err != nil {
				os.Remove(o.passOut)
			}
		}()
	}
	if opts.TEE.Insecure() {
		fmt.Fprintln(cmd.ErrOrStderr(), "cwrun: WARNING: --tee sample gives NO protection: any host can get the key. For development only.")
	}

	stderr := cmd.ErrOrStderr()
	p := newProgress(stderr, o.quiet)
	opts.Progress = p.event
	sess := g.session()
	defer sess.Close()
	start := time.Now()
	res, err := build.Seal(ctx, sess, src, dst, opts)
	p.close()
	if err != nil {
		return err
	}
	defer clear(res.Passphrase)
	if out != nil {
		if _, err := out.Write(res.Passphrase); err != nil {
			return fmt.Errorf("writing the passphrase to %s: %w; the sealed image %s cannot be opened without it: seal again", o.passOut, err, res.Destination)
		}
		if err := out.Sync(); err != nil {
			return fmt.Errorf("writing the passphrase to %s: %w", o.passOut, err)
		}
	}
	w := cmd.OutOrStdout()
	if o.quiet {
		fmt.Fprintln(w, res.ManifestDigest)
		return nil
	}
	printSealed(w, src, res, time.Since(start), o.passOut)
	if o.timings {
		for _, s := range res.Stages {
			fmt.Fprintf(w, "  %-8s %6.2fs\n", s.Stage, s.Duration.Seconds())
		}
	}
	return nil
}

func printSealed(w io.Writer, src string, res *build.Result, took time.Duration, passOut string) {
	c := res.Config
	fmt.Fprintf(w, "sealed %s -> %s in %.1fs\n", src, res.Destination, took.Seconds())
	fmt.Fprintf(w, "  manifest     %s\n", res.ManifestDigest)
	fmt.Fprintf(w, "  tee          %s%s\n", c.TEE, map[bool]string{true: " (INSECURE: development only)"}[c.TEE.Insecure()])
	fmt.Fprintf(w, "  workload id  %s\n", c.WorkloadID)
	fmt.Fprintf(w, "  vm           %d vCPUs, %d MiB\n", c.CPUs, c.RAMMiB)
	fmt.Fprintf(w, "  disk         %s (LUKS%d, aes-xts-plain64; ext4 %s holding %s)\n",
		mib(res.DiskSize), c.Cwrun.LUKS, mib(res.PayloadSize), mib(res.TreeSize))
	if c.AttestationURL != "" {
		fmt.Fprintf(w, "  broker       %s\n", c.AttestationURL)
	}
	if passOut != "" {
		fmt.Fprintf(w, "  passphrase   written to %s\n", passOut)
	}
	if res.Registered {
		fmt.Fprintf(w, "  passphrase   held by the broker only: released after attestation\n")
	}
}

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }

// readPassphrase reads a passphrase file: at most 4 KiB, one trailing
// newline dropped so that `echo secret > f` works.
func readPassphrase(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("passphrase file: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, 4097))
	if err != nil {
		return nil, fmt.Errorf("reading passphrase file %s: %w", path, err)
	}
	if len(b) > 4096 {
		clear(b)
		return nil, fmt.Errorf("passphrase file %s is over 4 KiB: is it the right file?", path)
	}
	b = bytes.TrimSuffix(b, []byte("\n"))
	if len(b) == 0 {
		return nil, fmt.Errorf("passphrase file %s is empty", path)
	}
	return b, nil
}
