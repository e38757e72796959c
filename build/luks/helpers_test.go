package luks

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// needCryptsetup returns the path of cryptsetup or skips the test.
func needCryptsetup(t testing.TB) string {
	t.Helper()
	p, err := exec.LookPath("cryptsetup")
	if err != nil {
		t.Skip("cryptsetup not installed (Debian: apt-get install cryptsetup-bin); it is the reference this test checks against")
	}
	return p
}

// needPyCryptography returns Debian's python3 or skips the test.
func needPyCryptography(t testing.TB) string {
	t.Helper()
	const py = "/usr/bin/python3"
	if err := exec.Command(py, "-c", "import cryptography.hazmat.primitives.ciphers").Run(); err != nil {
		t.Skipf("%s with python3-cryptography not available (%v); it is the independent AES-XTS implementation this test checks against", py, err)
	}
	return py
}

func randPassphrase(t testing.TB) []byte {
	t.Helper()
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return []byte(hex.EncodeToString(b))
}

func writeFile(t testing.TB, dir, name string, data []byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// cryptsetup runs cryptsetup with args and returns its combined output.
func cryptsetup(t testing.TB, args ...string) (string, error) {
	t.Helper()
	cmd := exec.CommandContext(context.Background(), needCryptsetup(t), args...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// dumpVolumeKey asks cryptsetup for the volume key of img.
func dumpVolumeKey(t testing.TB, img, passFile string) []byte {
	t.Helper()
	out, err := cryptsetup(t, "luksDump", "--dump-volume-key", "--batch-mode", "--key-file", passFile, img)
	if err != nil {
		t.Fatalf("cryptsetup luksDump --dump-volume-key: %v\n%s", err, out)
	}
	_, rest, ok := strings.Cut(out, "MK dump:")
	if !ok {
		t.Fatalf("no MK dump in cryptsetup output:\n%s", out)
	}
	var key []byte
	for i, line := range strings.Split(rest, "\n") {
		if i > 0 && !strings.HasPrefix(line, "\t") && !strings.HasPrefix(line, " ") {
			break
		}
		b, err := hex.DecodeString(strings.Join(strings.Fields(line), ""))
		if err != nil {
			break
		}
		key = append(key, b...)
	}
	if len(key) == 0 {
		t.Fatalf("empty MK dump in cryptsetup output:\n%s", out)
	}
	return key
}

// makeDisk writes header + encrypted random payload + a footer to a file
// in dir, the shape of a sealed disk.img, and returns its path and the
// plaintext.
func makeDisk(t testing.TB, v *Volume, payloadSize int64) (string, []byte) {
	t.Helper()
	plain := make([]byte, payloadSize)
	if _, err := rand.Read(plain); err != nil {
		t.Fatal(err)
	}
	footer := []byte(`{"workload_id":"x"}KRUN` + "\x13\x00\x00\x00\x00\x00\x00\x00")
	var disk bytes.Buffer
	disk.Write(v.Header())
	disk.Write(plain)
	disk.Write(footer)
	path := writeFile(t, t.TempDir(), "disk.img", disk.Bytes())
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := v.EncryptFile(context.Background(), f, v.PayloadOffset(), payloadSize, 0); err != nil {
		t.Fatalf("EncryptFile: %v", err)
	}
	return path, plain
}
