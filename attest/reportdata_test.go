package attest

import (
	"bytes"
	"crypto/sha512"
	"encoding/hex"
	"encoding/json"
	"os"
	"strings"
	"testing"

	"github.com/gowebpki/jcs"
)

// The goldens in testdata/reportdata.json were computed outside Go:
// canonical forms written by hand (or by Python's json.dumps with sorted
// keys and compact separators) and hashed with Python's hashlib.
func TestReportDataGolden(t *testing.T) {
	raw, err := os.ReadFile("testdata/reportdata.json")
	if err != nil {
		t.Fatal(err)
	}
	var cases []struct {
		Name       string          `json:"name"`
		Nonce      string          `json:"nonce"`
		TeePubKey  json.RawMessage `json:"tee-pubkey"`
		Additional string          `json:"additional"`
		Canonical  string          `json:"canonical"`
		SHA384     string          `json:"sha384"`
	}
	if err := json.Unmarshal(raw, &cases); err != nil {
		t.Fatal(err)
	}
	if len(cases) == 0 {
		t.Fatal("no golden cases")
	}
	for _, c := range cases {
		t.Run(c.Name, func(t *testing.T) {
			canon, err := runtimeDataJCS(c.Nonce, c.TeePubKey, c.Additional)
			if err != nil {
				t.Fatal(err)
			}
			if string(canon) != c.Canonical {
				t.Errorf("canonical form\n got %s\nwant %s", canon, c.Canonical)
			}
			rd, err := ReportData(c.Nonce, c.TeePubKey, c.Additional)
			if err != nil {
				t.Fatal(err)
			}
			want, _ := hex.DecodeString(c.SHA384)
			want = append(want, make([]byte, 16)...)
			if !bytes.Equal(rd, want) {
				t.Errorf("ReportData = %x\nwant         %x", rd, want)
			}
		})
	}
}

// TestTrusteeCanonicalVector replays the vector in Trustee's
// attestation-service tests (parse_runtimedata_json_binding): the
// canonicaliser and hash ReportData relies on must agree with Trustee's.
func TestTrusteeCanonicalVector(t *testing.T) {
	canon, err := jcs.Transform([]byte(`{"b": 1, "a": "test", "c": {"d": "e"}}`))
	if err != nil {
		t.Fatal(err)
	}
	sum := sha512.Sum384(canon)
	if got := hex.EncodeToString(sum[:]); got != "e71ce8e70d814ba6639c3612ebee0ff1f76f650f8dbb5e47157e0f3f525cd22c4597480a186427c813ca941da78870c3" {
		t.Errorf("SHA-384(JCS) = %s", got)
	}
}

func TestReportDataBindsEachInput(t *testing.T) {
	k1, err := NewTeeKey()
	if err != nil {
		t.Fatal(err)
	}
	k2, err := NewTeeKey()
	if err != nil {
		t.Fatal(err)
	}
	base, err := ReportData("n1", k1.JWK, "")
	if err != nil {
		t.Fatal(err)
	}
	for name, args := range map[string]struct {
		nonce string
		key   json.RawMessage
		add   string
	}{
		"nonce":      {"n2", k1.JWK, ""},
		"key":        {"n1", k2.JWK, ""},
		"additional": {"n1", k1.JWK, "{}"},
	} {
		rd, err := ReportData(args.nonce, args.key, args.add)
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Equal(rd, base) {
			t.Errorf("changing the %s left the report data unchanged", name)
		}
	}
	if len(base) != ReportDataSize || !bytes.Equal(base[48:], make([]byte, 16)) {
		t.Errorf("report data %x: want 48 bytes of digest and 16 zero bytes", base)
	}
}

func TestReportDataRejects(t *testing.T) {
	for name, jwk := range map[string]string{
		"empty":         ``,
		"null":          `null`,
		"array":         `[]`,
		"string":        `"EC"`,
		"no kty":        `{"crv":"P-256","alg":"a","x":"x","y":"y"}`,
		"unknown kty":   `{"kty":"oct","k":"AAAA"}`,
		"missing y":     `{"kty":"EC","crv":"P-256","alg":"a","x":"x"}`,
		"x not string":  `{"kty":"EC","crv":"P-256","alg":"a","x":1,"y":"y"}`,
		"y null":        `{"kty":"EC","crv":"P-256","alg":"a","x":"x","y":null}`,
		"rsa missing e": `{"kty":"RSA","alg":"RSA-OAEP-256","n":"AQAB"}`,
		"broken":        `{"kty":"EC"`,
		"huge":          `{"kty":"EC","pad":"` + strings.Repeat("a", maxJWKSize) + `"}`,
	} {
		if _, err := ReportData("n", json.RawMessage(jwk), ""); err == nil {
			t.Errorf("ReportData(%s JWK) succeeded", name)
		} else if !strings.Contains(err.Error(), "tee-pubkey") {
			t.Errorf("ReportData(%s JWK) = %v; want the error to name tee-pubkey", name, err)
		}
	}
}
