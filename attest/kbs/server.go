package kbs

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdsa"
	"crypto/elliptic"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/cwrun/cwrun/attest"
	"github.com/cwrun/cwrun/attest/kbs/store"
)

// Defaults for Options.
const (
	DefaultSessionTTL = 5 * time.Minute
	DefaultTokenTTL   = 5 * time.Minute
)

// Request body limits. Evidence is the largest thing a guest sends (an
// SNP report with its certificate chain is about 10 KiB, a TDX quote with
// its PCK chain and event log a few tens), so 1 MiB leaves room without
// letting one request hold much memory.
const (
	maxAuthBody     = 64 << 10
	maxEvidenceBody = 1 << 20
	maxAdminBody    = 1 << 20
	maxResourceBody = 1 << 20
)

// Server is the broker's HTTP side. It holds no per-session state: a
// handshake's state travels in a sealed cookie and its result in a signed
// token, so any Server made with the same keys over the same store can
// answer any step.
type Server struct {
	store      store.Store
	epoch      uint64 // the store's nonce epoch; 0: it keeps nonces durably
	verifiers  map[string]attest.Verifier
	token      *tokenSigner
	cookie     cipher.AEAD
	atRest     cipher.AEAD
	cookieOld  []cipher.AEAD // a rotation's earlier keys: they open, never seal
	atRestOld  []cipher.AEAD
	atRestID   string // AtRestKeyID of the current key
	admin      *adminVerifier
	register   bool
	sessionTTL time.Duration
	tokenTTL   time.Duration
	log        *slog.Logger
	now        func() time.Time
	metrics    *metrics
	admit      *admission // nil: every handshake begins at once
	policies   *policyCache
	routes     routes

	workloads workloadCache // see workload

	// The broker-wide resource policy as last read (see resourcePolicy).
	polMu sync.Mutex
	pol   string
	polAt time.Time
}

// New checks opts and makes a broker. It does not touch the store; the
// store's health shows at /healthz.
func New(opts Options) (*Server, error) {
	if opts.Store == nil {
		return nil, errors.New("kbs: Options.Store is required")
	}
	if opts.TokenKey == nil {
		return nil, errors.New("kbs: Options.TokenKey is required (a P-256 key that signs attestation tokens)")
	}
	if opts.TokenKey.Curve != elliptic.P256() {
		return nil, fmt.Errorf("kbs: Options.TokenKey is on %s; ES256 tokens need a P-256 key", opts.TokenKey.Curve.Params().Name)
	}
	cookie, err := newAEAD("CookieKey", opts.CookieKey)
	if err != nil {
		return nil, err
	}
	atRest, err := newAEAD("AtRestKey", opts.AtRestKey)
	if err != nil {
		return nil, err
	}
	if slices.Equal(opts.CookieKey, opts.AtRestKey) {
		// One key for two jobs would let a sealed passphrase pass for a
		// cookie's ciphertext and the other way round; AAD separates them
		// too, but distinct keys are what an operator should have.
		return nil, errors.New("kbs: CookieKey and AtRestKey must differ")
	}
	cookieOld, err := newAEADs("PreviousCookieKeys", opts.PreviousCookieKeys)
	if err != nil {
		return nil, err
	}
	atRestOld, err := newAEADs("PreviousAtRestKeys", opts.PreviousAtRestKeys)
	if err != nil {
		return nil, err
	}
	verifiers := make(map[string]attest.Verifier, len(opts.Verifiers))
	for _, v := range opts.Verifiers {
		if v == nil {
			return nil, errors.New("kbs: Options.Verifiers holds a nil verifier")
		}
		tee := v.Tee()
		if _, dup := verifiers[tee]; dup {
			return nil, fmt.Errorf("kbs: two verifiers for tee %q", tee)
		}
		verifiers[tee] = v
	}
	admin, err := newAdminVerifier(opts.AdminKeys)
	if err != nil {
		return nil, err
	}
	tok, err := newTokenSigner(opts.TokenKey)
	if err != nil {
		return nil, err
	}
	s := &Server{
		store:      opts.Store,
		verifiers:  verifiers,
		token:      tok,
		cookie:     cookie,
		atRest:     atRest,
		cookieOld:  cookieOld,
		atRestOld:  atRestOld,
		atRestID:   AtRestKeyID(opts.AtRestKey),
		admin:      admin,
		register:   opts.AllowRegister,
		sessionTTL: opts.SessionTTL,
		tokenTTL:   opts.TokenTTL,
		log:        opts.Logger,
		now:        opts.Now,
		policies:   newPolicyCache(),
	}
	if ne, ok := opts.Store.(store.NonceEpocher); ok {
		if e, ok := ne.NonceEpoch(); ok {
			s.epoch = e
		}
	}
	if s.sessionTTL <= 0 {
		s.sessionTTL = DefaultSessionTTL
	}
	if s.tokenTTL <= 0 {
		s.tokenTTL = DefaultTokenTTL
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.now == nil {
		s.now = time.Now
	}
	if opts.Admission {
		wait := opts.AdmitWait
		if wait <= 0 {
			wait = DefaultAdmitWait
		}
		// Admission measures with the real clock, not opts.Now: a test's
		// frozen clock must not freeze the queue.
		s.admit = newAdmission(wait)
	}
	s.metrics, err = newMetrics(opts.Metrics, s.admit)
	if err != nil {
		return nil, err
	}
	s.makeRoutes()
	return s, nil
}

func newAEAD(name string, key []byte) (cipher.AEAD, error) {
	if len(key) != 32 {
		return nil, fmt.Errorf("kbs: Options.%s must be 32 bytes (AES-256), got %d", name, len(key))
	}
	b, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("kbs: Options.%s: %w", name, err)
	}
	return cipher.NewGCM(b)
}

func newAEADs(name string, keys [][]byte) ([]cipher.AEAD, error) {
	out := make([]cipher.AEAD, 0, len(keys))
	for i, k := range keys {
		a, err := newAEAD(fmt.Sprintf("%s[%d]", name, i), k)
		if err != nil {
			return nil, err
		}
		out = append(out, a)
	}
	return out, nil
}

// TokenPublicKey is the key that verifies the broker's attestation
// tokens (it also rides in every token's "jwk" header).
func (s *Server) TokenPublicKey() *ecdsa.PublicKey { return &s.token.key.PublicKey }

// apiError is an answer other than success: its status and a message
// that says what failed. check names the failed appraisal step for
// denials (logs and metrics); it is empty otherwise.
type apiError struct {
	status int
	msg    string
	check  string
	// again: the handshake's state is gone or stale, not refused (an
	// expired session, a restart, a rotated key); a fresh handshake
	// from /auth may succeed, and the answer says so (start_again).
	again bool
}

func (e *apiError) Error() string { return e.msg }

func errorf(status int, format string, args ...any) *apiError {
	return &apiError{status: status, msg: fmt.Sprintf(format, args...)}
}

// startAgain is a 401 for a session or token that no longer holds,
// which a fresh handshake replaces.
func startAgain(format string, args ...any) *apiError {
	e := errorf(http.StatusUnauthorized, format, args...)
	e.again = true
	return e
}

func badRequest(format string, args ...any) *apiError {
	return errorf(http.StatusBadRequest, format, args...)
}

// handler is what every route implements: write the success answer, or
// return an error that serveHTTP turns into {"error": ...}.
type handler func(w http.ResponseWriter, r *http.Request, p []string) error

// route names a handler for metrics and logs. Routes are a fixed set so
// that the latency histogram's labels stay bounded whatever paths
// clients send.
type route struct {
	name    string
	methods []string // allowed methods, for 405's Allow header
	h       handler
}

// ServeHTTP dispatches. Routing is done by hand rather than with
// http.ServeMux so that every answer, 404 and 405 included, is JSON, and
// so that paths are never cleaned or redirected.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	rt, params := s.match(r.URL.Path)
	name := "unknown"
	defer func() {
		// A panic is a bug; the client still gets JSON, the log the
		// detail. net/http's own abort stays an abort.
		if p := recover(); p != nil {
			if p == http.ErrAbortHandler {
				panic(p)
			}
			s.log.LogAttrs(r.Context(), slog.LevelError, "handler panicked", slog.String("route", name),
				slog.String("panic", fmt.Sprint(p)), slog.String("stack", string(debug.Stack())))
			writeJSON(w, http.StatusInternalServerError, errorBody{Error: "the broker failed to answer (internal error); see its log"})
		}
	}()
	var err error
	switch {
	case rt == nil:
		err = errorf(http.StatusNotFound, "no such endpoint %s; the broker serves /kbs/v0/{auth,attest,resource,...}", truncate(r.URL.Path, 64))
	case !slices.Contains(rt.methods, r.Method):
		name = rt.name
		w.Header().Set("Allow", strings.Join(rt.methods, ", "))
		err = errorf(http.StatusMethodNotAllowed, "%s does not take %s; use %s", rt.name, r.Method, strings.Join(rt.methods, " or "))
	default:
		name = rt.name
		err = rt.h(w, r, params)
	}
	if err != nil {
		s.writeError(w, r, name, err)
	}
	s.metrics.latency.WithLabelValues(name).Observe(time.Since(start).Seconds())
}

// routes are the broker's endpoints, made once in New.
type routes struct {
	healthz, metrics, auth, attest, resourcePolicy, register, workloads,
	resource, adminResource, adminResources, workload, key, reseal route
}

func (s *Server) makeRoutes() {
	get, post, put, del, head := http.MethodGet, http.MethodPost, http.MethodPut, http.MethodDelete, http.MethodHead
	s.routes = routes{
		healthz:        route{"healthz", []string{get, head}, s.healthz},
		metrics:        route{"metrics", []string{get}, s.serveMetrics},
		auth:           route{"auth", []string{post}, s.handleAuth},
		attest:         route{"attest", []string{post}, s.handleAttest},
		resourcePolicy: route{"resource_policy", []string{get, post}, s.adminOnly(s.handleResourcePolicy)},
		register:       route{"register_workload", []string{post}, s.handleRegisterWorkload},
		workloads:      route{"admin_workloads", []string{get, post}, s.adminOnly(s.handleWorkloads)},
		resource:       route{"resource", []string{get, post}, s.handleResource},
		adminResource:  route{"admin_resource", []string{get, del}, s.adminOnly(s.handleAdminResource)},
		adminResources: route{"admin_resources", []string{get}, s.adminOnly(s.handleAdminResources)},
		workload:       route{"admin_workload", []string{get, put, del}, s.adminOnly(s.handleWorkload)},
		key:            route{"key", []string{get, post}, s.handleKey},
		reseal:         route{"admin_reseal", []string{post}, s.adminOnly(s.handleReseal)},
	}
}

func (s *Server) match(path string) (*route, []string) {
	rs := &s.routes
	switch path {
	case "/healthz":
		return &rs.healthz, nil
	case "/metrics":
		return &rs.metrics, nil
	}
	rest, ok := strings.CutPrefix(path, "/kbs/v0/")
	if !ok {
		return nil, nil
	}
	switch rest {
	case "auth":
		return &rs.auth, nil
	case "attest":
		return &rs.attest, nil
	case "resource-policy":
		return &rs.resourcePolicy, nil
	case "register_workload":
		return &rs.register, nil
	case "admin/workloads":
		return &rs.workloads, nil
	case "admin/reseal":
		return &rs.reseal, nil
	case "admin/resources":
		return &rs.adminResources, nil
	}
	if p, ok := strings.CutPrefix(rest, "resource/"); ok {
		if segs := strings.Split(p, "/"); len(segs) == 3 {
			return &rs.resource, segs
		}
		return nil, nil
	}
	if p, ok := strings.CutPrefix(rest, "admin/resource/"); ok {
		if segs := strings.Split(p, "/"); len(segs) == 3 {
			return &rs.adminResource, segs
		}
		return nil, nil
	}
	if id, ok := strings.CutPrefix(rest, "admin/workloads/"); ok && !strings.Contains(id, "/") {
		return &rs.workload, []string{id}
	}
	if id, ok := strings.CutPrefix(rest, "key/"); ok && !strings.Contains(id, "/") {
		return &rs.key, []string{id}
	}
	return nil, nil
}

// writeError answers {"error": ...}. A non-API error is the broker's own
// failure (the store, most likely): the client learns only that, the log
// gets the detail.
func (s *Server) writeError(w http.ResponseWriter, r *http.Request, route string, err error) {
	var ae *apiError
	if !errors.As(err, &ae) {
		s.log.LogAttrs(r.Context(), slog.LevelError, "request failed",
			slog.String("route", route), slog.String("remote", r.RemoteAddr), slog.String("error", err.Error()))
		ae = &apiError{status: http.StatusInternalServerError, msg: "the broker failed to answer (" + internalHint(err) + "); see its log"}
	}
	writeJSON(w, ae.status, errorBody{Error: ae.msg, StartAgain: ae.again})
}

// internalHint names the broken part without the detail, which may
// carry store connection strings or paths.
func internalHint(err error) string {
	var se *storeError
	if errors.As(err, &se) {
		return "store: " + se.op
	}
	return "internal error"
}

// storeError marks a store failure that is the broker's fault, not the
// client's.
type storeError struct {
	op  string
	err error
}

func (e *storeError) Error() string { return "store " + e.op + ": " + e.err.Error() }
func (e *storeError) Unwrap() error { return e.err }

func storeErr(op string, err error) error { return &storeError{op: op, err: err} }

type errorBody struct {
	Error string `json:"error"`
	// StartAgain tells a client that a fresh handshake may succeed
	// where this one could not (cwrun's guests start one); absent for
	// denials, which a retry would only repeat.
	StartAgain bool `json:"start_again,omitempty"`
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		// Only our own types reach here; a failure is a bug.
		status, b = http.StatusInternalServerError, []byte(`{"error":"encoding the answer failed"}`)
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

// readBody reads at most limit bytes of the request body.
func readBody(w http.ResponseWriter, r *http.Request, limit int64, what string) ([]byte, error) {
	// Sized from Content-Length (trusted only up to presizeMax, as the
	// client may not send what it announced), so that a 30 KiB
	// attestation is read into one buffer rather than through a dozen
	// growing copies.
	var buf bytes.Buffer
	if n := r.ContentLength; n > 0 {
		// ReadFrom wants MinRead bytes free before each read, EOF included.
		buf.Grow(int(min(n, limit, presizeMax)) + bytes.MinRead)
	}
	_, err := buf.ReadFrom(http.MaxBytesReader(w, r.Body, limit))
	b := buf.Bytes()
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return nil, errorf(http.StatusRequestEntityTooLarge, "%s is larger than %d bytes", what, limit)
		}
		return nil, badRequest("reading %s: %v", what, err)
	}
	return b, nil
}

// presizeMax bounds the buffer readBody makes before any of the body
// has arrived.
const presizeMax = 256 << 10

// decodeJSON decodes exactly one JSON value from b into v. strict
// refuses unknown fields: on for cwrun's own shapes, off for Trustee's,
// whose clients may send fields newer than ours.
func decodeJSON(b []byte, v any, strict bool, what string) error {
	if !strict {
		// json.Unmarshal refuses trailing data itself, and copies less
		// than a Decoder: evidence bodies are tens of KiB.
		if err := json.Unmarshal(b, v); err != nil {
			return badRequest("%s is not valid JSON of the expected shape: %v", what, err)
		}
		return nil
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return badRequest("%s is not valid JSON of the expected shape: %v", what, err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return badRequest("%s has data after its JSON value", what)
	}
	return nil
}

func (s *Server) healthz(w http.ResponseWriter, r *http.Request, _ []string) error {
	ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
	defer cancel()
	// A read of a key that need not exist proves the store answers.
	if _, err := s.store.Policy(ctx, "resource"); err != nil && !errors.Is(err, store.ErrNotFound) {
		s.log.LogAttrs(r.Context(), slog.LevelError, "health check failed", slog.String("error", err.Error()))
		return errorf(http.StatusServiceUnavailable, "store unreachable; see the broker log")
	}
	writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	return nil
}

// truncate shortens untrusted strings before they go into messages.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
