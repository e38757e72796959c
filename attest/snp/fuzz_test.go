package snp

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"testing"
)

// FuzzParseEvidence feeds untrusted evidence to the JSON parser: it must
// never panic, and whatever it accepts must map to a report that maps
// back to the same bytes. The seeds are whole reports (3-7 KB of JSON),
// which Go's fuzzer is slow to minimize: run it with
// -fuzzminimizetime=5s.
func FuzzParseEvidence(f *testing.F) {
	f.Add(readFile(f, "snp-evidence.json"))
	s := newSigner(f, false)
	f.Add([]byte(evidenceJSON(f, fakeReport(f, s, reportData(1), nil), "VCEK", s.Vcek.Raw)))
	f.Add([]byte(`{"attestation_report":{"version":2},"cert_chain":null}`))
	f.Add([]byte(`{"attestation_report":null,"cert_chain":[{"cert_type":{"OTHER":"x"},"data":[1,2]}]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		ev, raw, err := parseEvidence(data)
		if err != nil {
			return
		}
		if len(raw) != 1184 {
			t.Fatalf("binary report of %d bytes", len(raw))
		}
		again, err := json.Marshal(ev)
		if err != nil {
			t.Fatalf("accepted evidence does not marshal: %v", err)
		}
		_, raw2, err := parseEvidence(again)
		if err != nil {
			t.Fatalf("re-marshalled evidence does not parse: %v\n%s", err, again)
		}
		if !bytes.Equal(raw, raw2) {
			t.Fatal("re-marshalled evidence gives another report")
		}
	})
}

// FuzzByteArray checks the hand-written integer array reader against
// encoding/json's reading of the same text.
func FuzzByteArray(f *testing.F) {
	for _, s := range []string{"[]", "[0,1,255]", " [ 1 , 2 ] ", "[256]", "[01]", "[-1]", "[1,]", "[1.0]", "null", "[1e2]"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var got byteArray
		errGot := got.UnmarshalJSON(data)
		var ints []int64
		errRef := json.Unmarshal(data, &ints)
		// encoding/json also takes -0, which serde never writes.
		refOK := errRef == nil && ints != nil && !bytes.Contains(data, []byte("-"))
		for _, v := range ints {
			if v < 0 || v > 255 {
				refOK = false
			}
		}
		if refOK != (errGot == nil) {
			t.Fatalf("%q: reader error %v, encoding/json error %v (%v)", data, errGot, errRef, ints)
		}
		if refOK {
			for i, v := range ints {
				if int64(got[i]) != v {
					t.Fatalf("%q: byte %d is %d, want %d", data, i, got[i], v)
				}
			}
		}
	})
}

// FuzzReportBinary drives the binary → JSON → binary mapping with
// arbitrary reports: a report either maps back to itself or is refused.
func FuzzReportBinary(f *testing.F) {
	s := newSigner(f, false)
	f.Add(fakeReport(f, s, reportData(1), nil))
	f.Add(readFile(f, "test-report.bin"))
	f.Add(readFile(f, "test-vlek-report.bin"))
	f.Fuzz(func(t *testing.T, raw []byte) {
		rep, err := reportFromBinary(raw)
		if err != nil {
			return
		}
		text, err := json.Marshal(evidence{Report: rep})
		if err != nil {
			t.Fatal(err)
		}
		// The attester's own writer gives the same text.
		if fast := (&evidence{Report: rep}).appendJSON(nil); !bytes.Equal(fast, text) {
			t.Fatalf("appendJSON differs from json.Marshal:\n got %s\nwant %s", fast, text)
		}
		_, back, err := parseEvidence(text)
		if err != nil {
			t.Fatalf("evidence made from a report does not parse: %v", err)
		}
		if !bytes.Equal(back, raw) {
			t.Fatal("binary → JSON → binary changed the report")
		}
	})
}

// FuzzVerify runs the whole verifier on untrusted evidence: nothing may
// panic, and what passes binds the report data.
func FuzzVerify(f *testing.F) {
	s := newSigner(f, false)
	rd := reportData(2)
	f.Add([]byte(evidenceJSON(f, fakeReport(f, s, rd, nil), "VCEK", s.Vcek.Raw)))
	f.Add([]byte(evidenceJSON(f, fakeReport(f, s, rd, func(raw []byte) { raw[offKeyInfo] = 4 }), "VLEK", s.Vlek.Raw)))
	v := mustVerifier(f, Options{Now: fakeNow, Roots: fakeRoots(s)})
	f.Fuzz(func(t *testing.T, data []byte) {
		claims, err := v.Verify(context.Background(), data, rd)
		if err == nil && claims.Values["report_data"] != hex.EncodeToString(rd) {
			t.Fatalf("verified evidence claims report data %s", claims.Values["report_data"])
		}
	})
}
