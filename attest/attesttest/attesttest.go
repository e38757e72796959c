// Package attesttest holds the conformance suites every TEE package
// runs: VerifierSuite for a broker-side Verifier and AttesterSuite for a
// guest-side Attester paired with its Verifier. The suites check the
// contract of attest.Verifier (every failure wraps attest.ErrEvidence,
// no input panics, the report data binding is enforced) so that the
// broker can treat all TEEs alike. It is a test helper: production code
// must never import it.
package attesttest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"testing"

	"github.com/cwrun/cwrun/attest"
)

// reportDataLen is the size of the binding every attester is handed
// (attest.ReportData's output).
const reportDataLen = 64

// VerifierCase describes one Verifier under test.
type VerifierCase struct {
	Verifier attest.Verifier
	// Evidence makes valid evidence binding reportData (64 bytes).
	Evidence func(t *testing.T, reportData []byte) json.RawMessage
	// Tamper returns a copy of evidence with one signed byte changed
	// (nil: skip, e.g. sample has no signature).
	Tamper func(t *testing.T, evidence json.RawMessage) json.RawMessage
}

// AttesterCase pairs an Attester with the Verifier that must accept its
// evidence.
type AttesterCase struct {
	Attester attest.Attester
	Verifier attest.Verifier
}

// RandomReportData returns the binding of a fresh handshake: ReportData
// over a random nonce and a new TEE key, as production report data
// looks (a SHA-384 digest, zero-padded to 64 bytes). Attesters whose TEE
// carries only a prefix (sample: 48 bytes, tpm: 32) can be checked with
// it as with real report data.
func RandomReportData(t testing.TB) []byte {
	t.Helper()
	nonce := make([]byte, 32)
	if _, err := rand.Read(nonce); err != nil {
		t.Fatalf("reading a random nonce: %v", err)
	}
	key, err := attest.NewTeeKey()
	if err != nil {
		t.Fatalf("NewTeeKey: %v", err)
	}
	rd, err := attest.ReportData(base64.StdEncoding.EncodeToString(nonce), key.JWK, "")
	if err != nil {
		t.Fatalf("ReportData: %v", err)
	}
	if len(rd) != reportDataLen {
		t.Fatalf("ReportData returned %d bytes, want %d", len(rd), reportDataLen)
	}
	return rd
}

// VerifierSuite runs the Verifier contract against c.
func VerifierSuite(t *testing.T, c VerifierCase) {
	t.Helper()
	if c.Verifier == nil || c.Evidence == nil {
		t.Fatal("VerifierCase needs Verifier and Evidence")
	}
	ctx := context.Background()

	t.Run("Valid", func(t *testing.T) {
		rd := RandomReportData(t)
		ev := c.Evidence(t, rd)
		claims, err := c.Verifier.Verify(ctx, ev, rd)
		if err != nil {
			t.Fatalf("Verify(valid evidence) = %v, want nil", err)
		}
		if claims == nil {
			t.Fatal("Verify(valid evidence) returned nil claims and no error")
		}
		if claims.Tee != c.Verifier.Tee() {
			t.Errorf("Claims.Tee = %q, want Verifier.Tee() = %q", claims.Tee, c.Verifier.Tee())
		}
		if claims.Values == nil {
			t.Error("Claims.Values is nil; a verifier reports at least an empty map")
		}
	})

	t.Run("OtherReportData", func(t *testing.T) {
		// Bytes 0 and 31 lie in the prefix every TEE carries (tpm keeps
		// only 32 bytes), so every verifier must notice them changed.
		rd := RandomReportData(t)
		ev := c.Evidence(t, rd)
		other := bytes.Clone(rd)
		other[0] ^= 0x01
		expectRejected(t, c.Verifier, ev, other, "evidence for other report data (first byte flipped)")
		other = bytes.Clone(rd)
		other[31] ^= 0x80
		expectRejected(t, c.Verifier, ev, other, "evidence for other report data (byte 31 flipped)")
		expectRejected(t, c.Verifier, ev, RandomReportData(t), "evidence for unrelated report data")
	})

	t.Run("WrongReportDataLength", func(t *testing.T) {
		rd := RandomReportData(t)
		ev := c.Evidence(t, rd)
		expectRejected(t, c.Verifier, ev, nil, "nil expected report data")
		expectRejected(t, c.Verifier, ev, rd[:16], "16-byte expected report data")
	})

	t.Run("Tampered", func(t *testing.T) {
		if c.Tamper == nil {
			t.Skip("no Tamper: this TEE's evidence carries no signature")
		}
		rd := RandomReportData(t)
		ev := c.Evidence(t, rd)
		orig := bytes.Clone(ev)
		bad := c.Tamper(t, ev)
		if bytes.Equal(bad, orig) {
			t.Fatal("Tamper returned the evidence unchanged")
		}
		expectRejected(t, c.Verifier, bad, rd, "tampered evidence")
	})

	t.Run("Malformed", func(t *testing.T) {
		rd := RandomReportData(t)
		valid := c.Evidence(t, rd)
		cases := map[string]json.RawMessage{
			"empty":          {},
			"null":           json.RawMessage(`null`),
			"empty object":   json.RawMessage(`{}`),
			"empty array":    json.RawMessage(`[]`),
			"string":         json.RawMessage(`"evidence"`),
			"number":         json.RawMessage(`42`),
			"true":           json.RawMessage(`true`),
			"not JSON":       json.RawMessage(`evidence`),
			"half object":    json.RawMessage(`{"`),
			"trailing bytes": append(bytes.Clone(valid), []byte(`{}`)...),
		}
		for i := 1; i < len(valid); i += max(1, len(valid)/7) {
			cases[fmt.Sprintf("truncated to %d bytes", i)] = bytes.Clone(valid[:i])
		}
		for name, wrong := range wrongTypes(t, valid) {
			cases[name] = wrong
		}
		for name, ev := range cases {
			t.Run(name, func(t *testing.T) {
				expectRejected(t, c.Verifier, ev, rd, name)
			})
		}
	})
}

// AttesterSuite checks that c.Attester's evidence verifies with
// c.Verifier and carries the report data it was given.
func AttesterSuite(t *testing.T, c AttesterCase) {
	t.Helper()
	if c.Attester == nil || c.Verifier == nil {
		t.Fatal("AttesterCase needs Attester and Verifier")
	}
	ctx := context.Background()

	t.Run("SameTee", func(t *testing.T) {
		if c.Attester.Tee() != c.Verifier.Tee() {
			t.Errorf("Attester.Tee() = %q, Verifier.Tee() = %q", c.Attester.Tee(), c.Verifier.Tee())
		}
	})

	t.Run("Verifies", func(t *testing.T) {
		for i := 0; i < 3; i++ {
			rd := RandomReportData(t)
			ev, err := c.Attester.Evidence(ctx, rd)
			if err != nil {
				t.Fatalf("Evidence: %v", err)
			}
			claims, err := c.Verifier.Verify(ctx, ev, rd)
			if err != nil {
				t.Fatalf("Verify(attester's evidence) = %v, want nil", err)
			}
			if claims == nil || claims.Tee != c.Attester.Tee() {
				t.Fatalf("claims = %+v, want Tee %q", claims, c.Attester.Tee())
			}
			other := bytes.Clone(rd)
			other[0] ^= 0xff
			expectRejected(t, c.Verifier, ev, other, "attester's evidence checked against other report data")
		}
	})

	t.Run("DiffersByReportData", func(t *testing.T) {
		a, b := RandomReportData(t), RandomReportData(t)
		ea, err := c.Attester.Evidence(ctx, a)
		if err != nil {
			t.Fatalf("Evidence: %v", err)
		}
		eb, err := c.Attester.Evidence(ctx, b)
		if err != nil {
			t.Fatalf("Evidence: %v", err)
		}
		if bytes.Equal(ea, eb) {
			t.Error("evidence for two different report data is identical")
		}
	})

	t.Run("DoesNotKeepReportData", func(t *testing.T) {
		// The attester must not alias the caller's buffer: evidence made
		// before the caller reuses it must still verify.
		rd := RandomReportData(t)
		want := bytes.Clone(rd)
		ev, err := c.Attester.Evidence(ctx, rd)
		if err != nil {
			t.Fatalf("Evidence: %v", err)
		}
		for i := range rd {
			rd[i] = 0
		}
		if _, err := c.Verifier.Verify(ctx, ev, want); err != nil {
			t.Errorf("Verify after the caller cleared its report data buffer: %v", err)
		}
	})
}

// expectRejected asserts Verify fails with an error wrapping
// attest.ErrEvidence and does not panic.
func expectRejected(t *testing.T, v attest.Verifier, ev json.RawMessage, rd []byte, what string) {
	t.Helper()
	var (
		claims *attest.Claims
		err    error
	)
	func() {
		defer func() {
			if r := recover(); r != nil {
				t.Fatalf("Verify(%s) panicked: %v", what, r)
			}
		}()
		claims, err = v.Verify(context.Background(), ev, rd)
	}()
	if err == nil {
		t.Fatalf("Verify(%s) = %+v, nil; want an error wrapping attest.ErrEvidence", what, claims)
	}
	if !errors.Is(err, attest.ErrEvidence) {
		t.Fatalf("Verify(%s) = %v; want it to wrap attest.ErrEvidence", what, err)
	}
	if err.Error() == attest.ErrEvidence.Error() {
		t.Errorf("Verify(%s) error %q does not say which check failed", what, err)
	}
}

// wrongTypes derives variants of a valid JSON object whose top-level
// fields carry values of the wrong JSON type, one field at a time. A
// verifier that parses strictly rejects each.
func wrongTypes(t *testing.T, valid json.RawMessage) map[string]json.RawMessage {
	t.Helper()
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(valid, &obj); err != nil {
		return nil // not an object: nothing to retype
	}
	out := map[string]json.RawMessage{}
	for field, val := range obj {
		for _, repl := range replacementsFor(val) {
			mod := make(map[string]json.RawMessage, len(obj))
			for k, v := range obj {
				mod[k] = v
			}
			mod[field] = json.RawMessage(repl)
			b, err := json.Marshal(mod)
			if err != nil {
				t.Fatalf("re-encoding evidence: %v", err)
			}
			out[fmt.Sprintf("field %q set to %s", field, repl)] = b
		}
	}
	// Missing fields are not tried one by one: Trustee's shapes have
	// optional ones (snp cert_chain, tdx cc_eventlog); "{}" covers the
	// all-missing case.
	return out
}

// replacementsFor returns JSON values of types other than val's.
// null is left out: several Trustee shapes allow null (snp cert_chain,
// tdx cc_eventlog), so a verifier may legitimately accept it.
func replacementsFor(val json.RawMessage) []string {
	v := bytes.TrimSpace(val)
	if len(v) == 0 {
		return nil
	}
	switch v[0] {
	case '{':
		return []string{`"x"`, `7`, `[]`}
	case '[':
		return []string{`"x"`, `7`, `{}`}
	case '"':
		return []string{`7`, `{}`, `[]`}
	case 't', 'f':
		return []string{`"x"`, `{}`}
	case 'n':
		return []string{`7`}
	default:
		return []string{`"x"`, `{}`, `[]`}
	}
}
