package main

import (
	"errors"
	"fmt"

	"github.com/cwrun/cwrun/artifact"
	"github.com/spf13/cobra"
)

func newPushCmd(g *globalOpts) *cobra.Command {
	var opts artifact.PushOptions
	var asArtifact, quiet bool
	cmd := &cobra.Command{
		Use:   "push --artifact [flags] SEALED_IMAGE REF",
		Short: "Publish a sealed image's disk as an OCI 1.1 artifact that refers to its source image",
		Long: `Publish the encrypted disk of a sealed image as an OCI 1.1 artifact:
artifactType ` + artifact.ArtifactTypeSealedDisk + `, an empty config, the disk
zstd-compressed as its one layer, and the image it was sealed from as its
subject, so that 'cwrun pull --referrer-of SOURCE' finds it.

SEALED_IMAGE is any image reference (local storage, docker://, oci:, ...).
REF is a registry repository, with or without a tag, and must be the
source image's repository: registries list referrers per repository.
The source image is --subject, or what the sealed image's
org.opencontainers.image.base.name annotation names. On a registry without
the referrers API, the sha256-<hex> tag index is updated as well (added
to, never replaced).

To copy a sealed image itself, use skopeo copy or podman push.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if !asArtifact {
				return errors.New("cwrun push only publishes disks as artifacts: pass --artifact (to copy the image itself, use skopeo copy or podman push)")
			}
			sess := g.session()
			defer sess.Close()
			opts.Log = g.logger()
			if !quiet {
				opts.Progress = cmd.ErrOrStderr()
			}
			res, err := artifact.PushSealed(cmd.Context(), sess, args[0], args[1], opts)
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if quiet {
				fmt.Fprintln(w, res.Digest)
				return nil
			}
			how := "referrers API"
			if !res.ReferrersAPI {
				how = "no referrers API: tag sha256-" + res.Subject.Digest.Encoded() + " updated"
			}
			fmt.Fprintf(w, "pushed %s\n  artifact  %s\n  subject   %s\n  disk      %s (%s compressed, layer %s)\n  registry  %s\n",
				res.Ref, res.Digest, res.Subject.Digest, mib(res.DiskSize), mib(res.Layer.Size), res.Layer.Digest, how)
			return nil
		},
	}
	f := cmd.Flags()
	f.BoolVar(&asArtifact, "artifact", false, "publish the sealed disk as an OCI artifact (required)")
	f.StringVar(&opts.Subject, "subject", "", "the image the disk was sealed from (default: the sealed image's org.opencontainers.image.base.name annotation)")
	f.StringVar(&opts.ArtifactType, "artifact-type", artifact.ArtifactTypeSealedDisk, "the artifact's artifactType")
	f.StringVar(&opts.TmpDir, "tmpdir", "", "folder for the compressed disk while it is pushed (default $TMPDIR)")
	f.BoolVarP(&quiet, "quiet", "q", false, "print only the artifact's manifest digest")
	return cmd
}
