package attest_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/cwrun/cwrun/attest"
	"github.com/cwrun/cwrun/attest/sample"
)

// testBroker implements the three KBS steps as the protocol document
// has them, minimally, with the sample verifier and EncryptResource. It
// decodes what the client sends strictly, so the tests also check the
// client's messages.
type testBroker struct {
	t         *testing.T
	resources map[string][]byte
	// override, by step ("auth", "attest", "resource"), replaces the
	// step's handler.
	override map[string]http.HandlerFunc
	requests atomic.Int32

	mu       sync.Mutex
	sessions map[string]*brokerSession
}

type brokerSession struct {
	nonce string
	key   json.RawMessage // set once attested
}

func newTestBroker(t *testing.T) *testBroker {
	return &testBroker{
		t:         t,
		resources: map[string][]byte{"default/key/disk": []byte("correct horse battery staple")},
		override:  map[string]http.HandlerFunc{},
		sessions:  map[string]*brokerSession{},
	}
}

func fail(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(map[string]string{"error": msg})
}

func randB64(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return base64.StdEncoding.EncodeToString(b)
}

func (b *testBroker) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b.requests.Add(1)
	var step string
	switch {
	case r.Method == http.MethodPost && r.URL.Path == "/kbs/v0/auth":
		step = "auth"
	case r.Method == http.MethodPost && r.URL.Path == "/kbs/v0/attest":
		step = "attest"
	case r.Method == http.MethodGet && strings.HasPrefix(r.URL.Path, "/kbs/v0/resource/"):
		step = "resource"
	default:
		fail(w, http.StatusNotFound, "no route "+r.Method+" "+r.URL.Path)
		return
	}
	if h := b.override[step]; h != nil {
		h(w, r)
		return
	}
	switch step {
	case "auth":
		b.auth(w, r)
	case "attest":
		b.attest(w, r)
	case "resource":
		b.resource(w, r)
	}
}

func strictDecode(r io.Reader, v any) error {
	dec := json.NewDecoder(io.LimitReader(r, 1<<20))
	dec.DisallowUnknownFields()
	return dec.Decode(v)
}

func (b *testBroker) auth(w http.ResponseWriter, r *http.Request) {
	var req attest.Request
	if err := strictDecode(r.Body, &req); err != nil {
		fail(w, http.StatusBadRequest, err.Error())
		return
	}
	var extra, want any
	json.Unmarshal(req.ExtraParams, &extra)
	json.Unmarshal([]byte(`{"supported-hash-algorithms":["sha384"]}`), &want)
	if req.Version != "0.4.0" || req.Tee != "sample" || !reflect.DeepEqual(extra, want) {
		fail(w, http.StatusBadRequest, "unexpected request "+req.Version+" "+req.Tee+" "+string(req.ExtraParams))
		return
	}
	id, nonce := randB64(16), randB64(32)
	b.mu.Lock()
	b.sessions[id] = &brokerSession{nonce: nonce}
	b.mu.Unlock()
	http.SetCookie(w, &http.Cookie{Name: attest.SessionCookie, Value: id, Secure: true, HttpOnly: true, Path: "/kbs"})
	json.NewEncoder(w).Encode(attest.Challenge{Nonce: nonce, ExtraParams: json.RawMessage(`""`)})
}

func (b *testBroker) session(r *http.Request) *brokerSession {
	ck, err := r.Cookie(attest.SessionCookie)
	if err != nil {
		return nil
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.sessions[ck.Value]
}

func (b *testBroker) attest(w http.ResponseWriter, r *http.Request) {
	s := b.session(r)
	if s == nil {
		fail(w, http.StatusUnauthorized, "no session cookie")
		return
	}
	var att attest.Attestation
	if err := strictDecode(r.Body, &att); err != nil {
		fail(w, http.StatusBadRequest, err.Error())
		return
	}
	if att.RuntimeData.Nonce != s.nonce {
		fail(w, http.StatusUnauthorized, "nonce does not match the session's")
		return
	}
	rd, err := attest.ReportData(s.nonce, att.RuntimeData.TeePubKey, att.TeeEvidence.Additional)
	if err != nil {
		fail(w, http.StatusBadRequest, err.Error())
		return
	}
	if _, err := sample.NewVerifier().Verify(r.Context(), att.TeeEvidence.Primary, rd); err != nil {
		fail(w, http.StatusUnauthorized, err.Error())
		return
	}
	b.mu.Lock()
	s.key = att.RuntimeData.TeePubKey
	b.mu.Unlock()
	json.NewEncoder(w).Encode(attest.AttestResponse{Token: "header.claims.signature"})
}

func (b *testBroker) resource(w http.ResponseWriter, r *http.Request) {
	s := b.session(r)
	if s == nil || s.key == nil {
		fail(w, http.StatusUnauthorized, "session not attested")
		return
	}
	res, ok := b.resources[strings.TrimPrefix(r.URL.Path, "/kbs/v0/resource/")]
	if !ok {
		fail(w, http.StatusNotFound, "no such resource")
		return
	}
	jwe, err := attest.EncryptResource(s.key, res)
	if err != nil {
		fail(w, http.StatusInternalServerError, err.Error())
		return
	}
	w.Write(jwe)
}

// memTransport serves requests from a handler in memory: a stand-in for
// the guest's virtio-serial transport, with no network at all.
type memTransport struct{ h http.Handler }

func (m memTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	rec := httptest.NewRecorder()
	m.h.ServeHTTP(rec, r)
	return rec.Result(), nil
}

func client(b *testBroker, a attest.Attester) *attest.Client {
	if a == nil {
		a = sample.NewAttester()
	}
	return &attest.Client{
		BaseURL:  "http://kbs.invalid",
		HTTP:     &http.Client{Transport: memTransport{b}},
		Attester: a,
	}
}

func TestClientOverHTTP(t *testing.T) {
	b := newTestBroker(t)
	srv := httptest.NewServer(b)
	defer srv.Close()
	c := &attest.Client{BaseURL: srv.URL + "/", HTTP: srv.Client(), Attester: sample.NewAttester()}
	got, err := c.Resource(context.Background(), "default/key/disk")
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != "correct horse battery staple" {
		t.Errorf("Resource = %q", got)
	}
	if n := b.requests.Load(); n != 3 {
		t.Errorf("%d requests, want 3 (auth, attest, resource)", n)
	}
}

func TestClientInMemoryTransport(t *testing.T) {
	b := newTestBroker(t)
	got, err := client(b, nil).Resource(context.Background(), "default/key/disk")
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != "correct horse battery staple" {
		t.Errorf("Resource = %q", got)
	}
}

// lyingAttester binds report data other than the handshake's.
type lyingAttester struct{ attest.Attester }

func (l lyingAttester) Evidence(ctx context.Context, rd []byte) (json.RawMessage, error) {
	other := bytes.Clone(rd)
	other[0] ^= 1
	return l.Attester.Evidence(ctx, other)
}

type failingAttester struct{ attest.Attester }

func (failingAttester) Evidence(context.Context, []byte) (json.RawMessage, error) {
	return nil, errors.New("/dev/sev-guest: no such device")
}

func TestClientFailures(t *testing.T) {
	sealedToOther := func(w http.ResponseWriter, r *http.Request) {
		k, _ := attest.NewTeeKey()
		jwe, _ := attest.EncryptResource(k.JWK, []byte("x"))
		w.Write(jwe)
	}
	for _, tc := range []struct {
		name     string
		step     string
		handler  http.HandlerFunc
		attester attest.Attester
		path     string
		want     []string
		status   int // of a *BrokerError; 0: not one
	}{
		{
			name: "403 reason surfaced", step: "resource",
			handler: func(w http.ResponseWriter, r *http.Request) {
				fail(w, http.StatusForbidden, "measurement ab12… not among the 2 registered for workload W")
			},
			want:   []string{"broker denied resource default/key/disk (403): measurement ab12… not among the 2 registered for workload W"},
			status: 403,
		},
		{
			name: "401 Trustee ErrorInformation", step: "attest",
			handler: func(w http.ResponseWriter, r *http.Request) {
				w.WriteHeader(http.StatusUnauthorized)
				w.Write([]byte(`{"type":"https://github.com/confidential-containers/kbs/errors/AttestationFailed","detail":"Attestation failed: policy denied"}`))
			},
			want:   []string{"broker rejected the evidence (401): Attestation failed: policy denied"},
			status: 401,
		},
		{
			name: "evidence for other report data", attester: lyingAttester{sample.NewAttester()},
			want: []string{"(401)", "does not bind this handshake"}, status: 401,
		},
		{
			name: "attester fails", attester: failingAttester{sample.NewAttester()},
			want: []string{"getting sample evidence", "/dev/sev-guest"},
		},
		{
			name: "404", path: "default/key/other",
			want: []string{"broker has no resource default/key/other (404): no such resource"}, status: 404,
		},
		{
			name: "plain-text 500 with escapes", step: "auth",
			handler: func(w http.ResponseWriter, r *http.Request) {
				w.WriteHeader(http.StatusInternalServerError)
				w.Write([]byte("database\x1b[2J down\u202e"))
			},
			want: []string{"broker refused the handshake (500): database [2J down"}, status: 500,
		},
		{
			name: "bad JWE", step: "resource",
			handler: func(w http.ResponseWriter, r *http.Request) { w.Write([]byte(`{"protected":"e30"}`)) },
			want:    []string{"resource default/key/disk: decrypting resource"},
		},
		{
			name: "JWE sealed to another key", step: "resource", handler: sealedToOther,
			want: []string{"not sealed to this handshake's key"},
		},
		{
			name: "oversized resource", step: "resource",
			handler: func(w http.ResponseWriter, r *http.Request) { w.Write(make([]byte, attest.MaxResourceJWE+1)) },
			want:    []string{"kbs resource: the broker's answer exceeds"},
		},
		{
			name: "oversized challenge", step: "auth",
			handler: func(w http.ResponseWriter, r *http.Request) {
				http.SetCookie(w, &http.Cookie{Name: attest.SessionCookie, Value: "x"})
				w.Write(bytes.Repeat([]byte(" "), attest.MaxChallengeSize+1))
			},
			want: []string{"kbs auth: the broker's answer exceeds"},
		},
		{
			name: "oversized error body", step: "resource",
			handler: func(w http.ResponseWriter, r *http.Request) {
				w.WriteHeader(http.StatusForbidden)
				w.Write(bytes.Repeat([]byte("A"), 1<<20))
			},
			want: []string{"(403): AAAA", "A…"}, status: 403,
		},
		{
			name: "no session cookie", step: "auth",
			handler: func(w http.ResponseWriter, r *http.Request) {
				w.Write([]byte(`{"nonce":"bm9uY2U=","extra-params":""}`))
			},
			want: []string{"set no kbs-session-id cookie"},
		},
		{
			name: "broker selects sha512", step: "auth",
			handler: func(w http.ResponseWriter, r *http.Request) {
				http.SetCookie(w, &http.Cookie{Name: attest.SessionCookie, Value: "x"})
				w.Write([]byte(`{"nonce":"bm9uY2U=","extra-params":{"selected-hash-algorithm":"sha512"}}`))
			},
			want: []string{`selected hash algorithm "sha512"`},
		},
		{
			name: "empty nonce", step: "auth",
			handler: func(w http.ResponseWriter, r *http.Request) {
				http.SetCookie(w, &http.Cookie{Name: attest.SessionCookie, Value: "x"})
				w.Write([]byte(`{"nonce":"","extra-params":""}`))
			},
			want: []string{`"nonce" missing`},
		},
		{
			name: "no token", step: "attest",
			handler: func(w http.ResponseWriter, r *http.Request) { w.Write([]byte(`{}`)) },
			want:    []string{"without a token"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newTestBroker(t)
			if tc.handler != nil {
				b.override[tc.step] = tc.handler
			}
			path := tc.path
			if path == "" {
				path = "default/key/disk"
			}
			got, err := client(b, tc.attester).Resource(context.Background(), path)
			if err == nil {
				t.Fatalf("Resource succeeded with %q", got)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
			var be *attest.BrokerError
			if errors.As(err, &be) != (tc.status != 0) || (be != nil && be.Status != tc.status) {
				t.Errorf("error %v: BrokerError %+v, want status %d", err, be, tc.status)
			}
		})
	}
}

func TestClientRejectsPaths(t *testing.T) {
	for _, p := range []string{"", "key", "a/b", "a/b/c/d", "a//c", "../b/c", "a/./c", "a/b/.."} {
		b := newTestBroker(t)
		if _, err := client(b, nil).Resource(context.Background(), p); err == nil || !strings.Contains(err.Error(), "repo/type/tag") {
			t.Errorf("Resource(%q) = %v; want a path error", p, err)
		}
		if n := b.requests.Load(); n != 0 {
			t.Errorf("Resource(%q) sent %d requests before refusing the path", p, n)
		}
	}
}

func TestClientEscapesPath(t *testing.T) {
	b := newTestBroker(t)
	b.resources["my repo/key/a?b"] = []byte("odd")
	got, err := client(b, nil).Resource(context.Background(), "my repo/key/a?b")
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != "odd" {
		t.Errorf("got %q", got)
	}
}

func TestClientContextCancelled(t *testing.T) {
	b := newTestBroker(t)
	srv := httptest.NewServer(b)
	defer srv.Close()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	c := &attest.Client{BaseURL: srv.URL, Attester: sample.NewAttester()}
	if _, err := c.Resource(ctx, "default/key/disk"); !errors.Is(err, context.Canceled) {
		t.Errorf("Resource with a cancelled context = %v, want context.Canceled", err)
	}
}

// TestClientFreshSessionEachCall checks that a second Resource call runs
// its own handshake and does not reuse the first one's cookie.
func TestClientFreshSessionEachCall(t *testing.T) {
	b := newTestBroker(t)
	c := client(b, nil)
	for i := 0; i < 2; i++ {
		if _, err := c.Resource(context.Background(), "default/key/disk"); err != nil {
			t.Fatal(err)
		}
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.sessions) != 2 {
		t.Errorf("%d sessions, want 2", len(b.sessions))
	}
}
