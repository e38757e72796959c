package main

import (
	"log/slog"
	"os"

	"github.com/cwrun/cwrun/images"
	"github.com/cwrun/cwrun/version"
	"github.com/spf13/cobra"
	"go.podman.io/image/v5/types"
)

// globalOpts are the flags every verb shares.
type globalOpts struct {
	root, runRoot, driver string
	authFile, policyFile  string
	tlsVerify             bool
	logLevel              string
}

func (g *globalOpts) session() *images.Session {
	sys := &types.SystemContext{AuthFilePath: g.authFile, SignaturePolicyPath: g.policyFile}
	if !g.tlsVerify {
		sys.DockerInsecureSkipTLSVerify = types.OptionalBoolTrue
		sys.OCIInsecureSkipTLSVerify = true
	}
	return images.NewSession(images.Options{Root: g.root, RunRoot: g.runRoot, Driver: g.driver, System: sys})
}

func (g *globalOpts) logger() *slog.Logger {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(g.logLevel)); err != nil {
		lvl = slog.LevelWarn
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
}

func newRootCmd() *cobra.Command {
	g := &globalOpts{}
	root := &cobra.Command{
		Use:           "cwrun",
		Short:         "Seal OCI images into confidential workloads and run them as microVMs",
		Version:       version.Version,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	pf := root.PersistentFlags()
	pf.StringVar(&g.root, "root", "", "local image storage graph root (default: podman's, from storage.conf)")
	pf.StringVar(&g.runRoot, "runroot", "", "local image storage run root (default: podman's)")
	pf.StringVar(&g.driver, "storage-driver", "", "local image storage driver (default: podman's)")
	pf.StringVar(&g.authFile, "authfile", "", "registry credentials file (default: podman's auth.json)")
	pf.StringVar(&g.policyFile, "signature-policy", "", "policy.json to use (default: podman's /etc/containers/policy.json)")
	pf.BoolVar(&g.tlsVerify, "tls-verify", true, "require HTTPS and verify certificates when talking to registries")
	pf.StringVar(&g.logLevel, "log-level", "warn", "log level: debug, info, warn, error")
	root.AddCommand(newBuildCmd(g), newInspectCmd(g), newRunCmd(g), newKbsCmd(), newCleanupCmd(g))
	root.AddCommand(newPullCmd(g), newPushCmd(g), newVTPMCACmd())
	root.AddCommand(append(newOCICmds(root, g), newQuadletCmd())...)
	return root
}
