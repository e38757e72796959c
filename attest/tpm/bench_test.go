package tpm

import (
	"context"
	"testing"

	"github.com/cwrun/cwrun/attest/attesttest"
)

// BenchmarkVerifyTrusteeFixture is the broker's cost per TPM handshake
// (RSA-2048 signature, PCR digest), without an event log.
func BenchmarkVerifyTrusteeFixture(b *testing.B) {
	raw := readFixture(b)
	rd := fixtureReportData(b, raw)
	v := mustVerifier(b, Options{})
	for b.Loop() {
		if _, err := v.Verify(context.Background(), raw, rd); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkVerifyWithEventLog adds parsing and replaying a boot log.
func BenchmarkVerifyWithEventLog(b *testing.B) {
	rd := attesttest.RandomReportData(b)
	lb := bootLog("kernel", "initrd", "console=ttyS0")
	ak := newSoftAK(b, algRSASSA)
	ev := ak.evidence(b, defaultSpec(rd, lb.pcrs).marshal(), lb.pcrs, lb.buf.Bytes())
	v := mustVerifier(b, Options{RequireEventLog: true})
	for b.Loop() {
		if _, err := v.Verify(context.Background(), ev, rd); err != nil {
			b.Fatal(err)
		}
	}
}
