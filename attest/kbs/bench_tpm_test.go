package kbs

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"strings"
	"syscall"
	"testing"

	"github.com/cwrun/cwrun/attest"
	"github.com/cwrun/cwrun/attest/tpm"
	"github.com/cwrun/cwrun/attest/tpm/tpmtest"
)

// tpmGuests is how many software TPMs BenchmarkHandshakeTPM runs: each
// guest needs its own (the credential activation of a handshake lives
// in its TPM between /auth and /attest), and each swtpm is a process
// doing RSA-2048 work of its own on the same cores.
const tpmGuests = 16

// BenchmarkHandshakeTPM: full handshakes with tpm evidence as a cwrun
// vTPM guest makes it (EK certificate, credential activation with a
// fresh AK, quote of PCRs 0-23) against a broker trusting the EK CA.
// The TPM side runs in swtpm processes, outside this process's CPU
// figure, which is the broker and the guests' Go side.
func BenchmarkHandshakeTPM(b *testing.B) {
	defer serveGC()()
	ca := tpmtest.NewCA(b)
	v, err := tpm.NewVerifier(tpm.Options{EKCAs: []*x509.Certificate{ca.Cert}, CredentialKey: []byte(strings.Repeat("k", 32))})
	if err != nil {
		b.Fatal(err)
	}
	br := newBroker(b, benchOpts, func(o *Options) { o.Verifiers = append(o.Verifiers, v) })
	sum := sha256.Sum256(ca.Cert.Raw)
	br.addWorkload(WorkloadSpec{ID: "bench", Tee: attest.TeeTPM, Passphrase: passphrase,
		References: map[string][]string{"ek_ca": {hex.EncodeToString(sum[:])}}})
	atts := make([]attest.Attester, tpmGuests)
	for i := range atts {
		if atts[i], err = tpm.NewAttester(tpm.AttesterOptions{Conn: tpmtest.StartSwtpm(b, ca), EventLog: "-"}); err != nil {
			b.Fatal(err)
		}
	}
	cpu0 := cpuTime(syscall.RUSAGE_SELF)
	res, err := loadgen(context.Background(), br.ts.URL, tpmGuests, b.N, 0, func(i int) attest.Attester { return atts[i] }, b.ResetTimer)
	if err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	res.report(b)
	b.ReportMetric(perHandshake(cpuTime(syscall.RUSAGE_SELF)-cpu0, res.Handshakes+res.Warmup), "cpu_us/handshake")
}
