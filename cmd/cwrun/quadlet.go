package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cwrun/cwrun/quadlet"
	"github.com/spf13/cobra"
)

func newQuadletCmd() *cobra.Command {
	q := &cobra.Command{Use: "quadlet", Short: "Write systemd units that run sealed images with podman"}
	var s quadlet.Spec
	var format, dir string
	gen := &cobra.Command{
		Use:   "generate IMAGE --name NAME",
		Short: "Write NAME.container (quadlet) or NAME.service (plain systemd) for a sealed image",
		Long: `Write a systemd unit that runs the sealed IMAGE with podman, cwrun being its
OCI runtime (podman --runtime; quadlet has no Runtime= key, hence GlobalArgs=).

--format container writes a quadlet file for podman 4.4 and later: put it in
/etc/containers/systemd/ and run systemctl daemon-reload. --format service
writes an equivalent plain unit for older podman (Debian 12 ships 4.3): put it
in /etc/systemd/system/. Without --dir the unit goes to stdout.

The disk key comes from the key broker the image was sealed with (--kbs
overrides it); --kbs-cacert names the broker's CA file on the host.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			s.Image = args[0]
			if s.Runtime == "" {
				exe, err := os.Executable()
				if err != nil {
					return fmt.Errorf("finding cwrun's own path: %w (pass --runtime)", err)
				}
				if exe, err = filepath.EvalSymlinks(exe); err != nil {
					return err
				}
				s.Runtime = exe
			}
			var buf bytes.Buffer
			if err := quadlet.Generate(&buf, s, format); err != nil {
				return err
			}
			if dir == "" {
				_, err := cmd.OutOrStdout().Write(buf.Bytes())
				return err
			}
			p := filepath.Join(dir, quadlet.FileName(s.Name, format))
			if err := os.WriteFile(p, buf.Bytes(), 0o644); err != nil {
				return fmt.Errorf("writing the unit: %w", err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "wrote %s; now: systemctl daemon-reload && systemctl start %s.service\n", p, s.Name)
			return nil
		},
	}
	f := gen.Flags()
	f.StringVar(&s.Name, "name", "", "the container's and the unit's name (required)")
	f.StringVar(&s.KBS, "kbs", "", "the key broker's URL (default: the one the image was sealed with)")
	f.StringVar(&s.KBSCACert, "kbs-cacert", "", "absolute path of the key broker's CA certificates (PEM) on the host")
	f.StringArrayVarP(&s.Publish, "publish", "p", nil, "podman -p value (repeatable); the unit also names the container ports in the io.cwrun.publish annotation, so that the VM serves them")
	f.StringArrayVarP(&s.Env, "env", "e", nil, "KEY=VALUE for the workload (needs an image sealed with --allow-overrides)")
	f.StringVar(&s.Restart, "restart", "on-failure", "systemd Restart= policy")
	f.IntVar(&s.StopTimeout, "stop-timeout", 10, "seconds podman stop waits before it kills the VM")
	f.StringVar(&s.Runtime, "runtime", "", "cwrun's absolute path in the unit (default: this cwrun)")
	f.StringVar(&s.Podman, "podman", "/usr/bin/podman", "podman's path (service form)")
	f.StringVar(&format, "format", quadlet.FormatContainer, "container (quadlet, podman 4.4+) or service (plain systemd unit)")
	f.StringVar(&dir, "dir", "", "write NAME.container or NAME.service into this folder (e.g. /etc/containers/systemd) instead of stdout")
	gen.MarkFlagRequired("name") //nolint:errcheck // the flag exists
	q.AddCommand(gen)
	return q
}
