package config

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// certReloader serves the TLS certificate and key of two files, read
// again when either changes: a renewal (certbot, an ACME client, a
// secret mounted by the orchestrator) takes effect without a restart,
// which would cost guests in flight their sessions. The files are
// looked at, at most every recheck, on a TLS handshake; a pair that
// does not load (the files caught between two writes, a key that does
// not match) keeps the certificate in use and is logged once, until
// the files change again.
type certReloader struct {
	certFile, keyFile string
	log               *slog.Logger
	recheck           time.Duration
	// expiry shows the served certificate's end, for monitoring to
	// alert on before guests can no longer reach the broker.
	expiry prometheus.Gauge

	mu        sync.Mutex
	cert      *tls.Certificate
	stamp     fileStamp // of the pair in use, or of the last pair refused
	checkedAt time.Time
}

// fileStamp tells whether a file changed: its size, modification time
// and inode (a rename over it, as atomic writers do, changes the inode).
type fileStamp struct {
	size, ino [2]int64
	mtime     [2]time.Time
}

// expiryWarning is how long before its end the served certificate is
// warned about, at the start, on a reload and every day.
const expiryWarning = 30 * 24 * time.Hour

func newCertReloader(certFile, keyFile string, log *slog.Logger, reg prometheus.Registerer) (*certReloader, error) {
	r := &certReloader{certFile: certFile, keyFile: keyFile, log: log, recheck: time.Second,
		expiry: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "cwrun_kbs_tls_cert_expiry_timestamp_seconds",
			Help: "When the TLS certificate the broker serves expires (Unix time).",
		})}
	if reg != nil {
		if err := reg.Register(r.expiry); err != nil {
			return nil, fmt.Errorf("TLS certificate metric: %w", err)
		}
	}
	st, err := r.stat()
	if err != nil {
		return nil, fmt.Errorf("tls_cert/tls_key: %w", err)
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("tls_cert/tls_key: %w", err)
	}
	r.cert, r.stamp, r.checkedAt = &cert, st, time.Now()
	r.served(time.Now())
	return r, nil
}

// served records the certificate in use and warns when it ends soon.
// The caller holds mu, or has not shared r yet.
func (r *certReloader) served(now time.Time) {
	end := r.cert.Leaf.NotAfter
	r.expiry.Set(float64(end.Unix()))
	switch left := end.Sub(now); {
	case left <= 0:
		r.log.Error("the TLS certificate has expired: clients refuse the broker; renew it (init's own: cwrun kbs renew-tls), the broker reads it again without a restart", "tls_cert", r.certFile, "not_after", end)
	case left < expiryWarning:
		r.log.Warn(fmt.Sprintf("the TLS certificate expires in %d days: renew it (init's own: cwrun kbs renew-tls), the broker reads it again without a restart", int(left.Hours()/24)), "tls_cert", r.certFile, "not_after", end)
	}
}

// watchExpiry repeats served's warning every day until ctx ends: a
// broker that runs for a year unrestarted still says so in time.
func (r *certReloader) watchExpiry(ctx context.Context) {
	t := time.NewTicker(24 * time.Hour)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			r.mu.Lock()
			r.served(now)
			r.mu.Unlock()
		}
	}
}

func (r *certReloader) stat() (fileStamp, error) {
	var s fileStamp
	for i, f := range []string{r.certFile, r.keyFile} {
		fi, err := os.Stat(f)
		if err != nil {
			return s, err
		}
		s.size[i], s.mtime[i] = fi.Size(), fi.ModTime()
		if sys, ok := fi.Sys().(*syscall.Stat_t); ok {
			s.ino[i] = int64(sys.Ino)
		}
	}
	return s, nil
}

// GetCertificate is tls.Config's.
func (r *certReloader) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	if now.Sub(r.checkedAt) < r.recheck {
		return r.cert, nil
	}
	r.checkedAt = now
	st, err := r.stat()
	if err != nil || st == r.stamp {
		// Gone for a moment (a rename in progress) or unchanged.
		return r.cert, nil
	}
	r.stamp = st
	cert, err := tls.LoadX509KeyPair(r.certFile, r.keyFile)
	if err != nil {
		r.log.Warn("the TLS certificate or key changed but does not load; still serving the previous one", "tls_cert", r.certFile, "tls_key", r.keyFile, "error", err)
		return r.cert, nil
	}
	r.cert = &cert
	r.log.Info("TLS certificate reloaded", "tls_cert", r.certFile, "not_after", cert.Leaf.NotAfter)
	r.served(now)
	return r.cert, nil
}
