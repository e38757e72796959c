package tpm

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/cwrun/cwrun/attest"
	"github.com/cwrun/cwrun/attest/attesttest"
)

// swtpm is a software TPM running for one test, reached over its
// server socket.
type swtpm struct {
	conn net.Conn
	tpm  *streamTPM // for the test's own commands (PCR extends)
}

// startSwtpm starts `swtpm socket` with fresh state, or skips the test
// when swtpm is not installed.
func startSwtpm(t testing.TB) *swtpm {
	t.Helper()
	bin, err := exec.LookPath("swtpm")
	if err != nil {
		t.Skip("swtpm is not installed (Debian: apt-get install swtpm; hack/deps.sh installs it); skipping tests against a real software TPM")
	}
	// Unix socket paths are limited to 108 bytes; t.TempDir can be long.
	dir, err := os.MkdirTemp("", "swtpm")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "s")
	cmd := exec.Command(bin, "socket", "--tpm2",
		"--server", "type=unixio,path="+sock,
		"--ctrl", "type=unixio,path="+filepath.Join(dir, "c"),
		"--flags", "not-need-init,startup-clear",
		"--tpmstate", "dir="+dir,
		"--log", "file="+filepath.Join(dir, "log"))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting swtpm: %v", err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	var conn net.Conn
	for deadline := time.Now().Add(5 * time.Second); ; {
		conn, err = net.Dial("unix", sock)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("swtpm did not open %s: %v; stderr: %s", sock, err, stderr.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Cleanup(func() { conn.Close() })
	return &swtpm{conn: conn, tpm: &streamTPM{rw: conn}}
}

func (s *swtpm) attester(t testing.TB, opts AttesterOptions) *Attester {
	t.Helper()
	opts.Conn = s.conn
	if opts.EventLog == "" {
		opts.EventLog = "-"
	}
	a, err := NewAttester(opts)
	if err != nil {
		t.Fatalf("NewAttester(swtpm): %v", err)
	}
	t.Cleanup(func() { a.(*Attester).Close() })
	return a.(*Attester)
}

func (s *swtpm) extend(t *testing.T, pcr int, digest []byte) {
	t.Helper()
	_, err := (tpm2.PCRExtend{
		PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(pcr), Auth: tpm2.PasswordAuth(nil)},
		Digests:   tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: digest}}},
	}).Execute(s.tpm)
	if err != nil {
		t.Fatalf("extending PCR %d: %v", pcr, err)
	}
}

func akDigest(a *Attester) string {
	sum := sha256.Sum256(a.AKPublic())
	return hex.EncodeToString(sum[:])
}

func TestSwtpmSuites(t *testing.T) {
	for _, ecc := range []bool{false, true} {
		name := map[bool]string{false: "RSA AK", true: "ECC AK"}[ecc]
		t.Run(name, func(t *testing.T) {
			tpm := startSwtpm(t)
			a := tpm.attester(t, AttesterOptions{ECC: ecc})
			v := mustVerifier(t, Options{TrustedAKs: []string{akDigest(a)}})
			attesttest.AttesterSuite(t, attesttest.AttesterCase{Attester: a, Verifier: v})
			attesttest.VerifierSuite(t, attesttest.VerifierCase{
				Verifier: v,
				Evidence: func(t *testing.T, rd []byte) json.RawMessage {
					ev, err := a.Evidence(context.Background(), rd)
					if err != nil {
						t.Fatal(err)
					}
					return ev
				},
				Tamper: func(t *testing.T, ev json.RawMessage) json.RawMessage {
					var e Evidence
					if err := json.Unmarshal(ev, &e); err != nil {
						t.Fatal(err)
					}
					e.Quote.Signature = flipB64(t, e.Quote.Signature, -3)
					b, _ := json.Marshal(e)
					return b
				},
			})
		})
	}
}

func TestSwtpmMeasurements(t *testing.T) {
	ctx := context.Background()
	tpm := startSwtpm(t)
	a := tpm.attester(t, AttesterOptions{})

	// PCR 9 as the EFI stub leaves it after measuring an initrd, and
	// PCR 23 (application use) extended twice.
	initrd := sha256.Sum256([]byte("initrd"))
	tpm.extend(t, 9, initrd[:])
	one, two := sha256.Sum256([]byte("one")), sha256.Sum256([]byte("two"))
	tpm.extend(t, 23, one[:])
	tpm.extend(t, 23, two[:])
	extendTo := func(start []byte, ds ...[32]byte) string {
		v := start
		for _, d := range ds {
			s := sha256.Sum256(append(bytes.Clone(v), d[:]...))
			v = s[:]
		}
		return hex.EncodeToString(v)
	}

	rd := attesttest.RandomReportData(t)
	ev, err := a.Evidence(ctx, rd)
	if err != nil {
		t.Fatal(err)
	}
	c, err := mustVerifier(t, Options{TrustedAKs: []string{akDigest(a)}}).Verify(ctx, ev, rd)
	if err != nil {
		t.Fatalf("Verify(swtpm evidence) = %v", err)
	}
	// Like Trustee's attester, all 64 bytes go in as qualifying data.
	if got := fixtureReportData(t, ev); !bytes.Equal(got, rd) {
		t.Errorf("quote's qualifying data = %x, want the full report data %x", got, rd)
	}
	want := map[string]string{
		"pcr9":  extendTo(make([]byte, 32), initrd),
		"pcr23": extendTo(make([]byte, 32), one, two),
		"pcr10": strings.Repeat("00", 32),
		"pcr17": strings.Repeat("ff", 32),
		"ak":    akDigest(a),
	}
	for k, v := range want {
		if c.Values[k] != v {
			t.Errorf("claim %s = %s, want %s", k, c.Values[k], v)
		}
	}
	if c.Values["reset_count"] == "" || c.Values["restart_count"] == "" || c.Values["clock"] == "" {
		t.Errorf("replay hints missing from claims %v", c.Values)
	}

	// A quote made before PCR 9 changed again stays signed, but no
	// longer matches a fresh handshake; and a new quote shows the
	// changed PCR.
	tpm.extend(t, 9, initrd[:])
	rd2 := attesttest.RandomReportData(t)
	_, err = mustVerifier(t, Options{}).Verify(ctx, ev, rd2)
	wantDenied(t, err, "replayed")
	ev2, err := a.Evidence(ctx, rd2)
	if err != nil {
		t.Fatal(err)
	}
	c2, err := mustVerifier(t, Options{}).Verify(ctx, ev2, rd2)
	if err != nil {
		t.Fatal(err)
	}
	if c2.Values["pcr9"] != extendTo(make([]byte, 32), initrd, initrd) {
		t.Errorf("pcr9 after a second extend = %s", c2.Values["pcr9"])
	}
}

func TestSwtpmOtherTPMRefused(t *testing.T) {
	ctx := context.Background()
	first := startSwtpm(t).attester(t, AttesterOptions{})
	second := startSwtpm(t).attester(t, AttesterOptions{})
	if bytes.Equal(first.AKPublic(), second.AKPublic()) {
		t.Fatal("two swtpm instances made the same AK")
	}
	v := mustVerifier(t, Options{TrustedAKs: []string{akDigest(first)}})
	rd := attesttest.RandomReportData(t)
	ev, err := second.Evidence(ctx, rd)
	if err != nil {
		t.Fatal(err)
	}
	_, err = v.Verify(ctx, ev, rd)
	wantDenied(t, err, "not a trusted AK")

	// The second TPM's quote with the first TPM's AK pasted in: the
	// signature gives it away.
	var e Evidence
	_ = json.Unmarshal(ev, &e)
	var good Evidence
	goodRaw, err := first.Evidence(ctx, rd)
	if err != nil {
		t.Fatal(err)
	}
	_ = json.Unmarshal(goodRaw, &good)
	e.AKPublic = good.AKPublic
	forged, _ := json.Marshal(e)
	_, err = v.Verify(ctx, forged, rd)
	wantDenied(t, err, "signature")

	if _, err := v.Verify(ctx, goodRaw, rd); err != nil {
		t.Errorf("Verify(first TPM's evidence) = %v", err)
	}
}

func TestSwtpmPersistentAK(t *testing.T) {
	tpm := startSwtpm(t)
	const handle = 0x81010002 // Trustee's default AK handle
	a := tpm.attester(t, AttesterOptions{AKHandle: handle})
	b := tpm.attester(t, AttesterOptions{AKHandle: handle})
	if !bytes.Equal(a.AKPublic(), b.AKPublic()) {
		t.Error("second attester did not load the persisted AK")
	}
	// The transient AK is the same key: the endorsement seed derives it.
	c := tpm.attester(t, AttesterOptions{})
	if !bytes.Equal(a.AKPublic(), c.AKPublic()) {
		t.Error("a transient AK differs from the persisted one made from the same template")
	}
	rd := attesttest.RandomReportData(t)
	ev, err := b.Evidence(context.Background(), rd)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := mustVerifier(t, Options{TrustedAKs: []string{akDigest(a)}}).Verify(context.Background(), ev, rd); err != nil {
		t.Errorf("Verify(evidence from the persisted AK) = %v", err)
	}
	b.Close()
	if _, err := b.Evidence(context.Background(), rd); err == nil || !strings.Contains(err.Error(), "closed") {
		t.Errorf("Evidence after Close = %v, want a refusal", err)
	}
	if _, err := NewAttester(AttesterOptions{Conn: tpm.conn, AKHandle: 0x01000000}); err == nil {
		t.Error("NewAttester(AK handle not persistent) = nil error")
	}
}

func TestSwtpmEventLogFile(t *testing.T) {
	tpm := startSwtpm(t)
	// The event log file is sent as is; the verifier replays it, so a
	// log whose PCRs the TPM does not hold must be refused.
	lb := bootLog("kernel", "initrd", "quiet")
	path := filepath.Join(t.TempDir(), "binary_bios_measurements")
	if err := os.WriteFile(path, lb.buf.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	a := tpm.attester(t, AttesterOptions{EventLog: path})
	rd := attesttest.RandomReportData(t)
	ev, err := a.Evidence(context.Background(), rd)
	if err != nil {
		t.Fatal(err)
	}
	var e Evidence
	_ = json.Unmarshal(ev, &e)
	if e.EventLog == "" {
		t.Fatal("evidence carries no event log")
	}
	_, err = mustVerifier(t, Options{}).Verify(context.Background(), ev, rd)
	wantDenied(t, err, "event log does not match the quoted PCRs")
}

func TestNoTPM(t *testing.T) {
	_, err := NewAttester(AttesterOptions{Device: filepath.Join(t.TempDir(), "tpmrm0")})
	if err == nil || !strings.Contains(err.Error(), "no TPM at ") {
		t.Fatalf("NewAttester(missing device) = %v, want a 'no TPM at' refusal", err)
	}
	var _ attest.Attester = (*Attester)(nil)
}

// BenchmarkSwtpmNewAttester is the guest's one-time cost: creating the
// AK (an RSA-2048 or ECC P-256 primary key) on swtpm.
func BenchmarkSwtpmNewAttester(b *testing.B) {
	for _, ecc := range []bool{false, true} {
		b.Run(map[bool]string{false: "RSA", true: "ECC"}[ecc], func(b *testing.B) {
			tpm := startSwtpm(b)
			for b.Loop() {
				a, err := NewAttester(AttesterOptions{Conn: tpm.conn, ECC: ecc, EventLog: "-"})
				if err != nil {
					b.Fatal(err)
				}
				a.(*Attester).Close()
			}
		})
	}
}

// BenchmarkSwtpmEvidence is the guest's cost per handshake: one quote
// and reading PCRs 0-23 (three TPM2_PCR_Read).
func BenchmarkSwtpmEvidence(b *testing.B) {
	a := startSwtpm(b).attester(b, AttesterOptions{})
	rd := attesttest.RandomReportData(b)
	for b.Loop() {
		if _, err := a.Evidence(context.Background(), rd); err != nil {
			b.Fatal(err)
		}
	}
}
