package tpm

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/cwrun/cwrun/attest"
	"github.com/cwrun/cwrun/attest/attesttest"
)

func mustVerifier(t testing.TB, opts Options) attest.Verifier {
	t.Helper()
	v, err := NewVerifier(opts)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// fixtureReportData takes the report data from the fixture's own quote:
// the nonce of the handshake it was made for is not recorded.
func fixtureReportData(t testing.TB, raw []byte) []byte {
	t.Helper()
	ev, err := ParseEvidence(raw)
	if err != nil {
		t.Fatal(err)
	}
	msg, _ := base64.StdEncoding.DecodeString(ev.Quote.Message)
	q, err := ParseQuote(msg)
	if err != nil {
		t.Fatal(err)
	}
	return q.ExtraData
}

func TestTrusteeFixtureVerifies(t *testing.T) {
	raw := readFixture(t)
	rd := fixtureReportData(t, raw)
	if len(rd) != ReportDataLen {
		t.Fatalf("fixture's qualifying data is %d bytes; Trustee's attester sends %d", len(rd), ReportDataLen)
	}
	// Trustee's report data is a SHA-384 digest zero-padded to 64 bytes.
	if !bytes.Equal(rd[48:], make([]byte, 16)) {
		t.Errorf("fixture's qualifying data %x is not a zero-padded SHA-384 digest", rd)
	}
	var ev Evidence
	_ = json.Unmarshal(raw, &ev)
	spki, _ := base64.StdEncoding.DecodeString(ev.AKPublic)
	sum := sha256.Sum256(spki)
	akHex := hex.EncodeToString(sum[:])

	for name, opts := range map[string]Options{
		"any AK":     {},
		"trusted AK": {TrustedAKs: []string{strings.Repeat("ab", 32), strings.ToUpper(akHex)}},
	} {
		t.Run(name, func(t *testing.T) {
			c, err := mustVerifier(t, opts).Verify(context.Background(), raw, rd)
			if err != nil {
				t.Fatalf("Verify(Trustee fixture) = %v", err)
			}
			want := map[string]string{
				"ak":            akHex,
				"pcr0":          strings.Repeat("00", 32),
				"pcr17":         strings.Repeat("ff", 32),
				"pcr23":         strings.Repeat("00", 32),
				"reset_count":   "2",
				"restart_count": "0",
			}
			for k, v := range want {
				if c.Values[k] != v {
					t.Errorf("claim %s = %q, want %q", k, c.Values[k], v)
				}
			}
			if c.Tee != attest.TeeTPM || c.Insecure {
				t.Errorf("claims = %+v", c)
			}
		})
	}
	t.Run("untrusted AK", func(t *testing.T) {
		_, err := mustVerifier(t, Options{TrustedAKs: []string{strings.Repeat("ab", 32)}}).Verify(context.Background(), raw, rd)
		wantDenied(t, err, "not a trusted AK")
	})
	t.Run("requires event log", func(t *testing.T) {
		_, err := mustVerifier(t, Options{RequireEventLog: true}).Verify(context.Background(), raw, rd)
		wantDenied(t, err, "no event log")
	})
}

func wantDenied(t *testing.T, err error, substr string) {
	t.Helper()
	if err == nil {
		t.Fatalf("verified; want a denial mentioning %q", substr)
	}
	if !errors.Is(err, attest.ErrEvidence) {
		t.Fatalf("error %v does not wrap attest.ErrEvidence", err)
	}
	if !strings.Contains(err.Error(), substr) {
		t.Fatalf("error %q does not mention %q", err, substr)
	}
}

// flipB64 flips one bit of the i-th decoded byte (negative: from the
// end) of a base64 field.
func flipB64(t *testing.T, s string, i int) string {
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	if i < 0 {
		i += len(b)
	}
	b[i] ^= 0x01
	return base64.StdEncoding.EncodeToString(b)
}

func TestTrusteeFixtureFlippedByte(t *testing.T) {
	raw := readFixture(t)
	rd := fixtureReportData(t, raw)
	v := mustVerifier(t, Options{})
	var orig Evidence
	if err := json.Unmarshal(raw, &orig); err != nil {
		t.Fatal(err)
	}
	msgLen := len(orig.Quote.Message) * 3 / 4
	cases := map[string]struct {
		mut  func(e *Evidence)
		want string
	}{
		"message magic":          {func(e *Evidence) { e.Quote.Message = flipB64(t, e.Quote.Message, 0) }, "signature"},
		"message extraData":      {func(e *Evidence) { e.Quote.Message = flipB64(t, e.Quote.Message, 50) }, "signature"},
		"message last byte":      {func(e *Evidence) { e.Quote.Message = flipB64(t, e.Quote.Message, -1) }, "signature"},
		"message middle":         {func(e *Evidence) { e.Quote.Message = flipB64(t, e.Quote.Message, msgLen/2) }, "signature"},
		"signature body":         {func(e *Evidence) { e.Quote.Signature = flipB64(t, e.Quote.Signature, 100) }, "signature"},
		"signature last byte":    {func(e *Evidence) { e.Quote.Signature = flipB64(t, e.Quote.Signature, -1) }, "signature"},
		"signature algorithm":    {func(e *Evidence) { e.Quote.Signature = flipB64(t, e.Quote.Signature, 1) }, "TPMT_SIGNATURE"},
		"ak_public modulus":      {func(e *Evidence) { e.AKPublic = flipB64(t, e.AKPublic, 100) }, "signature"},
		"ak_public DER":          {func(e *Evidence) { e.AKPublic = flipB64(t, e.AKPublic, 1) }, "ak_public"},
		"PCR 17 value":           {func(e *Evidence) { e.Quote.PCRs[17] = "fe" + e.Quote.PCRs[17][2:] }, "PCR digest"},
		"PCR 0 value":            {func(e *Evidence) { e.Quote.PCRs[0] = strings.Repeat("0", 63) + "1" }, "PCR digest"},
		"PCRs swapped":           {func(e *Evidence) { e.Quote.PCRs[0], e.Quote.PCRs[17] = e.Quote.PCRs[17], e.Quote.PCRs[0] }, "PCR digest"},
		"PCR not hex":            {func(e *Evidence) { e.Quote.PCRs[3] = strings.Repeat("zz", 32) }, "pcrs[3]"},
		"23 PCRs":                {func(e *Evidence) { e.Quote.PCRs = e.Quote.PCRs[:23] }, "23 PCRs"},
		"message not base64":     {func(e *Evidence) { e.Quote.Message = "!" + e.Quote.Message }, "base64"},
		"ak_public not base64":   {func(e *Evidence) { e.AKPublic = "%%%" }, "base64"},
		"eventlog not base64":    {func(e *Evidence) { e.EventLog = "%%%" }, "eventlog"},
		"eventlog not a log":     {func(e *Evidence) { e.EventLog = base64.StdEncoding.EncodeToString(make([]byte, 64)) }, "event log"},
		"signature not base64":   {func(e *Evidence) { e.Quote.Signature = "***" }, "base64"},
		"message truncated":      {func(e *Evidence) { e.Quote.Message = e.Quote.Message[:40] }, "signature"},
		"missing ak_public":      {func(e *Evidence) { e.AKPublic = "" }, "no ak_public"},
		"missing message":        {func(e *Evidence) { e.Quote.Message = "" }, "no tpm_quote"},
		"signature of other msg": {func(e *Evidence) { e.Quote.Message = base64.StdEncoding.EncodeToString([]byte("hello")) }, "signature"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			e := orig
			e.Quote.PCRs = append([]string(nil), orig.Quote.PCRs...)
			c.mut(&e)
			b, err := json.Marshal(e)
			if err != nil {
				t.Fatal(err)
			}
			_, err = v.Verify(context.Background(), b, rd)
			wantDenied(t, err, c.want)
		})
	}
	t.Run("other report data", func(t *testing.T) {
		other := bytes.Clone(rd)
		other[40] ^= 1
		_, err := v.Verify(context.Background(), raw, other)
		wantDenied(t, err, "qualifying data")
	})
}

// TestChecks reaches each structural check with a quote signed by a
// software key, so the signature passes and the named check must fail.
func TestChecks(t *testing.T) {
	ak := newSoftAK(t, algRSASSA)
	rd := attesttest.RandomReportData(t)
	pcrs := zeroPCRs()
	v := mustVerifier(t, Options{})
	cases := map[string]struct {
		mut  func(q *quoteSpec)
		want string
	}{
		"wrong magic":       {func(q *quoteSpec) { q.magic = 0x12345678 }, "TPM_GENERATED_VALUE"},
		"not a quote":       {func(q *quoteSpec) { q.typ = 0x8017 }, "TPM_ST_ATTEST_QUOTE"},
		"other report data": {func(q *quoteSpec) { q.extra[5] ^= 1 }, "replayed"},
		"short report data": {func(q *quoteSpec) { q.extra = q.extra[:16] }, "replayed"},
		"no report data":    {func(q *quoteSpec) { q.extra = nil }, "replayed"},
		"SHA-1 bank":        {func(q *quoteSpec) { q.hash = algSHA1 }, "SHA-256 bank"},
		"PCRs 0-15 only":    {func(q *quoteSpec) { q.sel = []byte{0xff, 0xff, 0} }, "PCRs 0-23"},
		"PCR 24 too":        {func(q *quoteSpec) { q.sel = []byte{0xff, 0xff, 0xff, 1} }, "PCRs 0-23"},
		"wrong digest":      {func(q *quoteSpec) { q.digest = make([]byte, 32) }, "PCR digest"},
		"trailing byte":     {func(q *quoteSpec) { q.trailer = []byte{0} }, "after the quote info"},
		"digest of other PCRs": {func(q *quoteSpec) {
			q.pcrs = append(zeroPCRs()[:9], append([][]byte{bytes.Repeat([]byte{9}, 32)}, zeroPCRs()[10:]...)...)
		}, "PCR digest"},
		"digest short (SHA-1)":  {func(q *quoteSpec) { q.digest = make([]byte, 20) }, "PCR digest"},
		"oversized select list": {func(q *quoteSpec) { q.sel = bytes.Repeat([]byte{0xff}, 40) }, "PCRs 0-23"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			q := defaultSpec(rd, pcrs)
			c.mut(&q)
			_, err := v.Verify(context.Background(), ak.evidence(t, q.marshal(), pcrs, nil), rd)
			wantDenied(t, err, c.want)
		})
	}
	t.Run("32-byte prefix accepted", func(t *testing.T) {
		q := defaultSpec(rd[:ShortReportDataLen], pcrs)
		if _, err := v.Verify(context.Background(), ak.evidence(t, q.marshal(), pcrs, nil), rd); err != nil {
			t.Fatalf("Verify(quote carrying the 32-byte prefix) = %v", err)
		}
	})
	t.Run("weak RSA AK", func(t *testing.T) {
		_, err := parseAK([]byte("x"))
		if err == nil {
			t.Fatal("parseAK(garbage) = nil")
		}
	})
	t.Run("bad TrustedAKs", func(t *testing.T) {
		for _, s := range []string{"xyz", "abcd", strings.Repeat("a", 63)} {
			if _, err := NewVerifier(Options{TrustedAKs: []string{s}}); err == nil {
				t.Errorf("NewVerifier(TrustedAKs %q) = nil error", s)
			}
		}
	})
	t.Run("signature algorithm does not fit the key", func(t *testing.T) {
		ec := newSoftAK(t, algECDSA)
		q := defaultSpec(rd, pcrs)
		ev := ak.evidence(t, q.marshal(), pcrs, nil)
		var e Evidence
		_ = json.Unmarshal(ev, &e)
		e.Quote.Signature = base64.StdEncoding.EncodeToString(ec.sign(t, q.marshal()))
		b, _ := json.Marshal(e)
		_, err := v.Verify(context.Background(), b, rd)
		wantDenied(t, err, "does not fit")
	})
}

func TestSignatureAlgorithms(t *testing.T) {
	rd := attesttest.RandomReportData(t)
	pcrs := zeroPCRs()
	for _, alg := range []uint16{algRSASSA, algRSAPSS, algECDSA} {
		ak := newSoftAK(t, alg)
		ev := ak.evidence(t, defaultSpec(rd, pcrs).marshal(), pcrs, nil)
		if _, err := mustVerifier(t, Options{}).Verify(context.Background(), ev, rd); err != nil {
			t.Errorf("alg %#x: %v", alg, err)
		}
	}
}

// TestVerifierSuiteSoftwareAK runs the conformance suite with quotes
// signed by a software AK (fast; swtpm_test.go runs it on a real TPM).
func TestVerifierSuiteSoftwareAK(t *testing.T) {
	ak := newSoftAK(t, algECDSA)
	pcrs := bootLog("kernel", "initrd", "console=ttyS0").pcrs
	log := bootLog("kernel", "initrd", "console=ttyS0").buf.Bytes()
	attesttest.VerifierSuite(t, attesttest.VerifierCase{
		Verifier: mustVerifier(t, Options{}),
		Evidence: func(t *testing.T, rd []byte) json.RawMessage {
			return ak.evidence(t, defaultSpec(rd, pcrs).marshal(), pcrs, log)
		},
		Tamper: func(t *testing.T, ev json.RawMessage) json.RawMessage {
			var e Evidence
			if err := json.Unmarshal(ev, &e); err != nil {
				t.Fatal(err)
			}
			e.Quote.Message = flipB64(t, e.Quote.Message, 60)
			b, _ := json.Marshal(e)
			return b
		},
	})
}

func TestEventLogInEvidence(t *testing.T) {
	ak := newSoftAK(t, algRSASSA)
	rd := attesttest.RandomReportData(t)
	good := bootLog("kernel-6.1", "initrd-A", "console=ttyS0 quiet")
	v := mustVerifier(t, Options{RequireEventLog: true})

	c, err := v.Verify(context.Background(), ak.evidence(t, defaultSpec(rd, good.pcrs).marshal(), good.pcrs, good.buf.Bytes()), rd)
	if err != nil {
		t.Fatalf("Verify(evidence with a matching event log) = %v", err)
	}
	for k, content := range map[string]string{"kernel_digest": "kernel-6.1", "initrd_digest": "initrd-A", "cmdline_digest": "console=ttyS0 quiet"} {
		sum := sha256.Sum256([]byte(content))
		if c.Values[k] != hex.EncodeToString(sum[:]) {
			t.Errorf("claim %s = %q, want sha256(%q)", k, c.Values[k], content)
		}
	}

	// A log for another initrd, sent with the quote of the good boot:
	// the replay of PCR 9 no longer matches the signed PCRs.
	other := bootLog("kernel-6.1", "initrd-B", "console=ttyS0 quiet")
	_, err = v.Verify(context.Background(), ak.evidence(t, defaultSpec(rd, good.pcrs).marshal(), good.pcrs, other.buf.Bytes()), rd)
	wantDenied(t, err, "PCR 9: the event log replays to")
	if strings.Contains(err.Error(), "PCR 4") {
		t.Errorf("denial blames PCR 4, which matches: %v", err)
	}
}

func TestParseEventLogAndReplay(t *testing.T) {
	lb := bootLog("k", "i", "c")
	log, err := ParseEventLog(append(lb.buf.Bytes(), make([]byte, 100)...))
	if err != nil {
		t.Fatal(err)
	}
	if log.StartupLocality != 3 {
		t.Errorf("StartupLocality = %d, want 3", log.StartupLocality)
	}
	got := log.Replay()
	for _, pcr := range []uint32{0, 4, 5, 7, 9} {
		if !bytes.Equal(got[pcr], lb.pcrs[pcr]) {
			t.Errorf("Replay PCR %d = %x, want %x", pcr, got[pcr], lb.pcrs[pcr])
		}
	}
	if _, ok := got[10]; ok {
		t.Error("Replay reports PCR 10, which has no events")
	}
	if err := log.CheckReplay(lb.pcrs); err != nil {
		t.Errorf("CheckReplay(own PCRs) = %v", err)
	}
	bad := zeroPCRs()
	if err := log.CheckReplay(bad); err == nil || !strings.Contains(err.Error(), "PCR 0:") || !strings.Contains(err.Error(), "PCR 9:") {
		t.Errorf("CheckReplay(zero PCRs) = %v, want PCR 0 and PCR 9 named", err)
	}

	// A log that ends in an event whose data is zeros, then padding.
	sep := newLogBuilder(0)
	sep.measure(7, EvSeparator, []byte{0, 0, 0, 0}, []byte{0, 0, 0, 0})
	sl, err := ParseEventLog(append(sep.buf.Bytes(), make([]byte, 7)...))
	if err != nil || len(sl.Events) != 2 || !bytes.Equal(sl.Replay()[7], sep.pcrs[7]) {
		t.Errorf("ParseEventLog(log ending in a zero-data separator, padded) = %+v, %v", sl, err)
	}

	broken := map[string][]byte{
		"empty":            nil,
		"truncated":        lb.buf.Bytes()[:len(lb.buf.Bytes())-5],
		"SHA-1 only start": append(make([]byte, 8), lb.buf.Bytes()[8:]...),
		"no spec id":       bytes.Replace(bytes.Clone(lb.buf.Bytes()), []byte("Spec ID"), []byte("Spec XX"), 1),
	}
	for name, b := range broken {
		if _, err := ParseEventLog(b); err == nil {
			t.Errorf("ParseEventLog(%s) = nil error", name)
		}
	}
	// A header event type other than EV_NO_ACTION is refused.
	b := bytes.Clone(lb.buf.Bytes())
	b[4] = EvSeparator
	if _, err := ParseEventLog(b); err == nil {
		t.Error("ParseEventLog(header of type EV_SEPARATOR) = nil error")
	}
}

func TestExplain(t *testing.T) {
	parse := func(lb *logBuilder) *EventLog {
		l, err := ParseEventLog(lb.buf.Bytes())
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	want := parse(bootLog("kernel", "initrd-A", "quiet"))
	if lines := Explain(want, want); len(lines) != 0 {
		t.Errorf("Explain(same logs) = %q", lines)
	}
	initrdA, initrdB := sha256.Sum256([]byte("initrd-A")), sha256.Sum256([]byte("initrd-B"))
	got := Explain(parse(bootLog("kernel", "initrd-B", "quiet")), want)
	wantLine := "PCR 9: initrd digest " + hex.EncodeToString(initrdB[:]) + ", expected " + hex.EncodeToString(initrdA[:])
	if len(got) != 1 || got[0] != wantLine {
		t.Errorf("Explain(other initrd) = %q, want [%q]", got, wantLine)
	}
	got = Explain(parse(bootLog("kernel", "initrd-A", "quiet init=/bin/sh")), want)
	if len(got) != 1 || !strings.HasPrefix(got[0], "PCR 9: cmdline digest ") {
		t.Errorf("Explain(other cmdline) = %q", got)
	}
	got = Explain(parse(bootLog("other kernel", "initrd-A", "quiet")), want)
	if len(got) != 1 || !strings.HasPrefix(got[0], "PCR 4: boot application (kernel) digest ") {
		t.Errorf("Explain(other kernel) = %q", got)
	}
	extra := bootLog("kernel", "initrd-A", "quiet")
	extra.measure(4, EvEFIBootServicesApplication, []byte("grub"), nil)
	got = Explain(parse(extra), want)
	if len(got) != 1 || !strings.HasPrefix(got[0], "PCR 4: unexpected boot application (kernel) event") {
		t.Errorf("Explain(extra app) = %q", got)
	}
	got = Explain(want, parse(extra))
	if len(got) != 1 || !strings.HasPrefix(got[0], "PCR 4: missing") {
		t.Errorf("Explain(missing app) = %q", got)
	}
}
