// Command cwrun-kbs is cwrun's key broker and its admin client: what
// `cwrun kbs ...` runs. It is a binary of its own so that the policy
// engine, the metrics and the database drivers it links never weigh on
// `cwrun run`, which stays resident next to every workload on the edge
// box; `cwrun kbs` execs it, and `cwrun build --kbs` calls it to
// register a workload.
package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/cwrun/cwrun/version"
	"github.com/spf13/cobra"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	g := &globalOpts{}
	root := newKbsCmd(g)
	root.Use = "cwrun kbs"
	// Cobra names a command by the first word of Use; help and usage
	// lines must read "cwrun kbs workload add", as the user types it.
	root.Annotations = map[string]string{cobra.CommandDisplayNameAnnotation: "cwrun kbs"}
	root.Version = version.Version
	root.SilenceUsage, root.SilenceErrors = true, true
	root.PersistentFlags().StringVar(&g.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	err := root.ExecuteContext(ctx)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "cwrun kbs:", err)
		os.Exit(1)
	}
}

// globalOpts are the flags every verb shares.
type globalOpts struct{ logLevel string }

func (g *globalOpts) logger() *slog.Logger {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(g.logLevel)); err != nil {
		lvl = slog.LevelInfo
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
}

// readPassphrase reads a passphrase file as readPassphraseFrom reads a
// stream.
func readPassphrase(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("passphrase file: %w", err)
	}
	defer f.Close()
	return readPassphraseFrom(f, path)
}
