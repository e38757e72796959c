package attest

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
)

// TestAppendAttestation: the hand-written body reads back as the
// Attestation json.Marshal would have sent, and what is not JSON is
// refused rather than sent.
func TestAppendAttestation(t *testing.T) {
	k, err := NewTeeKey()
	if err != nil {
		t.Fatal(err)
	}
	for _, ev := range []string{`{"svn":"1","report_data":"AAAA"}`, " [1, 2, {\"a\": \"<\\u00e9>\"}] \n", `"x"`} {
		body, err := appendAttestation(nil, "nonce \"é\" <&>", k.JWK, json.RawMessage(ev))
		if err != nil {
			t.Fatal(err)
		}
		got, err := ParseAttestation(body)
		if err != nil {
			t.Fatalf("%s: %v", body, err)
		}
		want := Attestation{RuntimeData: RuntimeData{Nonce: "nonce \"é\" <&>", TeePubKey: k.JWK}, TeeEvidence: TeeEvidence{Primary: json.RawMessage(ev)}}
		std, _ := json.Marshal(want)
		var fromStd Attestation
		if err := json.Unmarshal(std, &fromStd); err != nil {
			t.Fatal(err)
		}
		if !jsonSame(t, got.TeeEvidence.Primary, fromStd.TeeEvidence.Primary) || !jsonSame(t, got.RuntimeData.TeePubKey, fromStd.RuntimeData.TeePubKey) ||
			got.RuntimeData.Nonce != fromStd.RuntimeData.Nonce || got.TeeEvidence.Additional != "" || got.InitData != nil {
			t.Errorf("body %s reads as %+v, want %+v", body, got, fromStd)
		}
	}
	for _, bad := range []string{``, `{`, `{"a":1} x`, `[1,]`} {
		if _, err := appendAttestation(nil, "n", k.JWK, json.RawMessage(bad)); err == nil {
			t.Errorf("evidence %q accepted", bad)
		}
	}
}

func jsonSame(t *testing.T, a, b []byte) bool {
	t.Helper()
	var x, y any
	if json.Unmarshal(a, &x) != nil || json.Unmarshal(b, &y) != nil {
		return false
	}
	return reflect.DeepEqual(x, y)
}

func TestParseAttestResponse(t *testing.T) {
	for _, c := range []struct{ in, want, err string }{
		{`{"token":"a.b.c"}`, "a.b.c", ""},
		{` {"other":[1,{"x":null}],"token":"t"} `, "t", ""},
		{`{"token":null}`, "", ""},
		{`{"token":"x","token":null}`, "", ""},
		{`{"token":5}`, "", "want a string"},
		{`{"token":"t"} x`, "", "data after"},
		{`[]`, "", "want an object"},
	} {
		got, err := parseAttestResponse([]byte(c.in))
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("%s: err %v, want %q", c.in, err, c.err)
			}
			continue
		}
		if err != nil || got.Token != c.want {
			t.Errorf("%s: %q, %v; want %q", c.in, got.Token, err, c.want)
		}
	}
}
