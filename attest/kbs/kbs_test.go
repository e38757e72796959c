package kbs

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cwrun/cwrun/attest"
	"github.com/cwrun/cwrun/attest/kbs/store"
	"github.com/cwrun/cwrun/attest/kbs/store/sqlite"
	"github.com/cwrun/cwrun/attest/sample"
)

const passphrase = "correct horse battery staple 0123456789abcdef"

func TestSampleHandshakeReleasesPassphrase(t *testing.T) {
	b := newBroker(t)
	b.addWorkload(WorkloadSpec{ID: "web", Tee: attest.TeeSample, Passphrase: passphrase})

	g := b.guest(sample.NewAttester())
	tok := g.handshake()
	// With the session cookie.
	st, pt := g.fetch(PassphrasePath("web"))
	if st != http.StatusOK || string(pt) != passphrase {
		t.Fatalf("cookie fetch: %d %q", st, pt)
	}
	// With the bearer token and no cookie, as Trustee's clients do.
	g2 := newGuest(t, b.ts.URL, b.ts.Client(), sample.NewAttester())
	g2.key = g.key
	st, pt = g2.fetch(PassphrasePath("web"), "Authorization", "Bearer "+tok)
	if st != http.StatusOK || string(pt) != passphrase {
		t.Fatalf("bearer fetch: %d %q", st, pt)
	}
	// krun's key path releases the same passphrase under the same rules.
	st, out := g.do(http.MethodGet, "/kbs/v0/key/web", nil)
	if st != http.StatusOK {
		t.Fatalf("key: %d %s", st, out)
	}
	if pt, err := attest.DecryptResource(g.key, out); err != nil || string(pt) != passphrase {
		t.Fatalf("key: %q %v", pt, err)
	}
	// The token is EAR-shaped and marks sample evidence as a warning.
	c, payload, err := b.srv.token.verify(tok, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	var full tokenClaims
	if err := json.Unmarshal(payload, &full); err != nil {
		t.Fatal(err)
	}
	sm := full.Submods["cpu0"]
	if sm.Status != "warning" || !c.Cwrun.Insecure || c.Cwrun.Tee != "sample" || full.Profile != earProfile {
		t.Fatalf("token claims: %s", payload)
	}
	if full.Expires-full.IssuedAt != int64(DefaultTokenTTL/time.Second) {
		t.Fatalf("token lifetime %d s", full.Expires-full.IssuedAt)
	}
	if _, ok := sm.Evidence["sample"]; !ok {
		t.Fatalf("annotated evidence lacks the sample claims: %v", sm.Evidence)
	}
	if pk, err := c.teePubKey(); err != nil || !jsonEqual(pk, g.key.JWK) {
		t.Fatalf("token's tee-pubkey %s, want %s (%v)", pk, g.key.JWK, err)
	}
	if !strings.Contains(b.logs.String(), `"insecure":true`) {
		t.Fatalf("log does not mark the sample handshake insecure:\n%s", b.logs)
	}
}

func TestTokenHeaderCarriesBrokerKey(t *testing.T) {
	b := newBroker(t)
	g := b.guest(sample.NewAttester())
	tok := g.handshake()
	hb, _, _, _, err := jwsParts(tok)
	if err != nil {
		t.Fatal(err)
	}
	h, err := parseHeader(hb)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := ecPublicJWK(&b.keys.token.PublicKey)
	if h.Alg != "ES256" || !jsonEqual(h.JWK, want) {
		t.Fatalf("header %+v, want ES256 with jwk %s", h, want)
	}
}

// snpGuest attests with chosen SNP claims.
func snpClaims(measurement, debug string) map[string]string {
	return map[string]string{"measurement": measurement, "policy_debug": debug, "host_data": hexOf('0', 64)}
}

func TestAppraisalDenials(t *testing.T) {
	good := hexOf('a', 96)
	other := hexOf('b', 96)
	bad := "0badc0de" + hexOf('e', 88)
	denyPolicy := "package policy\n\ndefault allow := false\n"
	tests := []struct {
		name     string
		spec     WorkloadSpec
		att      attest.Attester
		path     string // default: the workload's passphrase
		brokerPo string // broker-wide resource policy
		stored   bool   // put in the store directly (the admin API refuses spec)
		status   int
		msg      string
		check    string
	}{
		{
			name:   "unknown workload",
			spec:   WorkloadSpec{ID: "w", Tee: "snp", Passphrase: passphrase, References: map[string][]string{"measurement": {good}}},
			att:    chosenAttester{"snp", snpClaims(good, "false")},
			path:   PassphrasePath("nope"),
			status: http.StatusNotFound, msg: "no workload nope registered", check: "workload",
		},
		{
			name:   "wrong measurement",
			spec:   WorkloadSpec{ID: "w", Tee: "snp", Passphrase: passphrase, References: map[string][]string{"measurement": {good, other}}},
			att:    chosenAttester{"snp", snpClaims(bad, "false")},
			status: http.StatusForbidden, msg: "measurement 0badc0de… not among the 2 registered for workload w", check: "reference",
		},
		{
			name:   "claim missing",
			spec:   WorkloadSpec{ID: "w", Tee: "snp", Passphrase: passphrase, References: map[string][]string{"measurement": {good}, "family_id": {"01"}}},
			att:    chosenAttester{"snp", snpClaims(good, "false")},
			status: http.StatusForbidden, msg: "workload w requires claim family_id, which the snp evidence does not carry", check: "reference",
		},
		{
			name:   "no anchor reference",
			spec:   WorkloadSpec{ID: "w", Tee: "snp", Passphrase: passphrase, References: map[string][]string{"host_data": {hexOf('0', 64)}}},
			att:    chosenAttester{"snp", snpClaims(good, "false")},
			stored: true,
			status: http.StatusForbidden, msg: "workload w registers no measurement reference value", check: "reference",
		},
		{
			name:   "snp debug policy",
			spec:   WorkloadSpec{ID: "w", Tee: "snp", Passphrase: passphrase, References: map[string][]string{"measurement": {good}}},
			att:    chosenAttester{"snp", snpClaims(good, "true")},
			status: http.StatusForbidden, msg: "the SNP guest policy allows debugging", check: "debug",
		},
		{
			name:   "sample evidence for an snp workload",
			spec:   WorkloadSpec{ID: "w", Tee: "snp", Passphrase: passphrase, References: map[string][]string{"measurement": {good}}},
			att:    sample.NewAttester(),
			status: http.StatusForbidden, msg: "workload w expects snp evidence, got sample", check: "tee",
		},
		{
			name:   "tdx evidence for an snp workload",
			spec:   WorkloadSpec{ID: "w", Tee: "snp", Passphrase: passphrase, References: map[string][]string{"measurement": {good}}},
			att:    chosenAttester{"tdx", map[string]string{"mr_td": good}},
			status: http.StatusForbidden, msg: "workload w expects snp evidence, got tdx", check: "tee",
		},
		{
			name:   "workload policy denies",
			spec:   WorkloadSpec{ID: "w", Tee: "snp", Passphrase: passphrase, References: map[string][]string{"measurement": {good}}, Policy: denyPolicy},
			att:    chosenAttester{"snp", snpClaims(good, "false")},
			status: http.StatusForbidden, msg: `policy "workload w" denied resource cwrun/w/passphrase`, check: "policy",
		},
		{
			name: "workload policy reads the claims and path",
			spec: WorkloadSpec{ID: "w", Tee: "snp", Passphrase: passphrase, References: map[string][]string{"measurement": {good}}, Policy: `package policy
import rego.v1
default allow := false
allow if {
	input.submods.cpu0["ear.veraison.annotated-evidence"].snp.host_data == "` + hexOf('1', 64) + `"
	data["resource-path"] == "/cwrun/w/passphrase"
}`},
			att:    chosenAttester{"snp", snpClaims(good, "false")},
			status: http.StatusForbidden, msg: `policy "workload w" denied resource cwrun/w/passphrase`, check: "policy",
		},
		{
			name:     "broker policy denies",
			spec:     WorkloadSpec{ID: "w", Tee: "snp", Passphrase: passphrase, References: map[string][]string{"measurement": {good}}},
			att:      chosenAttester{"snp", snpClaims(good, "false")},
			brokerPo: denyPolicy,
			status:   http.StatusForbidden, msg: `policy "resource" denied resource cwrun/w/passphrase`, check: "policy",
		},
		{
			name:   "generic resource, sample, no policy",
			spec:   WorkloadSpec{ID: "w", Tee: "sample", Passphrase: passphrase},
			att:    sample.NewAttester(),
			path:   "repo/key/one",
			status: http.StatusForbidden, msg: "no resource policy is set and the token's sample evidence is insecure", check: "insecure",
		},
		{
			name:     "generic resource, Trustee's default policy",
			spec:     WorkloadSpec{ID: "w", Tee: "sample", Passphrase: passphrase},
			att:      sample.NewAttester(),
			path:     "repo/key/one",
			brokerPo: "package policy\n\ndefault allow = false\n\nplugin = data.plugin\n\nallow {\n\tplugin == \"resource\"\n\tnot input[\"submods\"][\"cpu0\"][\"ear.veraison.annotated-evidence\"][\"sample\"]\n}\n",
			status:   http.StatusForbidden, msg: `policy "resource" denied resource repo/key/one`, check: "policy",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b := newBroker(t)
			ctx := context.Background()
			if tc.stored {
				b.storeWorkload(tc.spec)
			} else {
				b.addWorkload(tc.spec)
			}
			if err := b.admin.SetResource(ctx, "repo/key/one", []byte("generic secret")); err != nil {
				t.Fatal(err)
			}
			if tc.brokerPo != "" {
				if err := b.admin.SetResourcePolicy(ctx, tc.brokerPo); err != nil {
					t.Fatal(err)
				}
			}
			g := b.guest(tc.att)
			g.handshake()
			path := tc.path
			if path == "" {
				path = PassphrasePath(tc.spec.ID)
			}
			st, out := g.fetch(path)
			wantError(t, st, out, tc.status, tc.msg)
			if strings.Contains(string(out), passphrase) || strings.Contains(string(out), "generic secret") {
				t.Fatal("denial leaks the secret")
			}
			logs := b.logs.String()
			if !strings.Contains(logs, `"check":"`+tc.check+`"`) || !strings.Contains(logs, `"msg":"denied"`) {
				t.Fatalf("no denial log line with check %s:\n%s", tc.check, logs)
			}
		})
	}
}

func TestAppraisalAllows(t *testing.T) {
	good := hexOf('a', 96)
	allowTrusteeStyle := "package policy\n\ndefault allow = false\n\nallow {\n\tdata.plugin == \"resource\"\n\tinput.cwrun.tee == \"snp\"\n}\n"
	tests := []struct {
		name     string
		spec     WorkloadSpec
		att      attest.Attester
		path     string
		brokerPo string
		want     string
	}{
		{
			name: "measurement among several, upper-case hex registered",
			spec: WorkloadSpec{ID: "w", Tee: "snp", Passphrase: passphrase, References: map[string][]string{"measurement": {hexOf('b', 96), strings.ToUpper(good)}}},
			att:  chosenAttester{"snp", snpClaims(good, "false")},
			want: passphrase,
		},
		{
			name: "debug accepted when registered",
			spec: WorkloadSpec{ID: "w", Tee: "snp", Passphrase: passphrase, References: map[string][]string{"measurement": {good}, "policy_debug": {"false", "true"}}},
			att:  chosenAttester{"snp", snpClaims(good, "true")},
			want: passphrase,
		},
		{
			name: "policy instead of references",
			spec: WorkloadSpec{ID: "w", Tee: "snp", Passphrase: passphrase, Policy: "package policy\nimport rego.v1\nallow if input.cwrun.values.measurement == \"" + good + "\"\n"},
			att:  chosenAttester{"snp", snpClaims(good, "false")},
			want: passphrase,
		},
		{
			name:     "workload passes references and a v0-syntax broker policy",
			spec:     WorkloadSpec{ID: "w", Tee: "snp", Passphrase: passphrase, References: map[string][]string{"measurement": {good}}},
			att:      chosenAttester{"snp", snpClaims(good, "false")},
			brokerPo: allowTrusteeStyle,
			want:     passphrase,
		},
		{
			name: "generic resource, secure tee, no policy",
			spec: WorkloadSpec{ID: "w", Tee: "sample", Passphrase: passphrase},
			att:  chosenAttester{"snp", snpClaims(good, "false")},
			path: "repo/key/one",
			want: "generic secret",
		},
		{
			name:     "generic resource, sample, allow-all policy",
			spec:     WorkloadSpec{ID: "w", Tee: "sample", Passphrase: passphrase},
			att:      sample.NewAttester(),
			path:     "repo/key/one",
			brokerPo: "package policy\n\ndefault allow = true\n",
			want:     "generic secret",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b := newBroker(t)
			ctx := context.Background()
			b.addWorkload(tc.spec)
			if err := b.admin.SetResource(ctx, "repo/key/one", []byte("generic secret")); err != nil {
				t.Fatal(err)
			}
			if tc.brokerPo != "" {
				if err := b.admin.SetResourcePolicy(ctx, tc.brokerPo); err != nil {
					t.Fatal(err)
				}
			}
			g := b.guest(tc.att)
			g.handshake()
			path := tc.path
			if path == "" {
				path = PassphrasePath(tc.spec.ID)
			}
			st, out := g.fetch(path)
			if st != http.StatusOK || string(out) != tc.want {
				t.Fatalf("%d %q, want 200 %q", st, out, tc.want)
			}
		})
	}
}

func TestGenericResourceNotFoundAfterAppraisal(t *testing.T) {
	b := newBroker(t)
	g := b.guest(chosenAttester{"snp", snpClaims(hexOf('a', 96), "false")})
	g.handshake()
	st, out := g.fetch("repo/key/absent")
	wantError(t, st, out, http.StatusNotFound, "no resource repo/key/absent")
	// Sample guests are refused before the lookup, so they cannot probe.
	g = b.guest(sample.NewAttester())
	g.handshake()
	st, out = g.fetch("repo/key/absent")
	wantError(t, st, out, http.StatusForbidden, "insecure")
}

func TestHandshakeFailures(t *testing.T) {
	b := newBroker(t)
	b.addWorkload(WorkloadSpec{ID: "web", Tee: attest.TeeSample, Passphrase: passphrase})

	t.Run("replayed nonce", func(t *testing.T) {
		g := b.guest(sample.NewAttester())
		nonce := g.auth()
		body := g.attestBody(nonce, g.key.JWK, g.key.JWK)
		st, out := g.do(http.MethodPost, "/kbs/v0/attest", body)
		if st != http.StatusOK {
			t.Fatalf("first attest: %d %s", st, out)
		}
		st, out = g.do(http.MethodPost, "/kbs/v0/attest", body)
		wantError(t, st, out, http.StatusUnauthorized, "nonce already used")
		wantStartAgain(t, out, true)
	})
	t.Run("replay with the first session's cookie", func(t *testing.T) {
		g := b.guest(sample.NewAttester())
		nonce := g.auth()
		cookies := g.hc.Jar.Cookies(mustURL(t, b.ts.URL+"/kbs/v0/attest"))
		body := g.attestBody(nonce, g.key.JWK, g.key.JWK)
		g.do(http.MethodPost, "/kbs/v0/attest", body)
		// An eavesdropper replays the request exactly, old cookie included.
		st, out := doReq(t, b.ts.Client(), http.MethodPost, b.ts.URL+"/kbs/v0/attest", body,
			"Cookie", cookies[0].Name+"="+cookies[0].Value)
		wantError(t, st, out, http.StatusUnauthorized, "nonce already used")
		wantStartAgain(t, out, true)
	})
	t.Run("expired session", func(t *testing.T) {
		g := b.guest(sample.NewAttester())
		nonce := g.auth()
		b.clock.Advance(DefaultSessionTTL + time.Second)
		defer b.clock.Advance(-DefaultSessionTTL - time.Second)
		st, out := g.do(http.MethodPost, "/kbs/v0/attest", g.attestBody(nonce, g.key.JWK, g.key.JWK))
		wantError(t, st, out, http.StatusUnauthorized, "session expired")
		wantStartAgain(t, out, true)
	})
	t.Run("evidence bound to another TEE key", func(t *testing.T) {
		g := b.guest(sample.NewAttester())
		nonce := g.auth()
		other, err := attest.NewTeeKey()
		if err != nil {
			t.Fatal(err)
		}
		// Evidence made for other's key, sent with ours: a relaying host
		// swapping in its own key would do this.
		st, out := g.do(http.MethodPost, "/kbs/v0/attest", g.attestBody(nonce, other.JWK, g.key.JWK))
		wantError(t, st, out, http.StatusUnauthorized, "sample evidence rejected")
		wantStartAgain(t, out, false) // a denial: a retry would repeat it
	})
	t.Run("nonce of another session", func(t *testing.T) {
		g := b.guest(sample.NewAttester())
		g.auth()
		other := b.guest(sample.NewAttester()).auth()
		st, out := g.do(http.MethodPost, "/kbs/v0/attest", g.attestBody(other, g.key.JWK, g.key.JWK))
		wantError(t, st, out, http.StatusUnauthorized, "runtime-data nonce is not the nonce this session was given")
	})
	t.Run("no cookie", func(t *testing.T) {
		g := b.guest(sample.NewAttester())
		st, out := g.do(http.MethodPost, "/kbs/v0/attest", g.attestBody("x", g.key.JWK, g.key.JWK))
		wantError(t, st, out, http.StatusUnauthorized, "no kbs-session-id cookie")
	})
	t.Run("forged cookie", func(t *testing.T) {
		other := newKeys(t)
		st2 := openStore(t)
		b2 := newBrokerOn(t, st2, other)
		g := b2.guest(sample.NewAttester())
		nonce := g.auth()
		// The cookie from another deployment means nothing here.
		cookies := g.hc.Jar.Cookies(mustURL(t, b2.ts.URL+"/kbs/v0/attest"))
		st, out := doReq(t, b.ts.Client(), http.MethodPost, b.ts.URL+"/kbs/v0/attest", g.attestBody(nonce, g.key.JWK, g.key.JWK),
			"Cookie", cookies[0].Name+"="+cookies[0].Value)
		wantError(t, st, out, http.StatusUnauthorized, "not sealed by this broker's cookie key")
	})
	t.Run("private key sent", func(t *testing.T) {
		g := b.guest(sample.NewAttester())
		nonce := g.auth()
		var m map[string]string
		json.Unmarshal(g.key.JWK, &m)
		m["d"] = "AAAA"
		withD, _ := json.Marshal(m)
		st, out := g.do(http.MethodPost, "/kbs/v0/attest", g.attestBody(nonce, withD, withD))
		wantError(t, st, out, http.StatusBadRequest, "private part")
	})
	t.Run("wrong version", func(t *testing.T) {
		g := b.guest(sample.NewAttester())
		st, out := g.do(http.MethodPost, "/kbs/v0/auth", []byte(`{"version":"0.0.0","tee":"snp","extra-params":""}`))
		wantError(t, st, out, http.StatusBadRequest, `protocol version "0.0.0" not served`)
	})
	t.Run("tee without verifier", func(t *testing.T) {
		g := b.guest(sample.NewAttester())
		st, out := g.do(http.MethodPost, "/kbs/v0/auth", []byte(`{"version":"0.4.0","tee":"sgx","extra-params":""}`))
		wantError(t, st, out, http.StatusBadRequest, `tee "sgx" is not served by this broker; it verifies: sample, snp, tdx`)
	})
	t.Run("resource before attest", func(t *testing.T) {
		g := b.guest(sample.NewAttester())
		g.auth()
		st, out := g.fetch(PassphrasePath("web"))
		wantError(t, st, out, http.StatusUnauthorized, "session has not attested yet")
	})
	t.Run("expired token", func(t *testing.T) {
		g := b.guest(sample.NewAttester())
		tok := g.handshake()
		b.clock.Advance(DefaultTokenTTL + time.Second)
		defer b.clock.Advance(-DefaultTokenTTL - time.Second)
		st, out := g.fetch(PassphrasePath("web"), "Authorization", "Bearer "+tok)
		wantError(t, st, out, http.StatusUnauthorized, "token expired")
	})
	t.Run("tampered token", func(t *testing.T) {
		g := b.guest(sample.NewAttester())
		tok := g.handshake()
		parts := strings.Split(tok, ".")
		payload, _ := base64.RawURLEncoding.DecodeString(parts[1])
		payload = []byte(strings.Replace(string(payload), `"insecure":true`, `"insecure":false`, 1))
		forged := parts[0] + "." + base64.RawURLEncoding.EncodeToString(payload) + "." + parts[2]
		st, out := g.fetch(PassphrasePath("web"), "Authorization", "Bearer "+forged)
		wantError(t, st, out, http.StatusUnauthorized, "token signature does not verify")
	})
	t.Run("token with alg none", func(t *testing.T) {
		g := b.guest(sample.NewAttester())
		tok := g.handshake()
		parts := strings.Split(tok, ".")
		none := base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"none"}`)) + "." + parts[1] + "."
		st, out := g.fetch(PassphrasePath("web"), "Authorization", "Bearer "+none)
		wantError(t, st, out, http.StatusUnauthorized, `token algorithm "none" refused`)
	})
	t.Run("token signed by a key in its own header", func(t *testing.T) {
		// An attacker signs claims with their key and puts that key in
		// the header: the broker must verify with its own key only.
		k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		ts, _ := newTokenSigner(k)
		g := b.guest(sample.NewAttester())
		tok, _ := ts.sign(&tokenClaims{IssuedAt: time.Now().Unix(), Expires: time.Now().Add(time.Minute).Unix(),
			Cwrun: cwrunClaims{Tee: "snp", Values: map[string]string{}}})
		st, out := g.fetch(PassphrasePath("web"), "Authorization", "Bearer "+tok)
		wantError(t, st, out, http.StatusUnauthorized, "token signature does not verify")
	})
}

func TestAdminAuth(t *testing.T) {
	b := newBroker(t)
	url := b.ts.URL + "/kbs/v0/admin/workloads"
	_, otherKey, _ := ed25519.GenerateKey(rand.Reader)
	ecKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	now := time.Now()
	tok := func(key any, ttl time.Duration, at time.Time) string {
		t.Helper()
		var s string
		var err error
		switch k := key.(type) {
		case ed25519.PrivateKey:
			s, err = mintAdminToken(k, ttl, at)
		case *ecdsa.PrivateKey:
			s, err = mintAdminToken(k, ttl, at)
		}
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	handCrafted := func(claims string) string {
		hdr := base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"EdDSA"}`))
		si := hdr + "." + base64.RawURLEncoding.EncodeToString([]byte(claims))
		return si + "." + base64.RawURLEncoding.EncodeToString(ed25519.Sign(b.keys.admin, []byte(si)))
	}
	tests := []struct {
		name   string
		auth   string
		status int
		msg    string
	}{
		{"missing", "", 401, "admin call without Authorization: Bearer"},
		{"not a JWT", "Bearer xyz", 401, "not a compact JWS"},
		{"other key", "Bearer " + tok(otherKey, time.Minute, now), 401, "not signed by any of the broker's admin keys"},
		{"ES256 key not configured", "Bearer " + tok(ecKey, time.Minute, now), 401, "not signed by any of the broker's admin keys"},
		{"expired", "Bearer " + tok(b.keys.admin, time.Minute, now.Add(-10*time.Minute)), 401, "admin token expired"},
		{"from the future", "Bearer " + tok(b.keys.admin, time.Minute, now.Add(10*time.Minute)), 401, "issued in the future"},
		{"too long-lived", "Bearer " + handCrafted(`{"iat":`+itoa(now.Unix())+`,"exp":`+itoa(now.Add(2*time.Hour).Unix())+`}`), 401, "at most 1h0m0s is accepted"},
		{"no exp", "Bearer " + handCrafted(`{"iat":`+itoa(now.Unix())+`}`), 401, "must carry iat and exp"},
		{"nbf later", "Bearer " + handCrafted(`{"iat":`+itoa(now.Unix())+`,"nbf":`+itoa(now.Add(10*time.Minute).Unix())+`,"exp":`+itoa(now.Add(30*time.Minute).Unix())+`}`), 401, "not valid yet"},
		{"HS256", "Bearer " + base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"HS256"}`)) + ".e30.AAAA", 401, `algorithm "HS256" refused`},
		{"good", "Bearer " + tok(b.keys.admin, time.Minute, now), 200, ""},
		{"good with skew", "Bearer " + tok(b.keys.admin, time.Minute, now.Add(30*time.Second)), 200, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var hdr []string
			if tc.auth != "" {
				hdr = []string{"Authorization", tc.auth}
			}
			st, out := doReq(t, b.ts.Client(), http.MethodGet, url, nil, hdr...)
			if tc.status == 200 {
				if st != 200 {
					t.Fatalf("%d %s", st, out)
				}
				return
			}
			wantError(t, st, out, tc.status, tc.msg)
		})
	}

	t.Run("ES256 admin key", func(t *testing.T) {
		b2 := newBroker(t, func(o *Options) { o.AdminKeys = []crypto.PublicKey{ecKey.Public()} })
		c := &AdminClient{BaseURL: b2.ts.URL, HTTP: b2.ts.Client(), Key: ecKey}
		if _, err := c.Workloads(context.Background()); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("admin API off", func(t *testing.T) {
		b2 := newBroker(t, func(o *Options) { o.AdminKeys = nil })
		_, err := b2.admin.Workloads(context.Background())
		var ae *APIError
		if !errors.As(err, &ae) || ae.Status != 403 || !strings.Contains(ae.Message, "admin API is off") {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("MintAdminToken refuses long lifetimes", func(t *testing.T) {
		if _, err := MintAdminToken(b.keys.admin, 2*time.Hour); err == nil {
			t.Fatal("minted a 2h admin token")
		}
	})
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

func TestAdminAPI(t *testing.T) {
	b := newBroker(t)
	ctx := context.Background()
	a := b.admin
	spec := WorkloadSpec{ID: "db-1", Tee: "snp", Passphrase: "p1", References: map[string][]string{"measurement": {hexOf('a', 96)}}, CPUs: 2, MemoryMiB: 512}
	info, err := a.AddWorkload(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	if info.ID != "db-1" || info.Tee != "snp" || info.CPUs != 2 || info.Created.IsZero() {
		t.Fatalf("AddWorkload answered %+v", info)
	}
	if _, err := a.AddWorkload(ctx, spec); !errors.Is(err, ErrExists) {
		t.Fatalf("second AddWorkload: %v, want ErrExists", err)
	}
	got, err := a.Workload(ctx, "db-1")
	if err != nil || got.References["measurement"][0] != hexOf('a', 96) {
		t.Fatalf("Workload: %+v %v", got, err)
	}
	// The passphrase never comes back, and is sealed in the store.
	raw, _ := json.Marshal(got)
	if strings.Contains(string(raw), "p1") || strings.Contains(string(raw), "passphrase") {
		t.Fatalf("workload info shows the passphrase: %s", raw)
	}
	w, err := b.store.Workload(ctx, "db-1")
	if err != nil || strings.Contains(string(w.SealedPassphrase), "p1") || len(w.SealedPassphrase) < 20 {
		t.Fatalf("stored passphrase not sealed: %q %v", w.SealedPassphrase, err)
	}
	// Replace keeps Created and, with no passphrase given, the passphrase.
	b.clock.Advance(30 * time.Second)
	rep, err := a.ReplaceWorkload(ctx, WorkloadSpec{ID: "db-1", Tee: "snp", References: map[string][]string{"measurement": {hexOf('c', 96)}}})
	b.clock.Advance(-30 * time.Second)
	if err != nil || !rep.Created.Equal(info.Created) || rep.References["measurement"][0] != hexOf('c', 96) {
		t.Fatalf("ReplaceWorkload: %+v %v (created before %v)", rep, err, info.Created)
	}
	w2, _ := b.store.Workload(ctx, "db-1")
	if string(w2.SealedPassphrase) != string(w.SealedPassphrase) {
		t.Fatal("replace without passphrase changed the sealed passphrase")
	}
	if _, err := a.ReplaceWorkload(ctx, WorkloadSpec{ID: "absent", Tee: "snp", References: map[string][]string{"measurement": {hexOf('c', 96)}}}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("replace absent: %v", err)
	}
	// A workload no guest could ever be given the key of is refused at
	// once, on add and on replace: no anchor claim and no policy.
	for _, spec := range []WorkloadSpec{
		{ID: "db-2", Tee: "snp", Passphrase: "p", References: map[string][]string{"host_data": {hexOf('0', 64)}}},
		{ID: "db-2", Tee: "tdx", Passphrase: "p"},
		{ID: "db-2", Tee: "tpm", Passphrase: "p", References: map[string][]string{"pcr7": {hexOf('0', 64)}}},
	} {
		_, err := a.AddWorkload(ctx, spec)
		if err == nil || !strings.Contains(err.Error(), "no guest ever gets its key") {
			t.Errorf("add %s workload without its anchor: %v", spec.Tee, err)
		}
	}
	if _, err := a.ReplaceWorkload(ctx, WorkloadSpec{ID: "db-1", Tee: "snp"}); err == nil || !strings.Contains(err.Error(), "reference value for measurement") {
		t.Errorf("replace dropping the measurement: %v", err)
	}
	// A policy of its own stands in for the anchor.
	if _, err := a.AddWorkload(ctx, WorkloadSpec{ID: "db-2", Tee: "snp", Passphrase: "p", Policy: "package policy\n\ndefault allow := false\n"}); err != nil {
		t.Errorf("add snp workload with a policy and no references: %v", err)
	}
	if err := a.DeleteWorkload(ctx, "db-2"); err != nil {
		t.Fatal(err)
	}
	list, err := a.Workloads(ctx)
	if err != nil || len(list) != 1 || list[0].ID != "db-1" {
		t.Fatalf("Workloads: %+v %v", list, err)
	}
	if err := a.DeleteWorkload(ctx, "db-1"); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Workload(ctx, "db-1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("after delete: %v", err)
	}
	if err := a.DeleteWorkload(ctx, "db-1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second delete: %v", err)
	}

	// Resources.
	secret := []byte{0, 1, 2, 0xff, 'k', 'e', 'y'}
	if err := a.SetResource(ctx, "repo/type/tag", secret); err != nil {
		t.Fatal(err)
	}
	if got, err := a.Resource(ctx, "repo/type/tag"); err != nil || string(got) != string(secret) {
		t.Fatalf("Resource: %q %v", got, err)
	}
	if sealed, _ := b.store.Resource(ctx, "repo/type/tag"); strings.Contains(string(sealed), "key") {
		t.Fatal("stored resource not sealed")
	}
	if err := a.DeleteResource(ctx, "repo/type/tag"); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Resource(ctx, "repo/type/tag"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("after delete: %v", err)
	}
	if err := a.SetResource(ctx, "cwrun/db-1/passphrase", []byte("x")); !errors.Is(err, ErrExists) {
		t.Fatalf("setting a passphrase path: %v, want a 409", err)
	}

	// Policy.
	if p, err := a.ResourcePolicy(ctx); err != nil || p != "" {
		t.Fatalf("initial policy %q %v", p, err)
	}
	pol := "package policy\nimport rego.v1\ndefault allow := false\nallow if input.cwrun.tee == \"snp\"\n"
	if err := a.SetResourcePolicy(ctx, pol); err != nil {
		t.Fatal(err)
	}
	if p, err := a.ResourcePolicy(ctx); err != nil || p != pol {
		t.Fatalf("policy %q %v", p, err)
	}
	if err := a.SetResourcePolicy(ctx, ""); err != nil {
		t.Fatal(err)
	}
	if p, _ := a.ResourcePolicy(ctx); p != "" {
		t.Fatalf("cleared policy reads %q", p)
	}
}

func TestAdminValidation(t *testing.T) {
	b := newBroker(t)
	ctx := context.Background()
	tests := []struct {
		name string
		spec WorkloadSpec
		msg  string
	}{
		{"bad id", WorkloadSpec{ID: "../etc", Tee: "snp", Passphrase: "p"}, "workload id"},
		{"id starts with dot", WorkloadSpec{ID: ".x", Tee: "snp", Passphrase: "p"}, "must start with a letter or digit"},
		{"long id", WorkloadSpec{ID: strings.Repeat("a", 129), Tee: "snp", Passphrase: "p"}, "1 to 128 characters"},
		{"unknown tee", WorkloadSpec{ID: "a", Tee: "sev", Passphrase: "p"}, `tee "sev" unknown`},
		{"no passphrase", WorkloadSpec{ID: "a", Tee: "snp"}, "a passphrase is required"},
		{"empty reference", WorkloadSpec{ID: "a", Tee: "snp", Passphrase: "p", References: map[string][]string{"measurement": {}}}, "lists no accepted value"},
		{"bad policy", WorkloadSpec{ID: "a", Tee: "snp", Passphrase: "p", Policy: "package policy\nallow if {"}, "policy does not compile"},
		{"policy without allow", WorkloadSpec{ID: "a", Tee: "snp", Passphrase: "p", Policy: "package policy\nx := 1\n"}, "defines no allow rule"},
		{"policy in another package", WorkloadSpec{ID: "a", Tee: "snp", Passphrase: "p", Policy: "package other\nallow := true\n"}, "must be package policy"},
		{"policy calling http.send", WorkloadSpec{ID: "a", Tee: "snp", Passphrase: "p", Policy: "package policy\nallow if http.send({\"method\":\"get\",\"url\":\"http://x\"}).status_code == 200\n"}, "http.send"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := b.admin.AddWorkload(ctx, tc.spec)
			var ae *APIError
			if !errors.As(err, &ae) || ae.Status != 400 || !strings.Contains(ae.Message, tc.msg) {
				t.Fatalf("got %v, want 400 saying %q", err, tc.msg)
			}
		})
	}
	t.Run("unknown field", func(t *testing.T) {
		tok, _ := MintAdminToken(b.keys.admin, time.Minute)
		st, out := doReq(t, b.ts.Client(), http.MethodPost, b.ts.URL+"/kbs/v0/admin/workloads",
			[]byte(`{"id":"a","tee":"snp","passphrase":"p","measurment":"x"}`), "Authorization", "Bearer "+tok)
		wantError(t, st, out, 400, `unknown field "measurment"`)
	})
	t.Run("bad policy body", func(t *testing.T) {
		tok, _ := MintAdminToken(b.keys.admin, time.Minute)
		st, out := doReq(t, b.ts.Client(), http.MethodPost, b.ts.URL+"/kbs/v0/resource-policy",
			[]byte(`{"policy":"%%%"}`), "Authorization", "Bearer "+tok)
		wantError(t, st, out, 400, "not base64url")
	})
}

// A sealed passphrase copied onto another workload's record must not
// open: the record's id is the seal's additional data.
func TestSealedBlobsCannotBeSwapped(t *testing.T) {
	b := newBroker(t)
	ctx := context.Background()
	b.addWorkload(WorkloadSpec{ID: "a", Tee: "sample", Passphrase: "secret-of-a"})
	b.addWorkload(WorkloadSpec{ID: "b", Tee: "sample", Passphrase: "secret-of-b"})
	wa, _ := b.store.Workload(ctx, "a")
	wb, _ := b.store.Workload(ctx, "b")
	wb.SealedPassphrase = wa.SealedPassphrase
	if err := b.store.UpdateWorkload(ctx, wb); err != nil {
		t.Fatal(err)
	}
	g := b.guest(sample.NewAttester())
	g.handshake()
	st, out := g.fetch(PassphrasePath("b"))
	if st != http.StatusInternalServerError || strings.Contains(string(out), "secret-of") {
		t.Fatalf("swapped blob: %d %s", st, out)
	}
	if !strings.Contains(errMsg(t, out), "store: open sealed record") {
		t.Fatalf("error does not name the failed part: %s", out)
	}
	// a's own still opens.
	if st, pt := g.fetch(PassphrasePath("a")); st != 200 || string(pt) != "secret-of-a" {
		t.Fatalf("a: %d %q", st, pt)
	}
}

// Two brokers with the same keys over one store are one service: any
// step may land on either.
func TestStatelessReplicas(t *testing.T) {
	t.Run("sqlite", func(t *testing.T) { testReplicas(t, openStore(t)) })
	t.Run("postgres", func(t *testing.T) { testReplicas(t, openPostgres(t)) })
}

func testReplicas(t *testing.T, st store.Store) {
	k := newKeys(t)
	b1 := newBrokerOn(t, st, k)
	b2 := newBrokerOn(t, st, k)
	b1.addWorkload(WorkloadSpec{ID: "web", Tee: "sample", Passphrase: passphrase})

	g := b1.guest(sample.NewAttester())
	nonce := g.auth()
	// attest on b2 with b1's cookie.
	g.base = b2.ts.URL
	cookies := g.hc.Jar.Cookies(mustURL(t, b1.ts.URL+"/kbs"))
	if len(cookies) != 1 {
		t.Fatalf("cookies: %v", cookies)
	}
	g.hc.Jar.SetCookies(mustURL(t, b2.ts.URL+"/kbs"), cookies)
	body := g.attestBody(nonce, g.key.JWK, g.key.JWK)
	stc, out := g.do(http.MethodPost, "/kbs/v0/attest", body)
	if stc != 200 {
		t.Fatalf("attest on replica: %d %s", stc, out)
	}
	var ar attest.AttestResponse
	json.Unmarshal(out, &ar)
	// resource on b1 with the token b2 issued.
	g.base = b1.ts.URL
	if s, pt := g.fetch(PassphrasePath("web"), "Authorization", "Bearer "+ar.Token); s != 200 || string(pt) != passphrase {
		t.Fatalf("resource on the first broker: %d %q", s, pt)
	}
	// The same attest body replayed on the first broker is caught: the
	// nonce is spent in the shared store.
	g.hc.Jar.SetCookies(mustURL(t, b1.ts.URL+"/kbs"), cookies)
	stc, out = g.do(http.MethodPost, "/kbs/v0/attest", body)
	wantError(t, stc, out, http.StatusUnauthorized, "nonce already used")

	// A resource policy set through one replica applies there at once,
	// and on the other within policyTTL.
	if err := b2.admin.SetResourcePolicy(context.Background(), "package policy\ndefault allow := false\n"); err != nil {
		t.Fatal(err)
	}
	g.base = b2.ts.URL
	stc, out = g.fetch(PassphrasePath("web"), "Authorization", "Bearer "+ar.Token)
	wantError(t, stc, out, http.StatusForbidden, `policy "resource" denied`)
	if testing.Short() {
		return
	}
	time.Sleep(policyTTL + 100*time.Millisecond)
	g.base = b1.ts.URL
	stc, out = g.fetch(PassphrasePath("web"), "Authorization", "Bearer "+ar.Token)
	wantError(t, stc, out, http.StatusForbidden, `policy "resource" denied`)
}

func TestKrunRegistration(t *testing.T) {
	m := hexOf('d', 96)
	reg := func(id, meas string, bits int) []byte {
		tc, _ := json.Marshal(map[string]any{"flags": map[string]int{"bits": bits}, "minfw": map[string]int{"major": 0, "minor": 0}})
		b, _ := json.Marshal(KrunRegistration{WorkloadID: id, LaunchMeasurement: meas, TeeConfig: string(tc), Passphrase: passphrase})
		return b
	}
	t.Run("off by default", func(t *testing.T) {
		b := newBroker(t)
		st, out := doReq(t, b.ts.Client(), http.MethodPost, b.ts.URL+"/kbs/v0/register_workload", reg("w", m, 0))
		wantError(t, st, out, http.StatusForbidden, "register_workload is off")
	})
	b := newBroker(t, func(o *Options) { o.AllowRegister = true })
	url := b.ts.URL + "/kbs/v0/register_workload"
	// buildah's SNP flags: SMT | MANDATORY | MIGRATE_MA | DEBUG.
	st, out := doReq(t, b.ts.Client(), http.MethodPost, url, reg("krun-1", strings.ToUpper(m), 0b1111))
	if st != 200 {
		t.Fatalf("register: %d %s", st, out)
	}
	w, err := b.admin.Workload(context.Background(), "krun-1")
	if err != nil || w.Tee != "snp" || w.References["measurement"][0] != m || len(w.References) != 1 {
		t.Fatalf("registered %+v %v", w, err)
	}
	st, out = doReq(t, b.ts.Client(), http.MethodPost, url, reg("krun-1", hexOf('e', 96), 0))
	wantError(t, st, out, http.StatusConflict, "workload krun-1 already exists")
	st, out = doReq(t, b.ts.Client(), http.MethodPost, url, reg("krun-2", "", 0))
	wantError(t, st, out, http.StatusBadRequest, "launch_measurement is empty")
	st, out = doReq(t, b.ts.Client(), http.MethodPost, url, reg("krun-2", "abcd", 0))
	wantError(t, st, out, http.StatusBadRequest, "not an SNP launch measurement")

	// buildah's debug flag does not let a debug guest through.
	g := b.guest(chosenAttester{"snp", snpClaims(m, "true")})
	g.handshake()
	st, out = g.do(http.MethodGet, "/kbs/v0/key/krun-1", nil)
	wantError(t, st, out, http.StatusForbidden, "allows debugging")
	g = b.guest(chosenAttester{"snp", snpClaims(m, "false")})
	g.handshake()
	// The registered passphrase comes back from krun's key path.
	st, out = g.do(http.MethodGet, "/kbs/v0/key/krun-1", nil)
	if st != 200 {
		t.Fatalf("key: %d %s", st, out)
	}
	if pt, err := attest.DecryptResource(g.key, out); err != nil || string(pt) != passphrase {
		t.Fatalf("key: %q %v", pt, err)
	}
}

func TestRoutingErrorsAreJSON(t *testing.T) {
	b := newBroker(t)
	tests := []struct {
		method, path string
		status       int
		msg          string
	}{
		{"GET", "/nope", 404, "no such endpoint"},
		{"GET", "/kbs/v0/auth", 405, "auth does not take GET"},
		{"GET", "/kbs/v0/resource/a/b", 404, "no such endpoint"},
		{"GET", "/kbs/v0/resource/a/b/c/d", 404, "no such endpoint"},
		{"GET", "/kbs/v0/resource/a/../c", 400, "must not be . or .."},
		{"GET", "/kbs/v0/resource/a/b%20x/c", 400, "not allowed"},
		{"POST", "/kbs/v0/auth", 400, "not valid JSON"},
		{"GET", "/kbs/v0/key/..", 400, "workload id"},
	}
	for _, tc := range tests {
		st, out := doReq(t, b.ts.Client(), tc.method, b.ts.URL+tc.path, nil)
		wantError(t, st, out, tc.status, tc.msg)
	}
}

func TestHealthAndMetrics(t *testing.T) {
	st := openStore(t)
	b := newBrokerOn(t, st, newKeys(t))
	if s, out := doReq(t, b.ts.Client(), "GET", b.ts.URL+"/healthz", nil); s != 200 {
		t.Fatalf("healthz: %d %s", s, out)
	}
	b.addWorkload(WorkloadSpec{ID: "web", Tee: "snp", Passphrase: passphrase, References: map[string][]string{"measurement": {hexOf('a', 96)}}})
	g := b.guest(chosenAttester{"snp", snpClaims(hexOf('b', 96), "false")})
	g.handshake()
	g.fetch(PassphrasePath("web"))
	_, out := doReq(t, b.ts.Client(), "GET", b.ts.URL+"/metrics", nil)
	for _, want := range []string{
		`cwrun_kbs_handshakes_total{outcome="ok",tee="snp"} 1`,
		`cwrun_kbs_handshakes_total{outcome="challenged",tee="snp"} 1`,
		`cwrun_kbs_denials_total{check="reference"} 1`,
		`cwrun_kbs_request_duration_seconds_count{route="resource"} 1`,
	} {
		if !strings.Contains(string(out), want) {
			t.Errorf("metrics lack %s:\n%s", want, out)
		}
	}
	st.Close()
	s, out := doReq(t, b.ts.Client(), "GET", b.ts.URL+"/healthz", nil)
	wantError(t, s, out, http.StatusServiceUnavailable, "store unreachable")
}

// No log line may carry a passphrase or resource bytes, whatever
// happens: releases, denials, admin calls, failures.
func TestLogsCarryNoSecrets(t *testing.T) {
	b := newBroker(t, func(o *Options) { o.AllowRegister = true })
	ctx := context.Background()
	const (
		pass1 = "PASSPHRASE-one-7f3a9"
		pass2 = "PASSPHRASE-two-c81b2"
		pass3 = "PASSPHRASE-krun-55e1"
		res   = "RESOURCE-bytes-e02d4"
	)
	b.addWorkload(WorkloadSpec{ID: "ok", Tee: "sample", Passphrase: pass1})
	b.addWorkload(WorkloadSpec{ID: "no", Tee: "snp", Passphrase: pass2, References: map[string][]string{"measurement": {hexOf('a', 96)}}})
	if _, err := b.admin.ReplaceWorkload(ctx, WorkloadSpec{ID: "no", Tee: "snp", Passphrase: pass2, References: map[string][]string{"measurement": {hexOf('a', 96)}}}); err != nil {
		t.Fatal(err)
	}
	if err := b.admin.SetResource(ctx, "r/t/x", []byte(res)); err != nil {
		t.Fatal(err)
	}
	if _, err := b.admin.Resource(ctx, "r/t/x"); err != nil {
		t.Fatal(err)
	}
	body, _ := json.Marshal(KrunRegistration{WorkloadID: "k", LaunchMeasurement: hexOf('c', 96), Passphrase: pass3})
	doReq(t, b.ts.Client(), "POST", b.ts.URL+"/kbs/v0/register_workload", body)
	doReq(t, b.ts.Client(), "POST", b.ts.URL+"/kbs/v0/register_workload", body) // 409
	for _, att := range []attest.Attester{sample.NewAttester(), chosenAttester{"snp", snpClaims(hexOf('b', 96), "false")}} {
		g := b.guest(att)
		g.handshake()
		for _, p := range []string{PassphrasePath("ok"), PassphrasePath("no"), PassphrasePath("k"), "r/t/x"} {
			g.fetch(p)
		}
	}
	// A failure to open a sealed record.
	w, _ := b.store.Workload(ctx, "ok")
	w.SealedPassphrase[len(w.SealedPassphrase)-1] ^= 1
	b.store.UpdateWorkload(ctx, w)
	// Written behind the broker's back: it would show within
	// workloadTTL; drop the broker's copy so that it shows now.
	b.srv.forgetWorkloads()
	g := b.guest(sample.NewAttester())
	g.handshake()
	g.fetch(PassphrasePath("ok"))

	logs := b.logs.String()
	if len(logs) < 500 {
		t.Fatalf("suspiciously few logs:\n%s", logs)
	}
	for _, secret := range []string{pass1, pass2, pass3, res} {
		if strings.Contains(logs, secret) {
			t.Fatalf("a log line carries %q:\n%s", secret, logs)
		}
	}
	for _, want := range []string{`"msg":"released"`, `"msg":"denied"`, `"msg":"request failed"`, `"msg":"workload registered"`} {
		if !strings.Contains(logs, want) {
			t.Errorf("logs lack %s", want)
		}
	}
}

func TestNewRefusesBadOptions(t *testing.T) {
	k := newKeys(t)
	st := openStore(t)
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	base := func() Options {
		return Options{Store: st, TokenKey: k.token, CookieKey: k.cookie, AtRestKey: k.atRest}
	}
	tests := []struct {
		name string
		mod  func(*Options)
		msg  string
	}{
		{"no store", func(o *Options) { o.Store = nil }, "Store is required"},
		{"no token key", func(o *Options) { o.TokenKey = nil }, "TokenKey is required"},
		{"P-384 token key", func(o *Options) { o.TokenKey = p384 }, "P-256"},
		{"short cookie key", func(o *Options) { o.CookieKey = k.cookie[:16] }, "CookieKey must be 32 bytes"},
		{"same keys", func(o *Options) { o.AtRestKey = o.CookieKey }, "must differ"},
		{"two sample verifiers", func(o *Options) { o.Verifiers = []attest.Verifier{sample.NewVerifier(), sample.NewVerifier()} }, "two verifiers"},
		{"RSA admin key", func(o *Options) { o.AdminKeys = []crypto.PublicKey{"not a key"} }, "not an Ed25519 or ECDSA P-256"},
	}
	for _, tc := range tests {
		o := base()
		tc.mod(&o)
		if _, err := New(o); err == nil || !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.msg)
		}
	}
	if _, err := New(base()); err != nil {
		t.Fatal(err)
	}
}

// The real guest client against the real broker.
func TestClientEndToEnd(t *testing.T) {
	b := newBroker(t)
	b.addWorkload(WorkloadSpec{ID: "web", Tee: attest.TeeSample, Passphrase: passphrase})
	b.addWorkload(WorkloadSpec{ID: "db", Tee: attest.TeeSNP, Passphrase: "db-pass", References: map[string][]string{"measurement": {hexOf('a', 96)}}})
	ctx := context.Background()

	c := &attest.Client{BaseURL: b.ts.URL, HTTP: b.ts.Client(), Attester: sample.NewAttester()}
	got, err := c.Resource(ctx, PassphrasePath("web"))
	if err != nil || string(got) != passphrase {
		t.Fatalf("sample: %q %v", got, err)
	}
	_, err = c.Resource(ctx, PassphrasePath("db"))
	var be *attest.BrokerError
	if !errors.As(err, &be) || be.Status != 403 || !strings.Contains(be.Reason, "workload db expects snp evidence, got sample") {
		t.Fatalf("sample for snp workload: %v", err)
	}
	c.Attester = chosenAttester{"snp", snpClaims(hexOf('a', 96), "false")}
	if got, err := c.Resource(ctx, PassphrasePath("db")); err != nil || string(got) != "db-pass" {
		t.Fatalf("snp: %q %v", got, err)
	}
	c.Attester = chosenAttester{"snp", snpClaims(hexOf('f', 96), "false")}
	_, err = c.Resource(ctx, PassphrasePath("db"))
	if !errors.As(err, &be) || !strings.Contains(be.Reason, "measurement ffffffff… not among the 1 registered for workload db") {
		t.Fatalf("wrong measurement: %v", err)
	}
	_, err = c.Resource(ctx, PassphrasePath("nope"))
	if !errors.As(err, &be) || be.Status != 404 || !strings.Contains(be.Reason, "no workload nope registered") {
		t.Fatalf("unknown workload: %v", err)
	}
}

// TestSessionFromBeforeRestartRefused: the SQLite broker keeps spent
// nonces in memory, so a session that /auth opened before a restart
// must not be answered after it, even though the cookie still opens
// with the same keys and has not expired; the answer says why. A new
// session on the restarted broker works, and a durable store (Open,
// no epoch) has no such rule.
func TestSessionFromBeforeRestartRefused(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "kbs.db")
	k := newKeys(t)
	st1, err := sqlite.OpenExclusive(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	b1 := newBrokerOn(t, st1, k)
	b1.addWorkload(WorkloadSpec{ID: "web", Tee: attest.TeeSample, Passphrase: passphrase})
	g := b1.guest(sample.NewAttester())
	nonce := g.auth()
	cookies := g.hc.Jar.Cookies(mustURL(t, b1.ts.URL+"/kbs/v0/attest"))
	if len(cookies) != 1 {
		t.Fatalf("cookies: %v", cookies)
	}
	body := g.attestBody(nonce, g.key.JWK, g.key.JWK)
	// The restart: the first broker goes away with its store.
	b1.ts.Close()
	if err := st1.Close(); err != nil {
		t.Fatal(err)
	}
	st2, err := sqlite.OpenExclusive(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st2.Close() })
	b2 := newBrokerOn(t, st2, k)
	st, out := doReq(t, b2.ts.Client(), http.MethodPost, b2.ts.URL+"/kbs/v0/attest", body,
		"Cookie", cookies[0].Name+"="+cookies[0].Value)
	wantError(t, st, out, http.StatusUnauthorized, "session began before this broker restarted")
	wantStartAgain(t, out, true)
	if !strings.Contains(b2.logs.String(), "session began before the broker restarted") {
		t.Errorf("the denial is not logged with its reason:\n%s", b2.logs.String())
	}
	// A guest that starts again is served.
	g2 := b2.guest(sample.NewAttester())
	g2.handshake()
	if st, pt := g2.fetch(PassphrasePath("web")); st != http.StatusOK || string(pt) != passphrase {
		t.Fatalf("fresh session after the restart: %d %q", st, pt)
	}

	// With nonces in the database, a session survives a restart, and
	// its replay is still caught by the table.
	path = filepath.Join(t.TempDir(), "durable.db")
	d1, err := sqlite.Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	b3 := newBrokerOn(t, d1, k)
	b3.addWorkload(WorkloadSpec{ID: "web", Tee: attest.TeeSample, Passphrase: passphrase})
	g3 := b3.guest(sample.NewAttester())
	nonce = g3.auth()
	cookies = g3.hc.Jar.Cookies(mustURL(t, b3.ts.URL+"/kbs/v0/attest"))
	body = g3.attestBody(nonce, g3.key.JWK, g3.key.JWK)
	b3.ts.Close()
	d1.Close()
	d2, err := sqlite.Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d2.Close() })
	b4 := newBrokerOn(t, d2, k)
	for i, want := range []int{http.StatusOK, http.StatusUnauthorized} {
		st, out := doReq(t, b4.ts.Client(), http.MethodPost, b4.ts.URL+"/kbs/v0/attest", body,
			"Cookie", cookies[0].Name+"="+cookies[0].Value)
		if st != want {
			t.Fatalf("durable store, attempt %d: %d %s, want %d", i, st, out, want)
		}
	}
}

// TestWorkloadChangesApply: releases use a copy of the workload read
// within workloadTTL. A change through the broker that serves the
// release applies at once; one through another replica within
// workloadTTL.
func TestWorkloadChangesApply(t *testing.T) {
	st := openStore(t)
	k := newKeys(t)
	b1 := newBrokerOn(t, st, k)
	b2 := newBrokerOn(t, st, k)
	ctx := context.Background()
	spec := WorkloadSpec{ID: "web", Tee: attest.TeeSample, Passphrase: passphrase}
	b1.addWorkload(spec)
	release := func(b *broker) (int, []byte) {
		g := b.guest(sample.NewAttester())
		g.handshake()
		return g.fetch(PassphrasePath("web"))
	}
	if st, pt := release(b1); st != http.StatusOK || string(pt) != passphrase {
		t.Fatalf("first release: %d %q", st, pt)
	}
	// Replaced through b1: b1's next release has the new passphrase.
	spec.Passphrase = "second passphrase"
	if _, err := b1.admin.ReplaceWorkload(ctx, spec); err != nil {
		t.Fatal(err)
	}
	if st, pt := release(b1); st != http.StatusOK || string(pt) != spec.Passphrase {
		t.Fatalf("release right after a local update: %d %q, want the new passphrase", st, pt)
	}
	// Deleted through b2: b1 stops releasing within workloadTTL.
	if err := b2.admin.DeleteWorkload(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	if st, _ := release(b2); st != http.StatusNotFound {
		t.Fatalf("release on the deleting replica: %d, want 404 at once", st)
	}
	time.Sleep(workloadTTL + 100*time.Millisecond)
	st1, out := release(b1)
	wantError(t, st1, out, http.StatusNotFound, "no workload web registered")
	// Registered again through b2: b1 serves it at once (a missing
	// workload is never cached).
	spec.Passphrase = "third passphrase"
	b2.addWorkload(spec)
	if st, pt := release(b1); st != http.StatusOK || string(pt) != spec.Passphrase {
		t.Fatalf("release of a workload registered on a replica: %d %q", st, pt)
	}
}
