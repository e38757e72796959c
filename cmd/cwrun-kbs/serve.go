package main

import (
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime/debug"

	"github.com/cwrun/cwrun/attest/kbs/config"
	"github.com/cwrun/cwrun/internal/sdnotify"
	"github.com/spf13/cobra"
)

type kbsServeOpts struct {
	config, listen, tlsCert, tlsKey, store string
	tees                                   []string
	allowRegister, insecureHTTP            bool
}

func newKbsServeCmd(g *globalOpts) *cobra.Command {
	o := &kbsServeOpts{}
	cmd := &cobra.Command{
		Use:   "serve [flags]",
		Short: "Run the key broker",
		Long: `Run the key broker described by --config; flags override the file.

It serves HTTPS only, unless --insecure-http. A renewed certificate
(--tls-cert/--tls-key rewritten, or cwrun kbs renew-tls) is served from
the next connection on, without a restart. SIGINT or SIGTERM stops it
gracefully: it stops accepting, lets requests in flight finish (at most
10 s) and closes the store. Every write it acknowledges is on disk.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return runKbsServe(cmd, g, o) },
	}
	f := cmd.Flags()
	f.StringVar(&o.config, "config", filepath.Join(config.DefaultDir(), config.FileName), "the broker's config file (`cwrun kbs init` makes one)")
	f.StringVar(&o.listen, "listen", "", "host:port to serve on (default: the config's listen)")
	f.StringVar(&o.tlsCert, "tls-cert", "", "PEM certificate chain (default: the config's tls_cert)")
	f.StringVar(&o.tlsKey, "tls-key", "", "PEM private key of --tls-cert, mode 0600 (default: the config's tls_key)")
	f.StringVar(&o.store, "store", "", "sqlite:PATH or postgres://... (default: the config's store)")
	f.StringSliceVar(&o.tees, "tees", nil, "TEEs to serve, comma-separated: snp, tdx, tpm, sample (default: the config's tees; sample proves nothing)")
	f.BoolVar(&o.allowRegister, "allow-register", false, "enable krun's unauthenticated /kbs/v0/register_workload (never overwrites)")
	f.BoolVar(&o.insecureHTTP, "insecure-http", false, "serve plain HTTP, without TLS: for tests on one machine only")
	return cmd
}

func runKbsServe(cmd *cobra.Command, g *globalOpts, o *kbsServeOpts) error {
	c, err := config.Read(o.config)
	if err != nil {
		return err
	}
	abs := func(p string) string {
		if a, err := filepath.Abs(p); err == nil {
			return a
		}
		return p
	}
	f := cmd.Flags()
	if o.listen != "" {
		c.Listen = o.listen
	}
	if o.tlsCert != "" || o.tlsKey != "" {
		c.TLSCert, c.TLSKey = abs(o.tlsCert), abs(o.tlsKey)
		if o.tlsCert == "" || o.tlsKey == "" {
			return fmt.Errorf("--tls-cert and --tls-key go together")
		}
	}
	if o.store != "" {
		c.Store = config.ResolveStore(o.store, mustGetwd())
	}
	if len(o.tees) > 0 {
		c.TEEs = o.tees
	}
	if f.Changed("allow-register") {
		c.AllowRegister = o.allowRegister
	}
	if o.insecureHTTP {
		c.TLSCert, c.TLSKey = "", ""
	}
	if err := c.Validate(); err != nil {
		return fmt.Errorf("kbs config %s: %w", o.config, err)
	}
	stderr := cmd.ErrOrStderr()
	if o.insecureHTTP {
		fmt.Fprintln(stderr, "cwrun: WARNING: --insecure-http: the broker serves PLAIN HTTP. Admin tokens and attestation tokens cross the network in clear. Never use it beyond a test on one machine.")
	}
	for _, t := range c.Served() {
		if t == "sample" {
			fmt.Fprintln(stderr, "cwrun: WARNING: serving --tee sample: its evidence proves NOTHING, any host can get a sample workload's key. For development only.")
		}
	}
	// The broker's garbage is short-lived; see kbs.DefaultGCPercent.
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(c.GOGC())
	}
	// The one line saying where it serves is the point of `serve`: log at
	// info unless the user chose a level.
	logger := g.logger()
	if !cmd.Flag("log-level").Changed {
		logger = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	// Under systemd (Type=notify) the unit is started once the broker
	// listens, and shows when it stops; elsewhere nothing is sent.
	notify := func(state string) {
		if err := sdnotify.FromEnv(state); err != nil {
			logger.Warn("telling systemd", "state", state, "error", err)
		}
	}
	ctx := cmd.Context()
	stopped := make(chan struct{})
	defer close(stopped)
	go func() {
		select {
		case <-ctx.Done():
			notify("STOPPING=1")
		case <-stopped:
		}
	}()
	return c.Serve(ctx, config.ServeOptions{
		Logger:       logger,
		InsecureHTTP: o.insecureHTTP,
		Ready: func(addr net.Addr) {
			notify("READY=1\nSTATUS=serving on " + addr.String())
		},
	})
}

func mustGetwd() string {
	wd, err := os.Getwd()
	if err != nil {
		return "."
	}
	return wd
}
