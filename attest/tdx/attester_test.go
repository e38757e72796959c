package tdx

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/cwrun/cwrun/attest/attesttest"
	tdxtest "github.com/google/go-tdx-guest/testing"
)

// signingProvider is a quote provider backed by the fake Intel signer:
// go-tdx-guest's fakes only replay a recorded quote.
type signingProvider struct {
	t testing.TB
	f *fakeIntel
}

func (p signingProvider) IsSupported() error { return nil }

func (p signingProvider) GetRawQuote(rd [64]byte) ([]byte, error) {
	return p.f.quote(p.t, rd[:], nil), nil
}

func TestAttesterSuite(t *testing.T) {
	f := newFakeIntel(t)
	a, err := NewAttester(AttesterOptions{QuoteProvider: signingProvider{t, f}, EventLog: "testdata/CCEL_data_ovmf"})
	if err != nil {
		t.Fatal(err)
	}
	attesttest.AttesterSuite(t, attesttest.AttesterCase{
		Attester: a,
		Verifier: mustVerifier(t, Options{Now: fakeNow, Roots: f.roots()}),
	})
}

func TestVerifierSuite(t *testing.T) {
	f := newFakeIntel(t)
	ccel := readTestdata(t, "CCEL_data_ovmf")
	attesttest.VerifierSuite(t, attesttest.VerifierCase{
		Verifier: mustVerifier(t, Options{Now: fakeNow, Roots: f.roots()}),
		Evidence: func(t *testing.T, rd []byte) json.RawMessage {
			return evidenceJSON(t, f.quote(t, rd, nil), ccel)
		},
		Tamper: func(t *testing.T, ev json.RawMessage) json.RawMessage {
			var doc evidence
			if err := json.Unmarshal(ev, &doc); err != nil {
				t.Fatal(err)
			}
			q, err := base64.StdEncoding.DecodeString(doc.Quote)
			if err != nil {
				t.Fatal(err)
			}
			q[0x30+0x88] ^= 0x01 // MRTD
			doc.Quote = base64.StdEncoding.EncodeToString(q)
			out, _ := json.Marshal(doc)
			return out
		},
	})
}

// TestAttesterWithRecordedQuote drives the attester with go-tdx-guest's
// fake quote provider (a recorded quote for fixed report data).
func TestAttesterWithRecordedQuote(t *testing.T) {
	tcs := tdxtest.TestCases()
	qp, err := tdxtest.TcQuoteProvider(tcs)
	if err != nil {
		t.Fatal(err)
	}
	a, err := NewAttester(AttesterOptions{QuoteProvider: qp, EventLog: filepath.Join(t.TempDir(), "none")})
	if err != nil {
		t.Fatal(err)
	}
	ev, err := a.Evidence(context.Background(), tcs[0].Input[:])
	if err != nil {
		t.Fatal(err)
	}
	var doc map[string]json.RawMessage
	if err := json.Unmarshal(ev, &doc); err != nil {
		t.Fatal(err)
	}
	if string(doc["cc_eventlog"]) != "null" {
		t.Fatalf("cc_eventlog = %s, want null without an event log", doc["cc_eventlog"])
	}
	var quote string
	if err := json.Unmarshal(doc["quote"], &quote); err != nil {
		t.Fatal(err)
	}
	if want := base64.StdEncoding.EncodeToString(tcs[0].Quote); quote != want {
		t.Fatal("the evidence does not carry the device's quote")
	}
	// The recorded quote is a real Intel one: its signatures verify.
	if _, _, err := mustVerifier(t, Options{Now: at("2025-06-01")}).verifyQuote(tcs[0].Quote); err != nil {
		t.Fatalf("go-tdx-guest's recorded quote: %v", err)
	}
	if _, err := a.Evidence(context.Background(), make([]byte, 65)); err == nil {
		t.Fatal("65 bytes of report data were accepted")
	}
}

func TestAttesterWithoutDevice(t *testing.T) {
	for _, p := range []string{"/dev/tdx_guest", "/sys/kernel/config/tsm/report"} {
		if _, err := os.Stat(p); err == nil {
			t.Skipf("%s exists: this may be a confidential guest", p)
		}
	}
	_, err := NewAttester(AttesterOptions{})
	if !errors.Is(err, ErrNoDevice) {
		t.Fatalf("NewAttester() = %v, want %v", err, ErrNoDevice)
	}
}
