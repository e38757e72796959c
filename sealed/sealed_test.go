package sealed

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

func TestFooterRoundTrip(t *testing.T) {
	cfg := []byte(`{"tee":"snp","tee_data":"{\"gen\":\"milan\"}","workload_id":"w","cpus":1,"ram_mib":256,"attestation_url":""}`)
	for _, end := range []int64{0, 1, 4095, 4096, 8192 + 17} {
		disk := append(bytes.Repeat([]byte{0xaa}, int(end)), Footer(end, cfg)...)
		got, at, err := ReadFooter(bytes.NewReader(disk), int64(len(disk)))
		if err != nil {
			t.Fatalf("end %d: %v", end, err)
		}
		if !bytes.Equal(got, cfg) {
			t.Fatalf("end %d: config %q", end, got)
		}
		if len(disk)%Align != 0 || at < end {
			t.Fatalf("end %d: config at %d, disk of %d bytes: want after the payload, ending aligned", end, at, len(disk))
		}
	}
}

func TestReadFooterRejects(t *testing.T) {
	for name, disk := range map[string][]byte{
		"short":    []byte("KRUN"),
		"no magic": bytes.Repeat([]byte{0}, 64),
		"too long": append(bytes.Repeat([]byte{0}, 20), []byte("KRUN\xff\x00\x00\x00\x00\x00\x00\x00")...),
		"zero":     append(bytes.Repeat([]byte{0}, 20), []byte("KRUN\x00\x00\x00\x00\x00\x00\x00\x00")...),
	} {
		if _, _, err := ReadFooter(bytes.NewReader(disk), int64(len(disk))); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, _, err := ReadFooter(bytes.NewReader(make([]byte, 64)), 64); !errors.Is(err, ErrNoFooter) {
		t.Errorf("no magic: %v, want ErrNoFooter", err)
	}
}

func FuzzReadFooter(f *testing.F) {
	f.Add(Footer(4096, []byte(`{"tee":"snp"}`)))
	f.Add([]byte("KRUN\x05\x00\x00\x00\x00\x00\x00\x00"))
	f.Fuzz(func(t *testing.T, b []byte) {
		cfg, at, err := ReadFooter(bytes.NewReader(b), int64(len(b)))
		if err != nil {
			return
		}
		if at < 0 || at+int64(len(cfg))+trailerSize != int64(len(b)) {
			t.Fatalf("config at %d (%d bytes) in %d", at, len(cfg), len(b))
		}
		_, _ = ParseConfig(cfg)
	})
}

func TestEntrypointRuns(t *testing.T) {
	p := filepath.Join(t.TempDir(), "entrypoint")
	if err := os.WriteFile(p, Entrypoint(), 0o755); err != nil {
		t.Fatal(err)
	}
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(p)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 {
		t.Fatalf("entrypoint: %v, want exit status 1", err)
	}
	if stderr.String() != EntrypointMessage || stdout.Len() != 0 {
		t.Fatalf("stdout %q stderr %q", stdout.String(), stderr.String())
	}
}

func TestConfigKeepsKrunFieldOrder(t *testing.T) {
	c := Config{TEE: TEESNP, TEEData: DefaultTEEData(TEESNP), WorkloadID: "fixture-busybox", CPUs: 1, RAMMiB: 256}
	b, err := c.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	// Exactly what buildah mkcw wrote into the fixture.
	want := `{"tee":"snp","tee_data":"{\"gen\":\"milan\"}","workload_id":"fixture-busybox","cpus":1,"ram_mib":256,"attestation_url":""}`
	if string(b) != want {
		t.Fatalf("got  %s\nwant %s", b, want)
	}
	back, err := ParseConfig(b)
	if err != nil || back.WorkloadID != "fixture-busybox" || back.Cwrun != nil {
		t.Fatalf("ParseConfig: %+v, %v", back, err)
	}
}

func TestParseTEE(t *testing.T) {
	for _, s := range []string{"snp", "TDX", "tpm", "sample"} {
		if _, err := ParseTEE(s); err != nil {
			t.Errorf("%s: %v", s, err)
		}
	}
	if _, err := ParseTEE("sgx"); err == nil {
		t.Error("sgx accepted")
	}
}
