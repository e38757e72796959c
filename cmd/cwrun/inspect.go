package main

import (
	"encoding/json"
	"fmt"
	"io"

	"github.com/cwrun/cwrun/build"
	"github.com/spf13/cobra"
)

func newInspectCmd(g *globalOpts) *cobra.Command {
	var format string
	cmd := &cobra.Command{
		Use:   "inspect [flags] IMAGE",
		Short: "Show what a sealed image says about itself (no key needed)",
		Long: `Show a sealed image's TEE, workload id, VM shape, key broker URL, LUKS
version and cipher, and disk sizes. Works for images sealed by cwrun and by
buildah mkcw.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if format != "text" && format != "json" {
				return fmt.Errorf("--format %q: want text or json", format)
			}
			sess := g.session()
			defer sess.Close()
			ins, err := build.Inspect(cmd.Context(), sess, args[0])
			if err != nil {
				return err
			}
			if format == "json" {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(ins)
			}
			printInspection(cmd.OutOrStdout(), ins)
			return nil
		},
	}
	cmd.Flags().StringVar(&format, "format", "text", "output format: text or json")
	return cmd
}

func printInspection(w io.Writer, ins *build.Inspection) {
	c, l := ins.Config, ins.LUKS
	row := func(k, f string, a ...any) { fmt.Fprintf(w, "%-16s "+f+"\n", append([]any{k}, a...)...) }
	row("image", "%s", ins.Image)
	row("sealed by", "%s", ins.SealedBy)
	tee := string(c.TEE)
	if c.TEE.Insecure() {
		tee += " (INSECURE: development only)"
	}
	row("tee", "%s", tee)
	if c.TEEData != "" && c.TEEData != "{}" {
		row("tee data", "%s", c.TEEData)
	}
	row("workload id", "%s", c.WorkloadID)
	row("cpus", "%d", c.CPUs)
	row("memory", "%d MiB", c.RAMMiB)
	url := c.AttestationURL
	if url == "" {
		url = "(none: the key is given at run time)"
	}
	row("attestation url", "%s", url)
	row("luks", "LUKS%d %s-%s, %d-bit key, %s, %d-byte sectors", l.Version, l.Cipher, l.Mode, l.KeyBits, l.Hash, l.SectorSize)
	row("disk", "%s (%d bytes)", mib(ins.DiskSize), ins.DiskSize)
	payload := l.PayloadSize
	if payload == 0 {
		payload = ins.DiskSize - l.PayloadOffset // LUKS1: to the footer
	}
	row("payload", "%s at offset %d", mib(payload), l.PayloadOffset)
	if c.Cwrun != nil && c.Cwrun.AllowOverrides {
		row("overrides", "allowed: the host may replace the command and environment")
	}
	if !ins.FooterMatches {
		row("WARNING", "krun-sev.json and the disk footer differ; the footer is what libkrun reads")
	}
}
