package kbs

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/cwrun/cwrun/attest"
	"github.com/cwrun/cwrun/attest/sample"
)

// BenchmarkHandshakePieces times the broker's per-handshake steps one
// by one, without HTTP, to show where a handshake's CPU goes.
func BenchmarkHandshakePieces(b *testing.B) {
	br := newBroker(b, benchOpts)
	br.addWorkload(WorkloadSpec{ID: "bench", Tee: attest.TeeSample, Passphrase: passphrase})
	s := br.srv
	ctx := context.Background()
	key, _ := attest.NewTeeKey()
	nonce := "bm9uY2Ugbm9uY2Ugbm9uY2Ugbm9uY2Ugbm9uY2Ugbm9u"
	rd, _ := attest.ReportData(nonce, key.JWK, "")
	ev, _ := sample.NewAttester().Evidence(ctx, rd)
	body, _ := json.Marshal(attest.Attestation{
		RuntimeData: attest.RuntimeData{Nonce: nonce, TeePubKey: key.JWK},
		TeeEvidence: attest.TeeEvidence{Primary: ev},
	})
	claims, _ := sample.NewVerifier().Verify(ctx, ev, rd)
	tok, _, _ := s.mintToken(claims, key.JWK)
	ss := session{Tee: "sample", Nonce: nonce, Expires: time.Now().Add(time.Minute), Token: tok}
	sealed, _ := s.sealSession(ss)

	run := func(name string, f func() error) {
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if err := f(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	run("decodeAttestation", func() error { _, err := decodeAttestation(body); return err })
	run("checkTeePubKey", func() error { return checkTeePubKey(key.JWK) })
	run("ReportData", func() error { _, err := attest.ReportData(nonce, key.JWK, ""); return err })
	run("sampleVerify", func() error { _, err := sample.NewVerifier().Verify(ctx, ev, rd); return err })
	run("mintToken", func() error { _, _, err := s.mintToken(claims, key.JWK); return err })
	run("sealSession", func() error { _, err := s.sealSession(ss); return err })
	run("openSession", func() error { _, err := s.openSession(sealed); return err })
	run("tokenCheck", func() error { _, _, err := s.token.check(tok, time.Now(), false); return err })
	run("storeWorkload", func() error { _, err := s.store.Workload(ctx, "bench"); return err })
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	run("storeWorkloadCancellable", func() error { _, err := s.store.Workload(cctx, "bench"); return err })
	run("EncryptResource", func() error { _, err := attest.EncryptResource(key.JWK, []byte(passphrase)); return err })
	b.Logf("token %d bytes, cookie %d bytes", len(tok), len(sealed))
}
