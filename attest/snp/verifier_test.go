package snp

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cwrun/cwrun/attest"
	"github.com/google/go-sev-guest/abi"
	sevtest "github.com/google/go-sev-guest/testing"
)

func at(s string) func() time.Time {
	tm, err := time.Parse("2006-01-02", s)
	if err != nil {
		panic(err)
	}
	return func() time.Time { return tm }
}

func mustVerifier(t testing.TB, opts Options) attest.Verifier {
	t.Helper()
	v, err := NewVerifier(opts)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// wantDenied checks that err is an evidence rejection naming check.
func wantDenied(t *testing.T, err error, check string) {
	t.Helper()
	if err == nil {
		t.Fatalf("verification passed, want a %q denial", check)
	}
	if !errors.Is(err, attest.ErrEvidence) {
		t.Fatalf("error %v does not wrap attest.ErrEvidence", err)
	}
	if !strings.Contains(err.Error(), "snp "+check+":") {
		t.Fatalf("error %q does not name the %q check", err, check)
	}
}

func readFile(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// trusteeFixture is real evidence from an AMD EPYC (Genoa family)
// recorded by Trustee's tests.
func trusteeFixture(t testing.TB) (json.RawMessage, []byte) {
	t.Helper()
	ev := readFile(t, "snp-evidence.json")
	parsed, _, err := parseEvidence(ev)
	if err != nil {
		t.Fatal(err)
	}
	return ev, parsed.Report.ReportData
}

// TestTrusteeFixtureVerifies is the proof that the JSON→binary mapping
// is exact: a real AMD signature only verifies over the right bytes.
func TestTrusteeFixtureVerifies(t *testing.T) {
	ev, rd := trusteeFixture(t)
	v := mustVerifier(t, Options{Now: at("2026-01-01")})
	claims, err := v.Verify(context.Background(), ev, rd)
	if err != nil {
		t.Fatal(err)
	}
	parsed, _, _ := parseEvidence(ev)
	want := map[string]string{
		"measurement":  hex.EncodeToString(parsed.Report.Measurement),
		"chip_id":      hex.EncodeToString(parsed.Report.ChipID),
		"report_data":  hex.EncodeToString(rd),
		"signing_key":  "vcek",
		"product_line": "Genoa",
		"policy":       "0000000000030000",
		"policy_debug": "false",
		"policy_smt":   "true",
		"vmpl":         "0",
		"guest_svn":    "0",
		// bootloader 10, tee 0, snp 23, microcode 25 in Genoa's layout.
		"reported_tcb":           "191700000000000a",
		"reported_tcb_snp":       "23",
		"reported_tcb_microcode": "25",
	}
	for k, w := range want {
		if got := claims.Values[k]; got != w {
			t.Errorf("claim %s = %q, want %q", k, got, w)
		}
	}
	if claims.Tee != attest.TeeSNP || claims.Insecure {
		t.Errorf("claims %+v: want tee snp, not insecure", claims)
	}
}

// TestTrusteeFixtureRoundTrip: binary → JSON gives back Trustee's bytes.
func TestTrusteeFixtureRoundTrip(t *testing.T) {
	var doc struct {
		Report json.RawMessage `json:"attestation_report"`
	}
	if err := json.Unmarshal(readFile(t, "snp-evidence.json"), &doc); err != nil {
		t.Fatal(err)
	}
	_, raw, err := parseEvidence(readFile(t, "snp-evidence.json"))
	if err != nil {
		t.Fatal(err)
	}
	if len(raw) != abi.ReportSize {
		t.Fatalf("binary report has %d bytes", len(raw))
	}
	back, err := reportFromBinary(raw)
	if err != nil {
		t.Fatal(err)
	}
	got, err := json.Marshal(back)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, doc.Report) {
		t.Fatalf("round trip differs:\n got %s\nwant %s", got, doc.Report)
	}
}

// flipJSON changes one byte of a byte-array field of the report JSON.
func flipJSON(t testing.TB, ev json.RawMessage, field string, index int) json.RawMessage {
	t.Helper()
	parsed, _, err := parseEvidence(ev)
	if err != nil {
		t.Fatal(err)
	}
	r := parsed.Report
	switch field {
	case "measurement":
		r.Measurement[index] ^= 1
	case "host_data":
		r.HostData[index] ^= 1
	case "signature.r":
		r.Signature.R[index] ^= 1
	case "signature.s":
		r.Signature.S[index] ^= 1
	case "report_data":
		r.ReportData[index] ^= 1
	default:
		t.Fatalf("no field %s", field)
	}
	out, err := json.Marshal(parsed)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestTrusteeFixtureTampered(t *testing.T) {
	ev, rd := trusteeFixture(t)
	v := mustVerifier(t, Options{Now: at("2026-01-01")})
	for _, tc := range []struct {
		field string
		index int
	}{{"measurement", 0}, {"host_data", 31}, {"signature.r", 3}, {"signature.s", 40}} {
		t.Run(tc.field, func(t *testing.T) {
			_, err := v.Verify(context.Background(), flipJSON(t, ev, tc.field, tc.index), rd)
			wantDenied(t, err, checkSignature)
		})
	}
	t.Run("report_data", func(t *testing.T) {
		// Changing the report data breaks the signature before the binding.
		tampered := flipJSON(t, ev, "report_data", 0)
		_, err := v.Verify(context.Background(), tampered, rd)
		wantDenied(t, err, checkSignature)
	})
	t.Run("wrong expected report data", func(t *testing.T) {
		other := bytes.Clone(rd)
		other[63] ^= 0xFF
		_, err := v.Verify(context.Background(), ev, other)
		wantDenied(t, err, checkReportData)
	})
	t.Run("VCEK expired", func(t *testing.T) {
		v := mustVerifier(t, Options{Now: at("2033-01-01")})
		_, err := v.Verify(context.Background(), ev, rd)
		wantDenied(t, err, checkChain)
	})
	t.Run("no VCEK and no key server", func(t *testing.T) {
		var doc map[string]json.RawMessage
		if err := json.Unmarshal(ev, &doc); err != nil {
			t.Fatal(err)
		}
		doc["cert_chain"] = json.RawMessage("null")
		stripped, _ := json.Marshal(doc)
		_, err := v.Verify(context.Background(), stripped, rd)
		wantDenied(t, err, checkKey)
		if !strings.Contains(err.Error(), "no VCEK in the evidence and no key server configured; pass") {
			t.Fatalf("error %q does not say what to do", err)
		}
	})
}

// TestRawFixtures verifies Trustee's raw reports (Milan) with their
// VCEK and VLEK, going through the binary → JSON mapping.
func TestRawFixtures(t *testing.T) {
	for _, tc := range []struct {
		name, report, cert, certType, key string
	}{
		{"vcek", "test-report.bin", "test-vcek.der", "VCEK", "vcek"},
		{"vlek", "test-vlek-report.bin", "test-vlek.der", "VLEK", "vlek"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			raw := readFile(t, tc.report)
			der := readFile(t, tc.cert)
			rd := raw[offReportData : offReportData+64]
			v := mustVerifier(t, Options{Now: at("2025-06-01")})
			claims, err := v.Verify(context.Background(), evidenceJSON(t, raw, tc.certType, der), rd)
			if err != nil {
				t.Fatal(err)
			}
			if claims.Values["signing_key"] != tc.key || claims.Values["product_line"] != "Milan" {
				t.Fatalf("claims %v", claims.Values)
			}
			for _, off := range []int{offMeasurement + 5, offPolicy + 2, offSignature + 1, offSignature + sigComponentSize + 9} {
				bad := bytes.Clone(raw)
				bad[off] ^= 0x01
				_, err := v.Verify(context.Background(), evidenceJSON(t, bad, tc.certType, der), rd)
				wantDenied(t, err, checkSignature)
			}
			// The certificate of the other kind is no substitute.
			other := map[string]string{"VCEK": "VLEK", "VLEK": "VCEK"}[tc.certType]
			_, err = v.Verify(context.Background(), evidenceJSON(t, raw, other, der), rd)
			wantDenied(t, err, checkKey)
		})
	}
	t.Run("vlek expired", func(t *testing.T) {
		raw := readFile(t, "test-vlek-report.bin")
		v := mustVerifier(t, Options{Now: at("2026-01-01")})
		_, err := v.Verify(context.Background(), evidenceJSON(t, raw, "VLEK", readFile(t, "test-vlek.der")), raw[offReportData:offReportData+64])
		wantDenied(t, err, checkChain)
		if !strings.Contains(err.Error(), "expired") {
			t.Fatalf("error %q does not say the certificate expired", err)
		}
	})
	t.Run("wrong VCEK", func(t *testing.T) {
		// The Genoa fixture's VCEK cannot vouch for the Milan report.
		raw := readFile(t, "test-report.bin")
		ev, _ := trusteeFixture(t)
		parsed, _, _ := parseEvidence(ev)
		v := mustVerifier(t, Options{Now: at("2026-01-01")})
		_, err := v.Verify(context.Background(), evidenceJSON(t, raw, "VCEK", []byte(parsed.CertChain[0].Data)), raw[offReportData:offReportData+64])
		if err == nil || !errors.Is(err, attest.ErrEvidence) {
			t.Fatalf("a foreign VCEK was accepted: %v", err)
		}
	})
}

func TestEmbeddedRoots(t *testing.T) {
	roots, err := defaultRoots()
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range []string{"Milan", "Genoa", "Turin"} {
		sets := roots[line]
		if len(sets) == 0 || sets[0].asvk == nil {
			t.Fatalf("%s: no roots with an ASVK", line)
		}
		// The embedded PEMs are AMD's: the same ARK/ASK go-sev-guest
		// embeds, so only one set per product line is kept.
		if len(sets) != 1 {
			t.Errorf("%s: %d root sets, the embedded PEMs differ from go-sev-guest's", line, len(sets))
		}
		if err := sets[0].ask.CheckSignatureFrom(sets[0].ark); err != nil {
			t.Errorf("%s ASK not signed by ARK: %v", line, err)
		}
		if err := sets[0].asvk.CheckSignatureFrom(sets[0].ark); err != nil {
			t.Errorf("%s ASVK not signed by ARK: %v", line, err)
		}
	}
}

func TestFakeSigned(t *testing.T) {
	s := newSigner(t, false)
	ctx := context.Background()
	rd := reportData(1)
	opts := Options{Now: fakeNow, Roots: fakeRoots(s)}
	v := mustVerifier(t, opts)

	good := evidenceJSON(t, fakeReport(t, s, rd, nil), "VCEK", s.Vcek.Raw)
	claims, err := v.Verify(ctx, good, rd)
	if err != nil {
		t.Fatal(err)
	}
	if got := claims.Values["host_data"]; !strings.HasPrefix(got, hex.EncodeToString([]byte("cwrun host data"))) {
		t.Errorf("host_data claim %q", got)
	}
	if claims.Values["guest_svn"] != "7" || claims.Values["policy_debug"] != "false" || claims.Values["policy_smt"] != "true" {
		t.Errorf("claims %v", claims.Values)
	}

	for _, tc := range []struct {
		name  string
		ev    json.RawMessage
		rd    []byte
		opts  *Options
		check string
	}{
		{"wrong report data", good, reportData(2), nil, checkReportData},
		{"debug policy", evidenceJSON(t, fakeReport(t, s, rd, func(raw []byte) {
			raw[offPolicy+2] |= 1 << 3 // bit 19
		}), "VCEK", s.Vcek.Raw), rd, nil, checkPolicy},
		{"below minimum TCB", good, rd, &Options{Now: fakeNow, Roots: fakeRoots(s), MinTCB: &TCB{SNP: 1}}, checkMinimumTCB},
		{"AMD's roots do not trust the fake chain", good, rd, &Options{Now: fakeNow}, checkChain},
		{"VCEK not yet valid for its ASK", good, rd, &Options{Now: at("2024-06-01"), Roots: fakeRoots(s)}, checkChain},
		{"chip ID differs from the VCEK's", evidenceJSON(t, fakeReport(t, s, rd, func(raw []byte) {
			raw[offChipID] = 1
		}), "VCEK", s.Vcek.Raw), rd, nil, checkBinding},
		{"reported TCB differs from the VCEK's", evidenceJSON(t, fakeReport(t, s, rd, func(raw []byte) {
			raw[offReportedTCB+6] = 9 // SNP SPL
		}), "VCEK", s.Vcek.Raw), rd, nil, checkBinding},
		{"VLEK report without a VLEK", evidenceJSON(t, fakeReport(t, s, rd, func(raw []byte) {
			raw[offKeyInfo] = byte(abi.VlekReportSigner) << 2
		}), "VCEK", s.Vcek.Raw), rd, nil, checkKey},
		{"not JSON", json.RawMessage(`{"attestation_report":`), rd, nil, checkFormat},
		{"unknown field", json.RawMessage(`{"attestation_report":{},"extra":1}`), rd, nil, checkFormat},
	} {
		t.Run(tc.name, func(t *testing.T) {
			vv := v
			if tc.opts != nil {
				vv = mustVerifier(t, *tc.opts)
			}
			_, err := vv.Verify(ctx, tc.ev, tc.rd)
			wantDenied(t, err, tc.check)
		})
	}

	t.Run("VLEK", func(t *testing.T) {
		raw := fakeReport(t, s, rd, func(raw []byte) { raw[offKeyInfo] = byte(abi.VlekReportSigner) << 2 })
		claims, err := v.Verify(ctx, evidenceJSON(t, raw, "VLEK", s.Vlek.Raw), rd)
		if err != nil {
			t.Fatal(err)
		}
		if claims.Values["signing_key"] != "vlek" {
			t.Fatalf("signing_key %q", claims.Values["signing_key"])
		}
	})
}

// TestFakeSignedUnsignedReport: a report whose key_info says "not
// signed" is refused before any signature is looked at.
func TestFakeSignedUnsignedReport(t *testing.T) {
	s := newSigner(t, false)
	rd := reportData(1)
	raw := fakeReport(t, s, rd, nil)
	raw[offKeyInfo] = byte(abi.NoneReportSigner) << 2
	v := mustVerifier(t, Options{Now: fakeNow, Roots: fakeRoots(s)})
	_, err := v.Verify(context.Background(), evidenceJSON(t, raw, "VCEK", s.Vcek.Raw), rd)
	wantDenied(t, err, checkKey)
}

// TestKeyServerAndCache: without a VCEK in the evidence, the verifier
// asks the (fake) key server once, keeps the VCEK in the cache folder,
// and later verifies from the folder alone.
func TestKeyServerAndCache(t *testing.T) {
	s := newSigner(t, true)
	rd := reportData(3)
	ev := evidenceJSON(t, fakeReport(t, s, rd, withChip))
	dir := t.TempDir()
	kds, err := sevtest.FakeKDSFromSigner(s)
	if err != nil {
		t.Fatal(err)
	}
	getter := &countingGetter{g: kds}
	v := mustVerifier(t, Options{Now: fakeNow, Roots: fakeRoots(s), CacheDir: dir, Getter: getter})
	for i := 0; i < 3; i++ {
		if _, err := v.Verify(context.Background(), ev, rd); err != nil {
			t.Fatal(err)
		}
	}
	if getter.n != 1 {
		t.Fatalf("the key server was asked %d times, want once", getter.n)
	}
	name := "vcek-" + hex.EncodeToString(fakeChip[:]) + "-bl3-tee0-snp8-ucode115.der"
	cached, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil {
		t.Fatalf("VCEK not cached as %s: %v", name, err)
	}
	if !bytes.Equal(cached, s.Vcek.Raw) {
		t.Fatal("the cached VCEK is not the key server's")
	}

	offline := mustVerifier(t, Options{Now: fakeNow, Roots: fakeRoots(s), CacheDir: dir})
	if _, err := offline.Verify(context.Background(), ev, rd); err != nil {
		t.Fatalf("from the cache alone: %v", err)
	}

	empty := mustVerifier(t, Options{Now: fakeNow, Roots: fakeRoots(s), CacheDir: t.TempDir()})
	_, err = empty.Verify(context.Background(), ev, rd)
	wantDenied(t, err, checkKey)
	if !strings.Contains(err.Error(), name) {
		t.Fatalf("error %q does not name the file to provide", err)
	}

	if _, err := NewVerifier(Options{CacheDir: filepath.Join(dir, "missing")}); err == nil {
		t.Fatal("a missing cache folder was accepted")
	}
}

type countingGetter struct {
	g interface{ Get(string) ([]byte, error) }
	n int
}

func (c *countingGetter) Get(url string) ([]byte, error) {
	c.n++
	return c.g.Get(url)
}

// TestChainCache: a repeated VCEK is checked against the roots once.
func TestChainCache(t *testing.T) {
	s := newSigner(t, false)
	vi := mustVerifier(t, Options{Now: fakeNow, Roots: fakeRoots(s)})
	v := vi.(*verifier)
	for i := byte(0); i < 3; i++ {
		rd := reportData(i)
		if _, err := v.Verify(context.Background(), evidenceJSON(t, fakeReport(t, s, rd, nil), "VCEK", s.Vcek.Raw), rd); err != nil {
			t.Fatal(err)
		}
	}
	if len(v.chains) != 1 {
		t.Fatalf("%d chains cached, want 1", len(v.chains))
	}
	// Past the chain's validity, the cached entry does not hold.
	late := time.Date(2060, 1, 1, 0, 0, 0, 0, time.UTC)
	v.now = func() time.Time { return late }
	rd := reportData(9)
	_, err := v.Verify(context.Background(), evidenceJSON(t, fakeReport(t, s, rd, nil), "VCEK", s.Vcek.Raw), rd)
	wantDenied(t, err, checkChain)
}

// BenchmarkVerify measures a handshake's verification with a VCEK seen
// before: the report's P-384 signature and the JSON mapping.
func BenchmarkVerify(b *testing.B) {
	s := newSigner(b, false)
	rd := reportData(5)
	ev := evidenceJSON(b, fakeReport(b, s, rd, nil), "VCEK", s.Vcek.Raw)
	v := mustVerifier(b, Options{Now: fakeNow, Roots: fakeRoots(s)})
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := v.Verify(ctx, ev, rd); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// TestConcurrentVerify shares one verifier (and its chain cache) among
// goroutines, as the broker does; run with -race.
func TestConcurrentVerify(t *testing.T) {
	s := newSigner(t, false)
	v := mustVerifier(t, Options{Now: fakeNow, Roots: fakeRoots(s)})
	type item struct {
		ev json.RawMessage
		rd []byte
	}
	var items []item
	for i := byte(0); i < 8; i++ {
		rd := reportData(i)
		items = append(items, item{evidenceJSON(t, fakeReport(t, s, rd, nil), "VCEK", s.Vcek.Raw), rd})
	}
	errs := make(chan error, len(items)*4)
	for r := 0; r < 4; r++ {
		for _, it := range items {
			go func() {
				_, err := v.Verify(context.Background(), it.ev, it.rd)
				errs <- err
			}()
		}
	}
	for range len(items) * 4 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
}

// TestPartialCPUID: a version 3 report JSON may leave any CPUID field
// null (it is then 0); the verifier must cope, not crash.
func TestPartialCPUID(t *testing.T) {
	s := newSigner(t, false)
	rd := reportData(1)
	ev := evidenceJSON(t, fakeReport(t, s, rd, nil), "VCEK", s.Vcek.Raw)
	parsed, _, err := parseEvidence(ev)
	if err != nil {
		t.Fatal(err)
	}
	parsed.Report.CPUIDModID = nil
	partial, _ := json.Marshal(parsed)
	v := mustVerifier(t, Options{Now: fakeNow, Roots: fakeRoots(s)})
	// Model 1 became 0: still Milan, but no longer the signed bytes.
	_, err = v.Verify(context.Background(), partial, rd)
	wantDenied(t, err, checkSignature)
}
