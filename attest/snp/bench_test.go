package snp

import (
	"context"
	"testing"
)

// BenchmarkVerifySteps is the broker's cost of one SNP handshake's evidence
// (certificate chain cached, as after the first handshake of a chip):
// parse, rebuild the report, check its P-384 signature and binding.
// BenchmarkVerifySteps/parse is the JSON part alone.
func BenchmarkVerifySteps(b *testing.B) {
	s := newSigner(b, false)
	rd := reportData(3)
	ev := evidenceJSON(b, fakeReport(b, s, rd, nil), "VCEK", s.Vcek.Raw, "ASK", s.Ask.Raw, "ARK", s.Ark.Raw)
	v := mustVerifier(b, Options{Now: fakeNow, Roots: fakeRoots(s)})
	ctx := context.Background()
	if _, err := v.Verify(ctx, ev, rd); err != nil {
		b.Fatal(err)
	}
	b.Run("verify", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := v.Verify(ctx, ev, rd); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("parse", func(b *testing.B) {
		b.ReportAllocs()
		b.SetBytes(int64(len(ev)))
		for b.Loop() {
			if _, _, err := parseEvidence(ev); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("parse-encoding-json", func(b *testing.B) {
		b.ReportAllocs()
		b.SetBytes(int64(len(ev)))
		for b.Loop() {
			if _, err := refParseEvidence(ev); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Logf("evidence of %d bytes", len(ev))
}
