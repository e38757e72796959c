package attest

import (
	"bytes"
	"crypto/sha512"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
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

// refRuntimeDataJCS is how runtimeDataJCS was first written: the JWK
// decoded by encoding/json into a map, the document marshalled and
// handed to a general RFC 8785 canonicaliser. The direct writer must
// agree with it byte for byte.
func refRuntimeDataJCS(nonce string, teePubKey json.RawMessage, additional string) ([]byte, error) {
	if len(teePubKey) > maxJWKSize {
		return nil, errors.New("too big")
	}
	raw := bytes.TrimSpace(teePubKey)
	if len(raw) == 0 || raw[0] != '{' {
		return nil, errors.New("not an object")
	}
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(raw, &obj); err != nil {
		return nil, err
	}
	str := func(name string) (string, error) {
		v, ok := obj[name]
		var s string
		if v = bytes.TrimSpace(v); !ok || len(v) == 0 || v[0] != '"' || json.Unmarshal(v, &s) != nil {
			return "", fmt.Errorf("member %q", name)
		}
		return s, nil
	}
	kty, err := str("kty")
	if err != nil {
		return nil, err
	}
	members, ok := jwkMembers[kty]
	if !ok {
		return nil, errors.New("kty")
	}
	key := map[string]string{"kty": kty}
	for _, m := range members {
		if key[m], err = str(m); err != nil {
			return nil, err
		}
	}
	doc, err := json.Marshal(struct {
		Additional string            `json:"additional-evidence"`
		Nonce      string            `json:"nonce"`
		TeePubKey  map[string]string `json:"tee-pubkey"`
	}{additional, nonce, key})
	if err != nil {
		return nil, err
	}
	return jcs.Transform(doc)
}

func FuzzRuntimeDataJCS(f *testing.F) {
	raw, err := os.ReadFile("testdata/reportdata.json")
	if err != nil {
		f.Fatal(err)
	}
	var cases []struct {
		Nonce      string          `json:"nonce"`
		TeePubKey  json.RawMessage `json:"tee-pubkey"`
		Additional string          `json:"additional"`
	}
	if err := json.Unmarshal(raw, &cases); err != nil {
		f.Fatal(err)
	}
	for _, c := range cases {
		f.Add(c.Nonce, []byte(c.TeePubKey), c.Additional)
	}
	f.Add("n\x00\x7f\u2028<>&\xff\xed\xa0\x80", []byte(`{"kty":"AKP","alg":"a\u00e9\ud83d\ude00\ud800","pub":"\u001f\b\f"}`), "\t\r\n\"\\")
	f.Add("", []byte(`{"kty":"EC","crv":1,"alg":"","x":"","y":""}`), "")
	f.Add("", []byte(`{"kty":"EC","kty":"RSA","alg":"","n":"","e":"","alg":5}`), "")
	f.Add("", []byte(`{"kty":"RSA","alg":5,"alg":"","n":"","e":"", "z":[1,{"a":null}]}`), "")
	f.Add("", []byte(`{"KTY":"RSA","alg":"","n":"","e":""}`), "")
	f.Fuzz(func(t *testing.T, nonce string, jwk []byte, additional string) {
		got, err := runtimeDataJCS(nonce, jwk, additional)
		want, werr := refRuntimeDataJCS(nonce, jwk, additional)
		if (err == nil) != (werr == nil) {
			t.Fatalf("runtimeDataJCS(%q, %s, %q): err %v, reference: %v", nonce, jwk, additional, err, werr)
		}
		if err == nil && !bytes.Equal(got, want) {
			t.Fatalf("runtimeDataJCS(%q, %s, %q)\n got %s\nwant %s", nonce, jwk, additional, got, want)
		}
	})
}
