package tdx

import (
	"context"
	"encoding/hex"
	"testing"
)

// FuzzVerify feeds untrusted evidence to the parser and the quote
// checks: nothing may panic, and what passes binds the report data.
func FuzzVerify(f *testing.F) {
	fi := newFakeIntel(f)
	rd := reportData(3)
	f.Add([]byte(evidenceJSON(f, fi.quote(f, rd, nil), nil)))
	f.Add([]byte(evidenceJSON(f, fi.quote(f, rd, nil), readTestdata(f, "CCEL_data_ovmf")[:1024])))
	f.Add([]byte(evidenceJSON(f, readTestdata(f, "tdx_quote_4.dat"), nil)))
	f.Add([]byte(evidenceJSON(f, readTestdata(f, "tdx_quote_5.dat"), nil)))
	f.Add([]byte(`{"cc_eventlog":null,"quote":"BAACAIEAAAA="}`))
	v := mustVerifier(f, Options{Now: fakeNow, Roots: fi.roots()})
	f.Fuzz(func(t *testing.T, data []byte) {
		claims, err := v.Verify(context.Background(), data, rd)
		if err == nil && claims.Values["report_data"] != hex.EncodeToString(rd) {
			t.Fatalf("verified evidence claims report data %s", claims.Values["report_data"])
		}
	})
}

// FuzzEventLog: the event log parser never panics, and in a log it
// accepts exactly the RTMRs some event extended are non-zero.
func FuzzEventLog(f *testing.F) {
	ccel := readTestdata(f, "CCEL_data_ovmf")
	f.Add(ccel[:2048])
	f.Add(ccel[:0x21+32])
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		a, err := replayEventLog(data)
		if err != nil {
			return
		}
		for i := range a.RTMR {
			if zero := a.RTMR[i] == [rtmrSize]byte{}; zero == a.Extended[i] {
				t.Fatalf("RTMR%d extended=%v but value %x", i, a.Extended[i], a.RTMR[i])
			}
		}
	})
}
