package sample_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/cwrun/cwrun/attest"
	"github.com/cwrun/cwrun/attest/attesttest"
	"github.com/cwrun/cwrun/attest/sample"
)

// fullEvidence is sample evidence carrying all 64 bytes, the shape this
// package's verifier accepts besides Trustee's 48-byte one.
func fullEvidence(t *testing.T, rd []byte) json.RawMessage {
	t.Helper()
	b, err := json.Marshal(sample.Evidence{SVN: "1", ReportData: base64.StdEncoding.EncodeToString(rd)})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestVerifierSuite(t *testing.T) {
	attesttest.VerifierSuite(t, attesttest.VerifierCase{
		Verifier: sample.NewVerifier(),
		Evidence: fullEvidence,
	})
}

func TestVerifierSuiteTrusteeShape(t *testing.T) {
	attesttest.VerifierSuite(t, attesttest.VerifierCase{
		Verifier: sample.NewVerifier(),
		Evidence: func(t *testing.T, rd []byte) json.RawMessage {
			ev, err := sample.NewAttester().Evidence(context.Background(), rd)
			if err != nil {
				t.Fatal(err)
			}
			return ev
		},
	})
}

func TestAttesterSuite(t *testing.T) {
	attesttest.AttesterSuite(t, attesttest.AttesterCase{
		Attester: sample.NewAttester(),
		Verifier: sample.NewVerifier(),
	})
}

// TestTrusteeEvidence checks evidence byte-for-byte as Trustee's sample
// attester makes it: {"svn":"1","report_data":base64(SHA-384 digest)}.
func TestTrusteeEvidence(t *testing.T) {
	rd := attesttest.RandomReportData(t)
	ev, err := sample.NewAttester().Evidence(context.Background(), rd)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"svn":"1","report_data":"` + base64.StdEncoding.EncodeToString(rd[:48]) + `"}`
	if string(ev) != want {
		t.Errorf("evidence = %s\nwant       %s", ev, want)
	}
}

func TestClaims(t *testing.T) {
	rd := attesttest.RandomReportData(t)
	c, err := sample.NewVerifier().Verify(context.Background(), fullEvidence(t, rd), rd)
	if err != nil {
		t.Fatal(err)
	}
	if !c.Insecure || c.Tee != "sample" || c.Values["svn"] != "1" || len(c.Values) != 1 {
		t.Errorf("claims = %+v, want Tee sample, Insecure, Values {svn: 1}", c)
	}
}

func TestVerifyFailures(t *testing.T) {
	rd := attesttest.RandomReportData(t)
	random := bytes.Repeat([]byte{0xa5}, 64) // a tail that is not padding
	b64 := base64.StdEncoding.EncodeToString
	for _, tc := range []struct {
		name     string
		evidence string
		rd       []byte
		want     string
	}{
		{"48 bytes but binding has a tail", `{"svn":"1","report_data":"` + b64(random[:48]) + `"}`, random, "data beyond"},
		{"wrong length", `{"svn":"1","report_data":"` + b64(rd[:32]) + `"}`, rd, "32 bytes"},
		{"not base64", `{"svn":"1","report_data":"***"}`, rd, "not base64"},
		{"url base64", `{"svn":"1","report_data":"` + base64.URLEncoding.EncodeToString(bytes.Repeat([]byte{0xff}, 48)) + `"}`, rd, "not base64"},
		{"unknown member", `{"svn":"1","report_data":"` + b64(rd) + `","debug":true}`, rd, "unknown member"},
		{"svn missing", `{"report_data":"` + b64(rd) + `"}`, rd, "svn missing"},
		{"svn empty", `{"svn":"","report_data":"` + b64(rd) + `"}`, rd, "svn empty"},
		{"report_data missing", `{"svn":"1"}`, rd, "report_data missing"},
		{"svn number", `{"svn":1,"report_data":"` + b64(rd) + `"}`, rd, "svn is not a string"},
		{"case-folded member", `{"SVN":"1","report_data":"` + b64(rd) + `"}`, rd, `unknown member "SVN"`},
		{"report_data null", `{"svn":"1","report_data":null}`, rd, "report_data is not a string"},
		{"trailing }", `{"svn":"1","report_data":"` + b64(rd) + `"}}`, rd, "trailing"},
		{"too large", `{"svn":"` + strings.Repeat("1", 5000) + `","report_data":""}`, rd, "more than"},
		{"mismatch", `{"svn":"1","report_data":"` + b64(random) + `"}`, rd, "does not bind"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := sample.NewVerifier().Verify(context.Background(), json.RawMessage(tc.evidence), tc.rd)
			if !errors.Is(err, attest.ErrEvidence) {
				t.Fatalf("Verify = %v, want ErrEvidence", err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Verify = %v, want it to mention %q", err, tc.want)
			}
		})
	}
}

func TestAttesterShortReportData(t *testing.T) {
	if _, err := sample.NewAttester().Evidence(context.Background(), make([]byte, 47)); err == nil {
		t.Error("Evidence(47 bytes) succeeded; the sample attester carries 48")
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(`{"svn":"1","report_data":"AAAA"}`))
	f.Add([]byte(`{"svn":"1","report_data":"` + base64.StdEncoding.EncodeToString(make([]byte, 48)) + `"}`))
	f.Add([]byte(`null`))
	f.Add([]byte(`{"svn":"1","report_data":"AA=="} `))
	f.Add([]byte(`{"svn":null}`))
	rd := make([]byte, 64)
	f.Fuzz(func(t *testing.T, b []byte) {
		ev, err := sample.Parse(b)
		if err != nil {
			if !errors.Is(err, attest.ErrEvidence) {
				t.Fatalf("Parse error %v does not wrap ErrEvidence", err)
			}
			return
		}
		if ev.SVN == "" {
			t.Fatal("Parse accepted an empty svn")
		}
		// Whatever parses must re-encode to something that parses the same.
		again, err := json.Marshal(ev)
		if err != nil {
			t.Fatal(err)
		}
		ev2, err := sample.Parse(again)
		if err != nil || *ev2 != *ev {
			t.Fatalf("round trip: %v, %+v != %+v", err, ev2, ev)
		}
		if _, err := sample.NewVerifier().Verify(context.Background(), b, rd); err != nil && !errors.Is(err, attest.ErrEvidence) {
			t.Fatalf("Verify error %v does not wrap ErrEvidence", err)
		}
	})
}
