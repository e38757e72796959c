package attest

import (
	"encoding/json"
	"strings"
	"testing"
)

const trusteeAttestation = `{
  "runtime-data": {"nonce": "bm9uY2U=", "tee-pubkey": {"kty":"EC","crv":"P-256","alg":"ECDH-ES+A256KW","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tOAHGg2X_eyzUTzFgxn8pBVXbWnU"}},
  "tee-evidence": {"primary_evidence": {"svn":"1","report_data":"AAAA"}, "additional_evidence": ""}
}`

func TestParseMessages(t *testing.T) {
	req, err := ParseRequest([]byte(`{"version":"0.4.0","tee":"snp","extra-params":{"supported-hash-algorithms":["sha256","sha384","sha512"]}}`))
	if err != nil || req.Version != "0.4.0" || req.Tee != "snp" {
		t.Errorf("ParseRequest = %+v, %v", req, err)
	}
	ch, err := ParseChallenge([]byte(`{"nonce":"bm9uY2U=","extra-params":""}`))
	if err != nil || ch.Nonce != "bm9uY2U=" || string(ch.ExtraParams) != `""` {
		t.Errorf("ParseChallenge = %+v, %v", ch, err)
	}
	att, err := ParseAttestation([]byte(trusteeAttestation))
	if err != nil || att.RuntimeData.Nonce != "bm9uY2U=" || att.InitData != nil {
		t.Fatalf("ParseAttestation = %+v, %v", att, err)
	}
	if _, err := ReportData(att.RuntimeData.Nonce, att.RuntimeData.TeePubKey, att.TeeEvidence.Additional); err != nil {
		t.Errorf("the parsed key does not bind: %v", err)
	}
	withInit := strings.Replace(trusteeAttestation, `{`, `{"init-data":{"format":"toml","body":"version = \"0.1.0\""},`, 1)
	att, err = ParseAttestation([]byte(withInit))
	if err != nil || att.InitData == nil || att.InitData.Format != "toml" {
		t.Errorf("ParseAttestation(with init-data) = %+v, %v", att, err)
	}
}

func TestParseMessagesRejects(t *testing.T) {
	for _, tc := range []struct {
		name, in, want string
		parse          func([]byte) error
	}{
		{"request no version", `{"tee":"snp"}`, "version", parseReq},
		{"request no tee", `{"version":"0.4.0"}`, "tee", parseReq},
		{"request tee number", `{"version":"0.4.0","tee":1}`, "tee", parseReq},
		{"request array", `[]`, "JSON object", parseReq},
		{"request trailing", `{"version":"0.4.0","tee":"x"} {}`, "trailing", parseReq},
		{"request huge", `{"version":"` + strings.Repeat("1", MaxRequestSize) + `"}`, "more than", parseReq},
		{"challenge no nonce", `{"extra-params":""}`, "nonce", parseCh},
		{"challenge long nonce", `{"nonce":"` + strings.Repeat("n", 2000) + `"}`, "nonce", parseCh},
		{"challenge null", `null`, "JSON object", parseCh},
		{"attestation no evidence", strings.Replace(trusteeAttestation, `"primary_evidence": {"svn":"1","report_data":"AAAA"}`, `"primary_evidence": null`, 1), "primary_evidence", parseAtt},
		{"attestation key string", strings.Replace(trusteeAttestation, `"tee-pubkey": {`, `"tee-pubkey": "x", "k": {`, 1), "tee-pubkey", parseAtt},
		{"attestation no nonce", strings.Replace(trusteeAttestation, `"nonce": "bm9uY2U="`, `"nonce": ""`, 1), "nonce", parseAtt},
		{"attestation additional not string", strings.Replace(trusteeAttestation, `"additional_evidence": ""`, `"additional_evidence": {}`, 1), "additional_evidence", parseAtt},
		{"attestation truncated", trusteeAttestation[:100], "attestation", parseAtt},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.parse([]byte(tc.in))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("parse = %v; want an error mentioning %q", err, tc.want)
			}
		})
	}
}

func parseReq(b []byte) error { _, err := ParseRequest(b); return err }
func parseCh(b []byte) error  { _, err := ParseChallenge(b); return err }
func parseAtt(b []byte) error { _, err := ParseAttestation(b); return err }

// roundTrip re-encodes what a parser accepted and parses it again: the
// broker and client re-marshal these messages, so what parses once
// must parse the same the second time.
func roundTrip[T any](t *testing.T, v *T, parse func([]byte) (*T, error)) {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatalf("re-encoding %+v: %v", v, err)
	}
	again, err := parse(b)
	if err != nil {
		t.Fatalf("re-parsing %s: %v", b, err)
	}
	b2, _ := json.Marshal(again)
	if string(b) != string(b2) {
		t.Fatalf("round trip changed the message:\n%s\n%s", b, b2)
	}
}

func FuzzParseRequest(f *testing.F) {
	f.Add([]byte(`{"version":"0.4.0","tee":"sample","extra-params":{"supported-hash-algorithms":["sha384"]}}`))
	f.Add([]byte(`{"version":"0.4.0","tee":"tdx","extra-params":""}`))
	f.Add([]byte(`{"version":1}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := ParseRequest(b)
		if err != nil {
			return
		}
		if r.Version == "" || r.Tee == "" {
			t.Fatalf("accepted %q with empty version or tee", b)
		}
		roundTrip(t, r, ParseRequest)
	})
}

func FuzzParseChallenge(f *testing.F) {
	f.Add([]byte(`{"nonce":"bm9uY2U=","extra-params":""}`))
	f.Add([]byte(`{"nonce":"bm9uY2U=","extra-params":{"selected-hash-algorithm":"sha384"}}`))
	f.Add([]byte(`{"nonce":""}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := ParseChallenge(b)
		if err != nil {
			return
		}
		if c.Nonce == "" || len(c.Nonce) > maxNonceLen {
			t.Fatalf("accepted nonce %q", c.Nonce)
		}
		_ = checkSelectedHash(c.ExtraParams) // must not panic
		roundTrip(t, c, ParseChallenge)
	})
}

func FuzzParseAttestation(f *testing.F) {
	f.Add([]byte(trusteeAttestation))
	f.Add([]byte(`{"runtime-data":{"nonce":"n","tee-pubkey":{}},"tee-evidence":{"primary_evidence":1}}`))
	f.Add([]byte(`{"init-data":{"format":"toml","body":""},"runtime-data":null}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		a, err := ParseAttestation(b)
		if err != nil {
			return
		}
		if a.RuntimeData.Nonce == "" || len(a.TeeEvidence.Primary) == 0 {
			t.Fatalf("accepted %q without nonce or evidence", b)
		}
		// The broker's next step on the key must not panic either.
		_, _ = ReportData(a.RuntimeData.Nonce, a.RuntimeData.TeePubKey, a.TeeEvidence.Additional)
		_, _ = ParseTeePubKey(a.RuntimeData.TeePubKey)
		roundTrip(t, a, ParseAttestation)
	})
}

func FuzzParseTeePubKey(f *testing.F) {
	f.Add([]byte(`{"kty":"EC","crv":"P-256","alg":"ECDH-ES+A256KW","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tOAHGg2X_eyzUTzFgxn8pBVXbWnU"}`))
	f.Add([]byte(`{"kty":"RSA","alg":"RSA-OAEP-256","n":"sXch","e":"AQAB"}`))
	f.Add([]byte(`{"kty":"AKP","alg":"x","pub":"AA"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		pub, err := ParseTeePubKey(b)
		if err != nil {
			return
		}
		if _, err := ReportData("n", b, ""); err != nil {
			t.Fatalf("a key ParseTeePubKey accepts does not bind: %v", err)
		}
		_ = pub
	})
}
