package snp

import (
	"encoding/json"
	"testing"

	"github.com/cwrun/cwrun/attest/attesttest"
)

func TestVerifierSuite(t *testing.T) {
	s := newSigner(t, false)
	attesttest.VerifierSuite(t, attesttest.VerifierCase{
		Verifier: mustVerifier(t, Options{Now: fakeNow, Roots: fakeRoots(s)}),
		Evidence: func(t *testing.T, rd []byte) json.RawMessage {
			return evidenceJSON(t, fakeReport(t, s, rd, nil), "VCEK", s.Vcek.Raw)
		},
		Tamper: func(t *testing.T, ev json.RawMessage) json.RawMessage {
			return flipJSON(t, ev, "measurement", 7)
		},
	})
}

// TestVerifierSuiteKeyServer: evidence without a VCEK, which the
// verifier fetches from the (fake) key server.
func TestVerifierSuiteKeyServer(t *testing.T) {
	s := newSigner(t, true)
	kds := mustFakeKDS(t, s)
	attesttest.VerifierSuite(t, attesttest.VerifierCase{
		Verifier: mustVerifier(t, Options{Now: fakeNow, Roots: fakeRoots(s), Getter: kds, CacheDir: t.TempDir()}),
		Evidence: func(t *testing.T, rd []byte) json.RawMessage {
			return evidenceJSON(t, fakeReport(t, s, rd, withChip))
		},
		Tamper: func(t *testing.T, ev json.RawMessage) json.RawMessage {
			return flipJSON(t, ev, "host_data", 0)
		},
	})
}

func TestAttesterSuite(t *testing.T) {
	s := newSigner(t, false)
	a, err := NewAttester(AttesterOptions{QuoteProvider: newFakeDevice(t, s, nil)})
	if err != nil {
		t.Fatal(err)
	}
	attesttest.AttesterSuite(t, attesttest.AttesterCase{
		Attester: a,
		Verifier: mustVerifier(t, Options{Now: fakeNow, Roots: fakeRoots(s)}),
	})
}
