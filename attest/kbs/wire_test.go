package kbs

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/cwrun/cwrun/attest"
)

// The hand-written readers must read what encoding/json reads, wherever
// both accept a document. They are stricter in one way only: member
// names match exactly (encoding/json also takes "Nonce" for "nonce").

func FuzzDecodeAttestation(f *testing.F) {
	f.Add([]byte(`{"runtime-data":{"nonce":"n","tee-pubkey":{"kty":"EC"}},"tee-evidence":{"primary_evidence":{"a":[1,2]},"additional_evidence":"x"}}`))
	f.Add([]byte(`{"init-data":{"format":"toml","body":"b"},"runtime-data":null,"tee-evidence":{"primary_evidence":null}}`))
	f.Add([]byte(`{"init-data":null,"extra":[{"x":1}],"runtime-data":{"nonce":null,"nonce":"\u00e9"}}`))
	f.Add([]byte(`{"runtime-data":{"nonce":5}}`))
	f.Add([]byte(`{"runtime-data":{"nonce":"a"}} x`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, b []byte) {
		got, err := decodeAttestation(b)
		var want attest.Attestation
		werr := json.Unmarshal(b, &want)
		if err == nil && werr != nil {
			t.Fatalf("decodeAttestation(%s) accepted what encoding/json refuses: %v", b, werr)
		}
		if err != nil || bytes.Contains(bytes.ToLower(b), []byte(`"runtime-data"`)) && !bytes.Contains(b, []byte(`"runtime-data"`)) {
			return // refused, or names that differ only in case
		}
		// encoding/json keeps a null RawMessage as "null"; both mean absent.
		norm := func(a *attest.Attestation) {
			for _, m := range []*json.RawMessage{&a.RuntimeData.TeePubKey, &a.TeeEvidence.Primary} {
				if string(*m) == "null" || len(*m) == 0 {
					*m = nil
				}
			}
		}
		norm(&got)
		norm(&want)
		// RawMessages: encoding/json copies the bytes as written, so
		// compare them as bytes.
		if !reflect.DeepEqual(got, want) && !caseFolded(b) {
			t.Fatalf("decodeAttestation(%s)\n got %+v\nwant %+v", b, got, want)
		}
	})
}

// caseFolded reports whether b could hold member names that match the
// protocol's only without regard to case, which encoding/json reads and
// the hand-written reader skips.
func caseFolded(b []byte) bool {
	lower := bytes.ToLower(b)
	for _, n := range []string{"init-data", "format", "body", "runtime-data", "nonce", "tee-pubkey", "tee-evidence", "primary_evidence", "additional_evidence"} {
		if bytes.Count(lower, []byte(`"`+n+`"`)) != bytes.Count(b, []byte(`"`+n+`"`)) {
			return true
		}
	}
	return false
}

func TestDecodeAuthRequest(t *testing.T) {
	for _, doc := range []string{
		`{"version":"0.4.0","tee":"snp","extra-params":{"supported-hash-algorithms":["sha384"]}}`,
		`{"version":"0.4.0","tee":"sample","extra-params":""}`,
		`{"tee":null,"other":[1,{"a":"b"}]}`,
	} {
		got, err := decodeAuthRequest([]byte(doc))
		if err != nil {
			t.Fatalf("%s: %v", doc, err)
		}
		var want attest.Request
		if err := json.Unmarshal([]byte(doc), &want); err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s:\n got %+v\nwant %+v", doc, got, want)
		}
	}
	for _, bad := range []string{``, `[]`, `{"version":1}`, `{"tee":"a"} {}`, `{"tee":"a",}`} {
		if _, err := decodeAuthRequest([]byte(bad)); err == nil {
			t.Errorf("decodeAuthRequest(%q) accepted", bad)
		}
	}
}

// TestTokenClaimsJSON: the hand-written token encoding reads back, with
// encoding/json, as the claims it was made from, and the hand-written
// token reader reads what encoding/json reads.
func TestTokenClaimsJSON(t *testing.T) {
	for _, c := range []*tokenClaims{
		{
			Profile: earProfile, IssuedAt: 1700000000, NotBefore: 1700000000, Expires: 1700000300,
			VerifierID: earVerifierID{Developer: "https://github.com/cwrun/cwrun", Build: "cwrun-kbs"},
			Submods: map[string]earSubmodT{earSubmod: {Status: earStatusAffirm, Evidence: map[string]json.RawMessage{
				"snp":          json.RawMessage(`{"measurement":"00ff","odd":"<&>\u2028"}`),
				runtimeDataKey: json.RawMessage(`{"tee-pubkey": {"kty":"EC", "crv":"P-256"}}`),
			}}},
			Cwrun: cwrunClaims{Tee: "snp", Values: map[string]string{"measurement": "00ff", "z": "\x00\"\\é", "a": ""}},
		},
		{Profile: earProfile, Cwrun: cwrunClaims{Tee: "sample", Insecure: true}},
	} {
		got, err := c.appendJSON(nil)
		if err != nil {
			t.Fatal(err)
		}
		if !json.Valid(got) {
			t.Fatalf("invalid JSON: %s", got)
		}
		var back tokenClaims
		if err := json.Unmarshal(got, &back); err != nil {
			t.Fatal(err)
		}
		want, _ := json.Marshal(c)
		var fromStd tokenClaims
		json.Unmarshal(want, &fromStd)
		if !reflect.DeepEqual(normClaims(back), normClaims(fromStd)) {
			t.Errorf("appendJSON reads back as\n%+v\nencoding/json's as\n%+v", back, fromStd)
		}
		view, err := decodeTokenView(got)
		if err != nil {
			t.Fatal(err)
		}
		var stdView tokenView
		if err := json.Unmarshal(got, &stdView); err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(view.Cwrun, stdView.Cwrun) || view.IssuedAt != stdView.IssuedAt || view.Expires != stdView.Expires ||
			!jsonEqualOrEmpty(view.Submods.CPU0.Evidence.RuntimeData.TeePubKey, stdView.Submods.CPU0.Evidence.RuntimeData.TeePubKey) {
			t.Errorf("decodeTokenView = %+v, encoding/json: %+v", view, stdView)
		}
	}
}

// normClaims re-encodes the raw evidence so that formatting and
// escaping do not count, only meaning.
func normClaims(c tokenClaims) tokenClaims {
	for name, sm := range c.Submods {
		for k, v := range sm.Evidence {
			var x any
			json.Unmarshal(v, &x)
			sm.Evidence[k], _ = json.Marshal(x)
		}
		c.Submods[name] = sm
	}
	return c
}

func jsonEqualOrEmpty(a, b []byte) bool {
	if len(a) == 0 || len(b) == 0 {
		return len(a) == len(b)
	}
	return jsonEqual(a, b)
}

// TestSessionCookieHeader: the hand-written Set-Cookie is what
// http.SetCookie writes for the same cookie.
func TestSessionCookieHeader(t *testing.T) {
	exp := time.Date(2026, 3, 4, 5, 6, 7, 0, time.FixedZone("X", 3600))
	for _, v := range []string{"abc-_123", strings.Repeat("A", 5000)} {
		rec := httptest.NewRecorder()
		http.SetCookie(rec, &http.Cookie{Name: CookieName, Value: v, Path: "/kbs", Expires: exp, HttpOnly: true, SameSite: http.SameSiteStrictMode})
		if got, want := sessionCookieHeader(v, exp), rec.Header().Get("Set-Cookie"); got != want {
			t.Errorf("sessionCookieHeader = %q\nhttp.SetCookie writes %q", got, want)
		}
	}
}
