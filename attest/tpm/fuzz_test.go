package tpm

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"testing"
)

func FuzzParseQuote(f *testing.F) {
	ev, err := ParseEvidence(readFixture(f))
	if err != nil {
		f.Fatal(err)
	}
	msg, _ := base64.StdEncoding.DecodeString(ev.Quote.Message)
	f.Add(msg)
	f.Add(defaultSpec(make([]byte, 64), zeroPCRs()).marshal())
	f.Add([]byte{0xff, 0x54, 0x43, 0x47, 0x80, 0x18})
	f.Fuzz(func(t *testing.T, b []byte) {
		q, err := ParseQuote(b)
		if err == nil && q == nil {
			t.Fatal("nil quote and nil error")
		}
	})
}

func FuzzParseSignature(f *testing.F) {
	ev, err := ParseEvidence(readFixture(f))
	if err != nil {
		f.Fatal(err)
	}
	sig, _ := base64.StdEncoding.DecodeString(ev.Quote.Signature)
	f.Add(sig)
	f.Add(newSoftAK(f, algECDSA).sign(f, []byte("m")))
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := ParseSignature(b)
		if err == nil && s == nil {
			t.Fatal("nil signature and nil error")
		}
	})
}

func FuzzParseEventLog(f *testing.F) {
	f.Add(bootLog("k", "i", "c").buf.Bytes())
	f.Add(newLogBuilder(0).buf.Bytes())
	f.Fuzz(func(t *testing.T, b []byte) {
		l, err := ParseEventLog(b)
		if err != nil {
			return
		}
		// Whatever parses must replay, explain and yield claims.
		l.Replay()
		_ = l.CheckReplay(zeroPCRs())
		l.BootClaims()
		Explain(l, l)
	})
}

// FuzzVerify feeds arbitrary evidence to the verifier: it must never
// panic, and must accept nothing but evidence for the report data.
func FuzzVerify(f *testing.F) {
	fixture := readFixture(f)
	rd := fixtureReportData(f, fixture)
	f.Add(fixture)
	lb := bootLog("k", "i", "c")
	f.Add([]byte(softEvidence(f, rd, lb)))
	f.Add([]byte(`{"ak_public":"","tpm_quote":{"signature":"","message":"","pcrs":[]}}`))
	v := mustVerifier(f, Options{})
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := v.Verify(context.Background(), b, rd)
		if err == nil && (c == nil || c.Values["ak"] == "") {
			t.Fatalf("accepted evidence without claims: %+v", c)
		}
	})
}

func softEvidence(f *testing.F, rd []byte, lb *logBuilder) json.RawMessage {
	return newSoftAK(f, algECDSA).evidence(f, defaultSpec(rd, lb.pcrs).marshal(), lb.pcrs, lb.buf.Bytes())
}
