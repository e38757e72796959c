package kbs

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cwrun/cwrun/attest"
	"github.com/cwrun/cwrun/attest/kbs/store"
	"github.com/cwrun/cwrun/attest/kbs/store/pgtest"
	"github.com/cwrun/cwrun/attest/kbs/store/postgres"
	"github.com/cwrun/cwrun/attest/kbs/store/sqlite"
	"github.com/cwrun/cwrun/attest/sample"
	"github.com/cwrun/cwrun/internal/syncbuf"
	"github.com/prometheus/client_golang/prometheus"
)

// clock is a settable Options.Now.
type clock struct {
	mu  sync.Mutex
	off time.Duration
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return time.Now().Add(c.off)
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	c.off += d
	c.mu.Unlock()
}

// keys are one broker deployment's secrets; replicas share them.
type keys struct {
	token  *ecdsa.PrivateKey
	cookie []byte
	atRest []byte
	admin  ed25519.PrivateKey
}

func newKeys(t testing.TB) keys {
	t.Helper()
	tk, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	_, ak, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return keys{token: tk, cookie: randBytes(t, 32), atRest: randBytes(t, 32), admin: ak}
}

func randBytes(t testing.TB, n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// broker is a broker under test: a real SQLite store in a temporary
// folder behind a real HTTP server.
type broker struct {
	t     testing.TB
	srv   *Server
	ts    *httptest.Server
	store store.Store
	keys  keys
	clock *clock
	logs  *syncbuf.Buffer
	reg   *prometheus.Registry
	admin *AdminClient
}

type brokerOpt func(*Options)

// openStore opens a SQLite store as `cwrun kbs serve` does: exclusive,
// spent nonces in memory.
func openStore(t testing.TB) *sqlite.Store {
	t.Helper()
	st, err := sqlite.OpenExclusive(context.Background(), filepath.Join(t.TempDir(), "kbs.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

func newBroker(t testing.TB, opts ...brokerOpt) *broker {
	t.Helper()
	return newBrokerOn(t, openStore(t), newKeys(t), opts...)
}

// newBrokerOn makes a broker over st with k: two of them with the same
// k and st are replicas.
func newBrokerOn(t testing.TB, st store.Store, k keys, opts ...brokerOpt) *broker {
	t.Helper()
	b := &broker{t: t, store: st, keys: k, clock: &clock{}, logs: &syncbuf.Buffer{}, reg: prometheus.NewRegistry()}
	o := Options{
		Store:     st,
		Verifiers: []attest.Verifier{sample.NewVerifier(), chosenVerifier{attest.TeeSNP}, chosenVerifier{attest.TeeTDX}},
		TokenKey:  k.token,
		CookieKey: k.cookie,
		AtRestKey: k.atRest,
		AdminKeys: []crypto.PublicKey{k.admin.Public()},
		Logger:    slog.New(slog.NewJSONHandler(b.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Metrics:   b.reg,
		Now:       b.clock.Now,
	}
	for _, f := range opts {
		f(&o)
	}
	srv, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	b.srv = srv
	b.ts = httptest.NewServer(srv)
	t.Cleanup(b.ts.Close)
	b.admin = &AdminClient{BaseURL: b.ts.URL, HTTP: b.ts.Client(), Key: k.admin}
	return b
}

func (b *broker) addWorkload(spec WorkloadSpec) {
	b.t.Helper()
	if _, err := b.admin.AddWorkload(context.Background(), spec); err != nil {
		b.t.Fatalf("AddWorkload(%s): %v", spec.ID, err)
	}
}

// storeWorkload puts spec in the store directly, past the admin API's
// checks: a workload that an earlier broker, or another client of a
// shared store, may have stored, which appraisal must still judge.
func (b *broker) storeWorkload(spec WorkloadSpec) {
	b.t.Helper()
	w, err := b.srv.workloadFromSpec(&spec)
	if err == nil {
		err = b.store.AddWorkload(context.Background(), w)
	}
	if err != nil {
		b.t.Fatalf("storing workload %s: %v", spec.ID, err)
	}
}

// chosenVerifier is a test-only verifier that believes whatever claims
// its evidence names, after checking the report data like a real one.
// It lets appraisal tests choose measurements and policy bits; the real
// verifiers have their own suites.
type chosenVerifier struct{ tee string }

type chosenEvidence struct {
	ReportData string            `json:"report_data"` // base64 of 64 bytes
	Values     map[string]string `json:"values"`
}

func (v chosenVerifier) Tee() string { return v.tee }

func (v chosenVerifier) Verify(_ context.Context, ev json.RawMessage, rd []byte) (*attest.Claims, error) {
	var e chosenEvidence
	dec := json.NewDecoder(bytes.NewReader(ev))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&e); err != nil {
		return nil, fmt.Errorf("%w: chosen: %v", attest.ErrEvidence, err)
	}
	got, err := base64.StdEncoding.DecodeString(e.ReportData)
	if err != nil || !bytes.Equal(got, rd) {
		return nil, fmt.Errorf("%w: chosen: report data does not bind this handshake", attest.ErrEvidence)
	}
	return &attest.Claims{Tee: v.tee, Values: e.Values}, nil
}

// chosenAttester makes chosenVerifier's evidence.
type chosenAttester struct {
	tee    string
	values map[string]string
}

func (a chosenAttester) Tee() string { return a.tee }

func (a chosenAttester) Evidence(_ context.Context, rd []byte) (json.RawMessage, error) {
	return json.Marshal(chosenEvidence{ReportData: base64.StdEncoding.EncodeToString(rd), Values: a.values})
}

// guest drives the protocol step by step, so tests can break any step.
type guest struct {
	t    testing.TB
	base string
	hc   *http.Client
	att  attest.Attester
	key  *attest.TeeKey
}

func newGuest(t testing.TB, base string, hc *http.Client, att attest.Attester) *guest {
	t.Helper()
	jar, _ := cookiejar.New(nil)
	c := *hc
	c.Jar = jar
	k, err := attest.NewTeeKey()
	if err != nil {
		t.Fatal(err)
	}
	return &guest{t: t, base: base, hc: &c, att: att, key: k}
}

func (b *broker) guest(att attest.Attester) *guest {
	return newGuest(b.t, b.ts.URL, b.ts.Client(), att)
}

// do sends one request and returns the status and body.
func (g *guest) do(method, path string, body []byte, hdr ...string) (int, []byte) {
	g.t.Helper()
	return doReq(g.t, g.hc, method, g.base+path, body, hdr...)
}

func doReq(t testing.TB, hc *http.Client, method, url string, body []byte, hdr ...string) (int, []byte) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, out
}

// auth runs /auth and returns the nonce.
func (g *guest) auth() string {
	g.t.Helper()
	body, _ := json.Marshal(attest.Request{Version: attest.ProtocolVersion, Tee: g.att.Tee(), ExtraParams: json.RawMessage(`{}`)})
	st, out := g.do(http.MethodPost, "/kbs/v0/auth", body)
	if st != http.StatusOK {
		g.t.Fatalf("auth: %d %s", st, out)
	}
	var ch attest.Challenge
	if err := json.Unmarshal(out, &ch); err != nil {
		g.t.Fatal(err)
	}
	return ch.Nonce
}

// attestBody builds /attest's body: evidence bound to nonce and
// bindKey, sent with sendKey as the runtime data's TEE key.
func (g *guest) attestBody(nonce string, bindKey, sendKey json.RawMessage) []byte {
	g.t.Helper()
	rd, err := attest.ReportData(nonce, bindKey, "")
	if err != nil {
		g.t.Fatal(err)
	}
	ev, err := g.att.Evidence(context.Background(), rd)
	if err != nil {
		g.t.Fatal(err)
	}
	b, err := json.Marshal(attest.Attestation{
		RuntimeData: attest.RuntimeData{Nonce: nonce, TeePubKey: sendKey},
		TeeEvidence: attest.TeeEvidence{Primary: ev},
	})
	if err != nil {
		g.t.Fatal(err)
	}
	return b
}

// attest runs /attest and returns the token (failing the test on an
// error status).
func (g *guest) attest(nonce string) string {
	g.t.Helper()
	st, out := g.do(http.MethodPost, "/kbs/v0/attest", g.attestBody(nonce, g.key.JWK, g.key.JWK))
	if st != http.StatusOK {
		g.t.Fatalf("attest: %d %s", st, out)
	}
	var ar attest.AttestResponse
	if err := json.Unmarshal(out, &ar); err != nil {
		g.t.Fatal(err)
	}
	return ar.Token
}

// handshake runs auth and attest.
func (g *guest) handshake() string {
	g.t.Helper()
	return g.attest(g.auth())
}

// fetch GETs a resource with the session cookie and decrypts a 200.
func (g *guest) fetch(path string, hdr ...string) (int, []byte) {
	g.t.Helper()
	st, out := g.do(http.MethodGet, "/kbs/v0/resource/"+path, nil, hdr...)
	if st != http.StatusOK {
		return st, out
	}
	pt, err := attest.DecryptResource(g.key, out)
	if err != nil {
		g.t.Fatalf("decrypting %s: %v", path, err)
	}
	return st, pt
}

// errMsg extracts {"error": ...}.
func errMsg(t testing.TB, body []byte) string {
	t.Helper()
	var eb errorBody
	if err := json.Unmarshal(body, &eb); err != nil || eb.Error == "" {
		t.Fatalf("answer is not {\"error\": ...}: %q", body)
	}
	return eb.Error
}

func wantError(t testing.TB, st int, body []byte, wantStatus int, wantMsg string) {
	t.Helper()
	if st != wantStatus {
		t.Fatalf("status %d, want %d (%s)", st, wantStatus, body)
	}
	if msg := errMsg(t, body); !strings.Contains(msg, wantMsg) {
		t.Fatalf("error %q does not say %q", msg, wantMsg)
	}
}

// wantStartAgain checks an error answer's start_again flag: set for a
// handshake gone stale, never for a denial.
func wantStartAgain(t testing.TB, body []byte, want bool) {
	t.Helper()
	var e errorBody
	if err := json.Unmarshal(body, &e); err != nil {
		t.Fatal(err)
	}
	if e.StartAgain != want {
		t.Errorf("start_again = %v, want %v (%s)", e.StartAgain, want, body)
	}
}

// hexOf makes a hex string of n digits from a seed character.
func hexOf(c byte, n int) string { return strings.Repeat(string(c), n) }

func mustURL(t testing.TB, s string) *url.URL {
	t.Helper()
	u, err := url.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

// openPostgres opens a store on a fresh database of a throw-away
// PostgreSQL server; it skips where none can run (and in -short mode).
func openPostgres(t testing.TB) store.Store {
	t.Helper()
	st, err := postgres.Open(context.Background(), pgtest.Shared(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

// jsonEqual compares two JSON documents after compaction.
func jsonEqual(a, b []byte) bool {
	var ca, cb bytes.Buffer
	if json.Compact(&ca, a) != nil || json.Compact(&cb, b) != nil {
		return false
	}
	return bytes.Equal(ca.Bytes(), cb.Bytes())
}
