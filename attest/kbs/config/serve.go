package config

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/cwrun/cwrun/attest/kbs"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// ServeOptions tune Serve. The zero value serves HTTPS only.
type ServeOptions struct {
	Logger *slog.Logger // default: discard
	// Metrics receives the broker's metrics; default: a registry of its
	// own with the Go and process collectors, served at /metrics.
	Metrics prometheus.Registerer
	// InsecureHTTP allows serving without TLS when the config names no
	// certificate. Tokens and passphrases then cross the network in
	// clear, wrapped only by the JWE of the protocol.
	InsecureHTTP bool
	// ShutdownTimeout bounds how long in-flight requests may finish once
	// ctx ends; default 10 s.
	ShutdownTimeout time.Duration
	// Ready, when set, is called once the listener is open.
	Ready func(addr net.Addr)
}

// Serve runs the broker the configuration describes until ctx ends:
// it then stops accepting, lets in-flight requests finish (at most
// ShutdownTimeout) and closes the store.
func (c *Config) Serve(ctx context.Context, o ServeOptions) error {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Metrics == nil {
		reg := prometheus.NewRegistry()
		reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
		o.Metrics = reg
	}
	if o.ShutdownTimeout <= 0 {
		o.ShutdownTimeout = 10 * time.Second
	}
	useTLS := c.TLSCert != ""
	if !useTLS && !o.InsecureHTTP {
		return errors.New("no tls_cert/tls_key in the config: give them (or --tls-cert/--tls-key), or pass --insecure-http to serve plain HTTP for testing")
	}
	opts, st, err := c.Options(ctx, o.Logger, o.Metrics)
	if err != nil {
		return err
	}
	defer st.Close()
	srv, err := kbs.New(opts)
	if err != nil {
		return fmt.Errorf("kbs: %w", err)
	}
	hs := &http.Server{
		Handler:           srv,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       time.Minute,
		WriteTimeout:      time.Minute,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(o.Logger.Handler(), slog.LevelWarn),
	}
	if useTLS {
		certs, err := newCertReloader(c.TLSCert, c.TLSKey, o.Logger, o.Metrics)
		if err != nil {
			return err
		}
		wctx, stopWatch := context.WithCancel(ctx)
		defer stopWatch()
		go certs.watchExpiry(wctx)
		hs.TLSConfig = &tls.Config{GetCertificate: certs.GetCertificate, MinVersion: tls.VersionTLS12}
	}
	ln, err := net.Listen("tcp", c.Listen)
	if err != nil {
		return fmt.Errorf("listen %s: %w", c.Listen, err)
	}
	if useTLS {
		ln = tls.NewListener(ln, hs.TLSConfig)
	}
	scheme := "https"
	if !useTLS {
		scheme = "http"
	}
	o.Logger.Info("kbs serving", "listen", scheme+"://"+ln.Addr().String(),
		"store", RedactURL(c.Store), "tees", strings.Join(c.Served(), ","),
		"admin_keys", len(c.keys.admin), "allow_register", c.AllowRegister)
	if o.Ready != nil {
		o.Ready(ln.Addr())
	}

	done := make(chan error, 1)
	go func() { done <- hs.Serve(ln) }()
	select {
	case err := <-done:
		return fmt.Errorf("serving %s: %w", c.Listen, err)
	case <-ctx.Done():
	}
	o.Logger.Info("kbs shutting down", "grace", o.ShutdownTimeout)
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), o.ShutdownTimeout)
	defer cancel()
	if err := hs.Shutdown(sctx); err != nil {
		hs.Close()
		return fmt.Errorf("shutting down: requests still running after %s were cut: %w", o.ShutdownTimeout, err)
	}
	if err := <-done; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
