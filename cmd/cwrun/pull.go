package main

import (
	"fmt"

	"github.com/cwrun/cwrun/artifact"
	"github.com/spf13/cobra"
)

func newPullCmd(g *globalOpts) *cobra.Command {
	var opts artifact.PullOptions
	var quiet bool
	cmd := &cobra.Command{
		Use:   "pull [flags] REF",
		Short: "Fetch a VM disk from an OCI registry into cwrun's disk cache",
		Long: `Fetch a VM disk published in an OCI registry (or an oci: layout) into
cwrun's disk cache, uncompressed and verified against its digest, so that
'cwrun run --disk' boots it without downloading again.

REF may be
  - a podman-machine style index: the entry for this platform whose
    "disktype" annotation is --disktype is chosen;
  - an OCI artifact whose layer is a disk (qcow2 or raw; zstd, xz, gzip
    or uncompressed, from the media type or the file name);
  - a containerdisk image: one disk file under / or /disk/ of its layers.
With --referrer-of IMAGE, REF is left out: the newest referrer of IMAGE
with --artifact-type is pulled (the referrers API, or the sha256-<hex>
tag schema on registries without it), looked up at registries.conf's
mirrors first, then at the registry.

A bare name means a registry image (registries.conf's short names apply);
docker:// and oci: references are read as such.`,
		Args: func(cmd *cobra.Command, args []string) error {
			if opts.ReferrerOf != "" {
				return cobra.MaximumNArgs(0)(cmd, args)
			}
			return cobra.ExactArgs(1)(cmd, args)
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			sess := g.session()
			defer sess.Close()
			opts.System = sess.System()
			opts.Log = g.logger()
			if !quiet {
				opts.Progress = cmd.ErrOrStderr()
			}
			ref := ""
			if len(args) == 1 {
				ref = args[0]
			}
			d, err := artifact.Pull(cmd.Context(), ref, opts)
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if quiet {
				fmt.Fprintln(w, d.Path)
				return nil
			}
			fmt.Fprintf(w, "pulled %s\n  disk    %s\n  format  %s\n  layer   %s\n", d.Ref, d.Path, d.Format, d.Digest)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&opts.DiskType, "disktype", "qemu", `the "disktype" annotation to choose in a podman-machine style index`)
	f.StringVar(&opts.ReferrerOf, "referrer-of", "", "pull the newest referrer of this registry IMAGE instead of REF")
	f.StringVar(&opts.ArtifactType, "artifact-type", artifact.ArtifactTypeSealedDisk, "with --referrer-of: the referrer's artifactType")
	f.StringVar(&opts.CacheDir, "cache-dir", "", "disk cache (default $XDG_CACHE_HOME/cwrun/disks or ~/.cache/cwrun/disks)")
	f.BoolVarP(&quiet, "quiet", "q", false, "print only the cached disk's path")
	return cmd
}
