package main

import (
	"fmt"

	"github.com/cwrun/cwrun/launcher"
	"github.com/spf13/cobra"
)

func newCleanupCmd(g *globalOpts) *cobra.Command {
	return &cobra.Command{
		Use:   "cleanup",
		Short: "Remove what killed runs left behind (run folders, image mounts)",
		Long: `A cwrun run killed with SIGKILL cannot clean up after itself: its QEMU dies
with it, but its run folder and its image mount stay. Every cwrun run removes
those of dead runs before it starts; cleanup does the same on demand (after a
crash, before a backup). Live runs are never touched.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			sess := g.session()
			defer sess.Close()
			removed, err := launcher.Cleanup(cmd.Context(), sess, "", g.logger())
			for _, d := range removed {
				fmt.Fprintf(cmd.OutOrStdout(), "removed %s\n", d)
			}
			return err
		},
	}
}
