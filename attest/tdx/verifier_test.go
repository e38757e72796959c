package tdx

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cwrun/cwrun/attest"
	pb "github.com/google/go-tdx-guest/proto/tdx"
	tdxtest "github.com/google/go-tdx-guest/testing"
)

func at(s string) func() time.Time {
	tm, err := time.Parse("2006-01-02", s)
	if err != nil {
		panic(err)
	}
	return func() time.Time { return tm }
}

func mustVerifier(t testing.TB, opts Options) *verifier {
	t.Helper()
	v, err := NewVerifier(opts)
	if err != nil {
		t.Fatal(err)
	}
	return v.(*verifier)
}

func wantDenied(t *testing.T, err error, check string) {
	t.Helper()
	if err == nil {
		t.Fatalf("verification passed, want a %q denial", check)
	}
	if !errors.Is(err, attest.ErrEvidence) {
		t.Fatalf("error %v does not wrap attest.ErrEvidence", err)
	}
	if !strings.Contains(err.Error(), "tdx "+check+":") {
		t.Fatalf("error %q does not name the %q check", err, check)
	}
}

// fixtureQuote is a real v4 quote (Sapphire Rapids, a debug TD) from
// Trustee's tests, and its report data.
func fixtureQuote(t testing.TB) ([]byte, []byte) {
	t.Helper()
	raw := readTestdata(t, "tdx_quote_4.dat")
	q, err := parseQuote(raw)
	if err != nil {
		t.Fatal(err)
	}
	return raw, q.GetTdQuoteBody().GetReportData()
}

// TestFixtureQuote: Intel's signatures on the real quote verify against
// Intel's embedded root. Being a debug TD, it is then refused, by the
// last check: every check before it passed.
func TestFixtureQuote(t *testing.T) {
	raw, rd := fixtureQuote(t)
	v := mustVerifier(t, Options{Now: at("2025-06-01")})
	q, status, err := v.verifyQuote(raw)
	if err != nil {
		t.Fatalf("the real quote's signatures do not verify: %v", err)
	}
	if status != "unchecked" || len(q.GetTdQuoteBody().GetMrTd()) != 48 {
		t.Fatalf("status %q, quote %v", status, q.GetTdQuoteBody())
	}
	_, err = v.Verify(context.Background(), evidenceJSON(t, raw, nil), rd)
	wantDenied(t, err, checkAttributes)
	if !strings.Contains(err.Error(), "debug TD") {
		t.Fatalf("error %q does not say it is a debug TD", err)
	}

	for _, tc := range []struct {
		name string
		off  int
	}{
		{"header", 12},        // QE vendor ID
		{"MRTD", 0x30 + 0x88}, // TD quote body
		{"report data", 0x278 - 64},
		{"quote signature", 0x27C + 10},
		{"attestation key", 0x27C + 64 + 5},
		{"QE report", 0x27C + 128 + 6 + 100},
		{"QE report signature", 0x27C + 128 + 6 + 384 + 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bad := bytes.Clone(raw)
			bad[tc.off] ^= 0x01
			_, err := v.Verify(context.Background(), evidenceJSON(t, bad, nil), rd)
			wantDenied(t, err, checkSignature)
		})
	}
	t.Run("PCK certificate expired", func(t *testing.T) {
		_, err := mustVerifier(t, Options{Now: at("2031-01-01")}).Verify(context.Background(), evidenceJSON(t, raw, nil), rd)
		wantDenied(t, err, checkSignature)
	})
	t.Run("untrusted root", func(t *testing.T) {
		v := mustVerifier(t, Options{Now: at("2025-06-01"), Roots: newFakeIntel(t).roots()})
		_, err := v.Verify(context.Background(), evidenceJSON(t, raw, nil), rd)
		wantDenied(t, err, checkSignature)
	})
}

func TestQuoteVersion5(t *testing.T) {
	v := mustVerifier(t, Options{Now: at("2025-06-01")})
	_, err := v.Verify(context.Background(), evidenceJSON(t, readTestdata(t, "tdx_quote_5.dat"), nil), reportData(0))
	wantDenied(t, err, checkFormat)
	if !strings.Contains(err.Error(), "version 5 is not supported yet") {
		t.Fatalf("error %q does not say v5 is unsupported", err)
	}
}

// writeCollateral puts PCS responses and Intel's TCB signing chain (as
// go-tdx-guest's tests carry it) in a collateral folder.
func writeCollateral(t *testing.T, dir string, files map[string][]byte) {
	t.Helper()
	chain, err := url.QueryUnescape(tdxtest.TcbInfoHeader["Tcb-Info-Issuer-Chain"][0])
	if err != nil {
		t.Fatal(err)
	}
	files[signingChain] = []byte(chain)
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// TestCollateralFromPCS: with go-tdx-guest's recorded PCS answers (for
// the fixture's FMSPC), the quote's TCB is up to date; the answers are
// kept in the folder, which then suffices alone.
func TestCollateralFromPCS(t *testing.T) {
	raw, _ := fixtureQuote(t)
	dir := t.TempDir()
	now := at("2023-07-01")
	v := mustVerifier(t, Options{Now: now, Getter: tdxtest.TestGetter, CacheDir: dir})
	if _, status, err := v.verifyQuote(raw); err != nil || status != "UpToDate" {
		t.Fatalf("verifyQuote = %q, %v; want UpToDate", status, err)
	}
	for _, name := range []string{"tcbinfo-50806f000000.json", qeIdentityFile, signingChain} {
		if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
			t.Fatalf("collateral not kept: %v", err)
		}
	}
	offline := mustVerifier(t, Options{Now: now, CacheDir: dir})
	if _, status, err := offline.verifyQuote(raw); err != nil || status != "UpToDate" {
		t.Fatalf("from the folder alone: %q, %v", status, err)
	}
	// Past the collateral's next update, the folder's copy is stale.
	late := mustVerifier(t, Options{Now: at("2023-08-01"), CacheDir: dir})
	_, _, err := late.verifyQuote(raw)
	wantDenied(t, err, checkCollateral)
	if !strings.Contains(err.Error(), "out of date") {
		t.Fatalf("error %q does not say the collateral is stale", err)
	}
}

// TestCollateralFixtures: Trustee's recorded collateral is for another
// platform (FMSPC 00A06D080000). Its signatures verify with Intel's TCB
// signing key, and then the FMSPC comparison rejects it for this quote.
func TestCollateralFixtures(t *testing.T) {
	raw, _ := fixtureQuote(t)
	tcbInfo := readTestdata(t, "tcbInfo.json")
	dir := t.TempDir()
	// Serve it under the quote's FMSPC, as a misconfigured folder would.
	writeCollateral(t, dir, map[string][]byte{
		"tcbinfo-50806f000000.json": tcbInfo,
		qeIdentityFile:              readTestdata(t, "enclaveIdentity.json"),
	})
	// Inside both the signing certificate's and the collateral's validity.
	now := at("2025-05-01")
	v := mustVerifier(t, Options{Now: now, CacheDir: dir})
	_, _, err := v.verifyQuote(raw)
	wantDenied(t, err, checkCollateral)
	if !strings.Contains(err.Error(), "FMSPC") {
		t.Fatalf("error %q: want the FMSPC mismatch, reached only after both signatures verified", err)
	}

	tampered := bytes.Replace(tcbInfo, []byte(`"tcbEvaluationDataNumber":17`), []byte(`"tcbEvaluationDataNumber":18`), 1)
	if bytes.Equal(tampered, tcbInfo) {
		t.Fatal("fixture changed: nothing tampered")
	}
	dir2 := t.TempDir()
	writeCollateral(t, dir2, map[string][]byte{
		"tcbinfo-50806f000000.json": tampered,
		qeIdentityFile:              readTestdata(t, "enclaveIdentity.json"),
	})
	_, _, err = mustVerifier(t, Options{Now: now, CacheDir: dir2}).verifyQuote(raw)
	wantDenied(t, err, checkCollateral)
	if !strings.Contains(err.Error(), "tcbInfo response verification failed") {
		t.Fatalf("error %q: want the TCB info signature to fail", err)
	}

	_, _, err = mustVerifier(t, Options{Now: now, CacheDir: t.TempDir()}).verifyQuote(raw)
	wantDenied(t, err, checkCollateral)
	if !strings.Contains(err.Error(), "tcbinfo-50806f000000.json") {
		t.Fatalf("error %q does not name the missing file", err)
	}
	if _, err := NewVerifier(Options{CacheDir: filepath.Join(dir, "missing")}); err == nil {
		t.Fatal("a missing collateral folder was accepted")
	}
}

func TestFakeQuotes(t *testing.T) {
	f := newFakeIntel(t)
	v := mustVerifier(t, Options{Now: fakeNow, Roots: f.roots()})
	ctx := context.Background()
	rd := reportData(1)
	ccel := readTestdata(t, "CCEL_data_ovmf")

	claims, err := v.Verify(ctx, evidenceJSON(t, f.quote(t, rd, nil), ccel), rd)
	if err != nil {
		t.Fatal(err)
	}
	for k, want := range map[string]string{
		"rtmr0":               ovmfRTMRs[0],
		"rtmr2":               ovmfRTMRs[2],
		"report_data":         hex.EncodeToString(rd),
		"td_attributes":       "0000001000000000",
		"td_attributes_debug": "false",
		"event_log_verified":  "true",
		"tcb_status":          "unchecked",
	} {
		if got := claims.Values[k]; got != want {
			t.Errorf("claim %s = %q, want %q", k, got, want)
		}
	}
	for _, k := range []string{"mr_td", "rtmr1", "rtmr3", "mr_config_id", "mr_owner", "mr_owner_config", "xfam", "tee_tcb_svn", "mr_seam"} {
		if len(claims.Values[k]) == 0 {
			t.Errorf("claim %s missing", k)
		}
	}

	for _, tc := range []struct {
		name  string
		ev    json.RawMessage
		rd    []byte
		check string
	}{
		{"debug TD", evidenceJSON(t, f.quote(t, rd, func(b *pb.TDQuoteBody) { b.TdAttributes[0] |= tdDebug }), nil), rd, checkAttributes},
		{"wrong report data", evidenceJSON(t, f.quote(t, rd, nil), nil), reportData(2), checkReportData},
		{"event log of another boot", evidenceJSON(t, f.quote(t, rd, func(b *pb.TDQuoteBody) { b.Rtmrs[1][0] ^= 1 }), ccel), rd, checkLog},
		{"truncated event log", evidenceJSON(t, f.quote(t, rd, nil), ccel[:200]), rd, checkLog},
		{"quote not base64", json.RawMessage(`{"cc_eventlog":null,"quote":"!!"}`), rd, checkFormat},
		{"unknown field", json.RawMessage(`{"quote":"AAAA","extra":1}`), rd, checkFormat},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := v.Verify(ctx, tc.ev, tc.rd)
			wantDenied(t, err, tc.check)
		})
	}

	t.Run("RTMR3 extended at run time", func(t *testing.T) {
		// The CCEL says nothing of RTMR3: a quote whose RTMR3 was
		// extended later still matches it.
		q := f.quote(t, rd, func(b *pb.TDQuoteBody) { b.Rtmrs[3][0] = 0x55 })
		if _, err := v.Verify(ctx, evidenceJSON(t, q, ccel), rd); err != nil {
			t.Fatal(err)
		}
	})
}
