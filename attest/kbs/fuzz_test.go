package kbs

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cwrun/cwrun/attest"
	"github.com/cwrun/cwrun/attest/sample"
)

// Every request body the broker parses, and the cookie and token
// parsers, are fuzzed. The HTTP targets assert the one thing that must
// hold for any input: the answer is never a 5xx (bad input is the
// client's fault, and says so with a 4xx). TestFuzzSeedsNever5xx replays
// the seeds and testdata/fuzz over real HTTP.

// nonceMark in an attest body is replaced by the fuzz iteration's
// session nonce, so that inputs reach the evidence check.
const nonceMark = "@NONCE@"

func fuzzBroker(t testing.TB) *broker {
	return newBroker(t, func(o *Options) {
		o.AllowRegister = true
		o.SessionTTL = 365 * 24 * time.Hour // fuzzing may run for hours
		o.Logger = nil
		o.Metrics = nil
	})
}

// httpTarget describes one fuzzed endpoint: how a fuzz input becomes a
// request.
type httpTarget struct {
	name  string
	seeds func(t testing.TB) [][]byte
	req   func(b *broker, data []byte) *http.Request
}

func httpTargets() []httpTarget {
	return []httpTarget{
		{"FuzzAuthBody", authSeeds, func(b *broker, data []byte) *http.Request {
			return httptest.NewRequest(http.MethodPost, "/kbs/v0/auth", bytes.NewReader(data))
		}},
		{"FuzzAttestBody", attestSeeds, func(b *broker, data []byte) *http.Request {
			var n [32]byte
			rand.Read(n[:])
			nonce := base64.StdEncoding.EncodeToString(n[:])
			cookie, err := b.srv.sealSession(session{Tee: attest.TeeSample, Nonce: nonce, Expires: time.Now().Add(time.Hour)})
			if err != nil {
				b.t.Fatal(err)
			}
			r := httptest.NewRequest(http.MethodPost, "/kbs/v0/attest", bytes.NewReader(bytes.ReplaceAll(data, []byte(nonceMark), []byte(nonce))))
			r.AddCookie(&http.Cookie{Name: CookieName, Value: cookie})
			return r
		}},
		{"FuzzWorkloadSpec", specSeeds, func(b *broker, data []byte) *http.Request {
			r := httptest.NewRequest(http.MethodPost, "/kbs/v0/admin/workloads", bytes.NewReader(data))
			tok, err := MintAdminToken(b.keys.admin, time.Minute)
			if err != nil {
				b.t.Fatal(err)
			}
			r.Header.Set("Authorization", "Bearer "+tok)
			return r
		}},
		{"FuzzRegisterWorkload", registerSeeds, func(b *broker, data []byte) *http.Request {
			return httptest.NewRequest(http.MethodPost, "/kbs/v0/register_workload", bytes.NewReader(data))
		}},
		{"FuzzResourcePolicy", policySeeds, func(b *broker, data []byte) *http.Request {
			r := httptest.NewRequest(http.MethodPost, "/kbs/v0/resource-policy", bytes.NewReader(data))
			tok, err := MintAdminToken(b.keys.admin, time.Minute)
			if err != nil {
				b.t.Fatal(err)
			}
			r.Header.Set("Authorization", "Bearer "+tok)
			return r
		}},
	}
}

func fuzzHTTP(f *testing.F, name string) {
	var tgt httpTarget
	for _, t := range httpTargets() {
		if t.name == name {
			tgt = t
		}
	}
	b := fuzzBroker(f)
	for _, s := range tgt.seeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		w := httptest.NewRecorder()
		b.srv.ServeHTTP(w, tgt.req(b, data))
		check4xx(t, w.Code, w.Body.Bytes(), data)
	})
}

func check4xx(t testing.TB, status int, body, input []byte) {
	t.Helper()
	if status >= 500 {
		t.Fatalf("status %d for input %q: %s", status, truncate(string(input), 300), body)
	}
	if status >= 400 {
		var eb errorBody
		if err := json.Unmarshal(body, &eb); err != nil || eb.Error == "" {
			t.Fatalf("status %d answer is not {\"error\": ...}: %q", status, body)
		}
	}
}

func FuzzAuthBody(f *testing.F)         { fuzzHTTP(f, "FuzzAuthBody") }
func FuzzAttestBody(f *testing.F)       { fuzzHTTP(f, "FuzzAttestBody") }
func FuzzWorkloadSpec(f *testing.F)     { fuzzHTTP(f, "FuzzWorkloadSpec") }
func FuzzRegisterWorkload(f *testing.F) { fuzzHTTP(f, "FuzzRegisterWorkload") }
func FuzzResourcePolicy(f *testing.F)   { fuzzHTTP(f, "FuzzResourcePolicy") }

func authSeeds(testing.TB) [][]byte {
	return [][]byte{
		[]byte(`{"version":"0.4.0","tee":"sample","extra-params":{"supported-hash-algorithms":["sha384"]}}`),
		[]byte(`{"version":"0.4.0","tee":"snp","extra-params":""}`),
		[]byte(`{"version":"0.0.0","tee":"snp","extra-params":"{\"workload_id\":\"w\"}"}`),
		[]byte(`{"version":"0.4.0","tee":"\u0000"}`),
		[]byte(`{"version":0.4}`),
		[]byte(`[]`),
		[]byte(`{"version":"0.4.0","tee":"sample"} trailing`),
		[]byte(``),
	}
}

func attestSeeds(t testing.TB) [][]byte {
	key, err := attest.NewTeeKey()
	if err != nil {
		t.Fatal(err)
	}
	good, _ := json.Marshal(attest.Attestation{
		RuntimeData: attest.RuntimeData{Nonce: nonceMark, TeePubKey: key.JWK},
		TeeEvidence: attest.TeeEvidence{Primary: json.RawMessage(`{"svn":"1","report_data":"AAAA"}`)},
	})
	return [][]byte{
		good,
		[]byte(`{"runtime-data":{"nonce":"` + nonceMark + `","tee-pubkey":{"kty":"EC","crv":"P-256","alg":"ECDH-ES+A256KW","x":"","y":""}},"tee-evidence":{"primary_evidence":{},"additional_evidence":""}}`),
		[]byte(`{"runtime-data":{"nonce":"` + nonceMark + `","tee-pubkey":{"kty":"RSA","alg":"RSA-OAEP-256","n":"AQAB","e":"AQAB"}},"tee-evidence":{"primary_evidence":null}}`),
		[]byte(`{"runtime-data":{"nonce":"` + nonceMark + `","tee-pubkey":{"kty":"oct","k":"AAAA"}},"tee-evidence":{"primary_evidence":1}}`),
		[]byte(`{"init-data":{"format":"toml","body":"x"},"runtime-data":{"nonce":"wrong"}}`),
		[]byte(`{"runtime-data":{"nonce":"` + nonceMark + `","tee-pubkey":` + string(key.JWK) + `},"tee-evidence":{"primary_evidence":{"svn":"1","report_data":"` + strings.Repeat("A", 64) + `"},"additional_evidence":"{\"x\":1}"}}`),
		[]byte(`null`),
	}
}

func specSeeds(testing.TB) [][]byte {
	return [][]byte{
		[]byte(`{"id":"web","tee":"sample","passphrase":"p"}`),
		[]byte(`{"id":"db","tee":"snp","passphrase":"p","references":{"measurement":["` + hexOf('a', 96) + `"]},"cpus":2,"memory_mib":512}`),
		[]byte(`{"id":"pol","tee":"tdx","passphrase":"p","policy":"package policy\nimport rego.v1\nallow if input.cwrun.tee == \"tdx\"\n"}`),
		[]byte(`{"id":"x","tee":"snp","passphrase":"p","references":{"m":["a\u0000b"]}}`),
		[]byte(`{"id":"x","tee":"snp","passphrase":"p","policy":"package policy\nallow if { x := 1/0 }"}`),
		[]byte(`{"id":"","tee":""}`),
		[]byte(`{"id":"x","tee":"snp","passphrase":"p","cpus":-1}`),
		[]byte(`{"id":"x","tee":"snp","passphrase":"p","policy":"\u0000"}`),
	}
}

func registerSeeds(testing.TB) [][]byte {
	return [][]byte{
		[]byte(`{"workload_id":"krun","launch_measurement":"` + hexOf('a', 96) + `","tee_config":"{\"flags\":{\"bits\":63},\"minfw\":{\"major\":0,\"minor\":0}}","passphrase":"p"}`),
		[]byte(`{"workload_id":"krun2","launch_measurement":"` + hexOf('b', 96) + `","tee_config":"","passphrase":"p","tee":"sample"}`),
		[]byte(`{"workload_id":"krun3","launch_measurement":"zz","tee_config":"{","passphrase":""}`),
		[]byte(`{"workload_id":"../x","launch_measurement":"","tee_config":"null","passphrase":"p"}`),
		[]byte(`{"workload_id":"k4","launch_measurement":"` + hexOf('c', 96) + `","tee_config":"{\"cpus\":1e9}","passphrase":"p"}`),
	}
}

func policySeeds(testing.TB) [][]byte {
	enc := func(s string) []byte {
		b, _ := json.Marshal(policyBody{Policy: base64.RawURLEncoding.EncodeToString([]byte(s))})
		return b
	}
	return [][]byte{
		enc("package policy\n\ndefault allow = true\n"),
		enc("package policy\nimport rego.v1\ndefault allow := false\nallow if { input.cwrun.tee == \"snp\" }\n"),
		enc("package policy\nallow if {"),
		enc(""),
		enc("package other\nallow := true"),
		enc("package policy\nallow if http.send({\"method\":\"get\",\"url\":\"http://127.0.0.1\"})"),
		[]byte(`{"policy":"%%%"}`),
		[]byte(`{"policy":1}`),
	}
}

// FuzzRoute sends any method and path: routing and path validation
// must answer 4xx for what they do not serve.
func FuzzRoute(f *testing.F) {
	b := fuzzBroker(f)
	for _, s := range [][2]string{
		{"GET", "/kbs/v0/resource/a/b/c"}, {"POST", "/kbs/v0/resource/a/b/c"}, {"GET", "/kbs/v0/key/x"},
		{"DELETE", "/kbs/v0/admin/workloads/x"}, {"PUT", "/kbs/v0/admin/workloads/"}, {"GET", "/kbs/v0/admin/resource/a/b/c"},
		{"GET", "/kbs/v0/resource/%2e%2e/b/c"}, {"GET", "/healthz"}, {"PATCH", "/kbs/v0/auth"},
		{"POST", "/kbs/v0/admin/reseal"}, {"GET", "/kbs/v0/admin/resources"}, {"DELETE", "/kbs/v0/admin/resources"},
	} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, method, path string) {
		r, err := http.NewRequest(method, "http://kbs"+path, nil)
		if err != nil || r.URL.Path == "" {
			return
		}
		w := httptest.NewRecorder()
		b.srv.ServeHTTP(w, r)
		check4xx(t, w.Code, w.Body.Bytes(), []byte(method+" "+path))
	})
}

// FuzzSessionCookie: the cookie plaintext parser never panics, and what
// it accepts seals and parses back to the same session.
func FuzzSessionCookie(f *testing.F) {
	b := fuzzBroker(f)
	for _, ss := range []session{
		{Tee: "sample", Nonce: "n", Expires: time.Unix(1700000000, 0)},
		{Tee: "snp", Nonce: strings.Repeat("x", 44), Expires: time.Unix(1, 0), Token: "a.b.c"},
		{Epoch: 0x0102030405060708, Tee: "sample", Nonce: "n", Expires: time.Unix(1700000000, 0)},
	} {
		v, _ := b.srv.sealSession(ss)
		raw, _ := base64.RawURLEncoding.DecodeString(v)
		pt, _ := b.srv.cookie.Open(nil, raw[:12], raw[12:], []byte(sessionAAD))
		f.Add(pt)
	}
	f.Add([]byte{1})
	f.Add([]byte{1, 0, 0, 0, 0, 0, 0, 0, 0, 255})
	// Version 1, sealed before the epoch: {Tee: "t", Nonce: "n"}.
	f.Add([]byte{1, 0, 0, 0, 0, 0, 0, 0, 9, 1, 't', 1, 'n', 0, 0})
	f.Fuzz(func(t *testing.T, pt []byte) {
		ss, err := parseSession(pt)
		if err != nil {
			return
		}
		v, err := b.srv.sealSession(ss)
		if err != nil {
			t.Fatalf("parsed session does not seal: %v", err)
		}
		back, err := b.srv.openSession(v)
		if err != nil || back.Epoch != ss.Epoch || back.Tee != ss.Tee || back.Nonce != ss.Nonce || back.Token != ss.Token || !back.Expires.Equal(ss.Expires) {
			t.Fatalf("round trip: %+v → %+v (%v)", ss, back, err)
		}
		// Random cookie values never open.
		if _, err := b.srv.openSession(base64.RawURLEncoding.EncodeToString(pt)); err == nil {
			t.Fatalf("unsealed bytes opened as a session: %q", pt)
		}
	})
}

// FuzzToken: attestation and admin token parsers never panic and never
// accept what they did not sign.
func FuzzToken(f *testing.F) {
	b := fuzzBroker(f)
	g := b.guest(sample.NewAttester())
	tok := g.handshake()
	adm, _ := MintAdminToken(b.keys.admin, time.Minute)
	f.Add(tok)
	f.Add(adm)
	f.Add("eyJhbGciOiJub25lIn0.e30.")
	f.Add("a.b.c.d.e")
	f.Add("...")
	f.Fuzz(func(t *testing.T, s string) {
		now := time.Now()
		if c, _, err := b.srv.token.verify(s, now); err == nil && s != tok {
			// Only the seed token is genuine; anything else that verifies
			// must at least be a differently encoded copy of it.
			if c.Cwrun.Tee != attest.TeeSample {
				t.Fatalf("forged token accepted: %q", s)
			}
		}
		if err := b.srv.admin.verify(s, now); err == nil && s != adm {
			parts := strings.Split(s, ".")
			if len(parts) != 3 || !strings.HasPrefix(adm, parts[0]+".") {
				t.Fatalf("forged admin token accepted: %q", s)
			}
		}
	})
}

// TestFuzzSeedsNever5xx replays every HTTP fuzz target's seeds and its
// testdata/fuzz corpus at a running broker over real HTTP.
func TestFuzzSeedsNever5xx(t *testing.T) {
	b := fuzzBroker(t)
	n := 0
	for _, tgt := range httpTargets() {
		inputs := tgt.seeds(t)
		corpus, err := readCorpus(filepath.Join("testdata", "fuzz", tgt.name))
		if err != nil {
			t.Fatal(err)
		}
		if len(corpus) == 0 {
			t.Errorf("%s has no testdata/fuzz corpus", tgt.name)
		}
		inputs = append(inputs, corpus...)
		for _, in := range inputs {
			r := tgt.req(b, in)
			body, err := io.ReadAll(r.Body)
			if err != nil {
				t.Fatal(err)
			}
			// Re-aim the in-process request at the real server.
			req, err := http.NewRequest(r.Method, b.ts.URL+r.URL.RequestURI(), bytes.NewReader(body))
			if err != nil {
				t.Fatal(err)
			}
			req.Header = r.Header.Clone()
			resp, err := b.ts.Client().Do(req)
			if err != nil {
				t.Fatal(err)
			}
			answer, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			check4xx(t, resp.StatusCode, answer, in)
			n++
		}
	}
	if n < 40 {
		t.Fatalf("only %d inputs replayed", n)
	}
}

// readCorpus reads Go fuzz corpus files holding one []byte argument.
func readCorpus(dir string) ([][]byte, error) {
	ents, err := os.ReadDir(dir)
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out [][]byte
	for _, e := range ents {
		raw, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			return nil, err
		}
		lines := strings.Split(strings.TrimSuffix(string(raw), "\n"), "\n")
		if len(lines) != 2 || lines[0] != "go test fuzz v1" {
			return nil, fmt.Errorf("%s/%s: not a one-argument corpus file", dir, e.Name())
		}
		arg := strings.TrimSuffix(strings.TrimPrefix(lines[1], "[]byte("), ")")
		s, err := strconv.Unquote(arg)
		if err != nil {
			return nil, fmt.Errorf("%s/%s: %v", dir, e.Name(), err)
		}
		out = append(out, []byte(s))
	}
	return out, nil
}
