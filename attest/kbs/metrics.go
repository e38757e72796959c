package kbs

import (
	"net/http"
	"slices"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// metrics are the broker's Prometheus collectors. Labels take values
// from fixed sets only (TEE names the broker knows, outcomes, checks,
// routes), whatever clients send.
type metrics struct {
	handshakes *prometheus.CounterVec
	denials    *prometheus.CounterVec
	latency    *prometheus.HistogramVec
	gatherer   prometheus.Gatherer
}

func newMetrics(reg prometheus.Registerer, a *admission) (*metrics, error) {
	m := &metrics{
		handshakes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "cwrun", Subsystem: "kbs", Name: "handshakes_total",
			Help: "KBS handshake steps by TEE and outcome (challenged, ok, rejected, replay, expired, restarted, bad_request, no_session, busy).",
		}, []string{"tee", "outcome"}),
		denials: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "cwrun", Subsystem: "kbs", Name: "denials_total",
			Help: "Refused releases and handshakes by the check that failed.",
		}, []string{"check"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "cwrun", Subsystem: "kbs", Name: "request_duration_seconds",
			Help:    "Request latency by route.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5},
		}, []string{"route"}),
	}
	cs := []prometheus.Collector{m.handshakes, m.denials, m.latency}
	if a != nil {
		cs = append(cs,
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{
				Namespace: "cwrun", Subsystem: "kbs", Name: "admission_limit",
				Help: "How many handshakes may be in progress at once before new ones wait at /auth (it adapts to the broker's speed).",
			}, func() float64 { l, _ := a.state(); return l }),
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{
				Namespace: "cwrun", Subsystem: "kbs", Name: "admission_queued",
				Help: "Guests waiting at /auth for their turn to begin a handshake.",
			}, func() float64 { _, q := a.state(); return float64(q) }),
		)
	}
	// The broker's own registry always exists, so /metrics answers even
	// when the caller registered nowhere.
	own := prometheus.NewRegistry()
	own.MustRegister(cs...)
	m.gatherer = own
	if reg != nil {
		for _, c := range cs {
			if err := reg.Register(c); err != nil {
				return nil, err
			}
		}
		// Serve the caller's registry when it can be read: it has the
		// process and Go collectors besides ours.
		if g, ok := reg.(prometheus.Gatherer); ok {
			m.gatherer = g
		}
	}
	return m, nil
}

var knownOutcomes = []string{"challenged", "ok", "rejected", "replay", "expired", "restarted", "bad_request", "no_session", "busy"}

// handshake counts one step; an unknown TEE name is counted as "other"
// so that clients cannot grow the label set.
func (m *metrics) handshake(tee, outcome string) {
	if !slices.Contains(knownTees, tee) {
		tee = "other"
	}
	if !slices.Contains(knownOutcomes, outcome) {
		outcome = "other"
	}
	m.handshakes.WithLabelValues(tee, outcome).Inc()
}

func (s *Server) serveMetrics(w http.ResponseWriter, r *http.Request, _ []string) error {
	promhttp.HandlerFor(s.metrics.gatherer, promhttp.HandlerOpts{}).ServeHTTP(w, r)
	return nil
}
