package tests

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cwrun/cwrun/internal/syncbuf"
	"github.com/cwrun/cwrun/internal/testimage"
)

// bigImage is an OCI layout with one file of n random-ish bytes.
func bigImage(t *testing.T, dir string, n int) string {
	t.Helper()
	body := make([]byte, n)
	for i := range body {
		body[i] = byte(i*2654435761>>13) ^ byte(i)
	}
	layout := filepath.Join(dir, "big")
	testimage.WriteLayout(t, layout, "v1", testimage.Config{Cmd: []string{"/x"}},
		testimage.Layer(t, E{Name: "data/", Type: '5'}, E{Name: "data/blob", Body: string(body)}))
	return "oci:" + layout + ":v1"
}

// noSealLeftovers fails when a seal left its work folder behind.
func noSealLeftovers(t *testing.T, tmp string) {
	t.Helper()
	left, _ := filepath.Glob(filepath.Join(tmp, "cwrun-seal-*"))
	if len(left) > 0 {
		t.Fatalf("work folders left behind: %v", left)
	}
}

func noImage(t *testing.T, s store, name string) {
	t.Helper()
	if out := s.podman(t, "images", "-q", "--filter", "reference="+name); strings.TrimSpace(out) != "" {
		t.Fatalf("a partial image %s is in storage: %s", name, out)
	}
}

func TestSealBadInput(t *testing.T) {
	need(t, "podman", "mkfs.ext4")
	needRoot(t)
	dir := t.TempDir()
	s := newStore(t)
	key := writeKey(t, dir, "k")
	tmp := filepath.Join(dir, "tmp")
	os.Mkdir(tmp, 0o700)
	small := filepath.Join(dir, "small")
	testimage.WriteLayout(t, small, "v1", testimage.Config{Cmd: []string{"/x"}}, testimage.Layer(t, E{Name: "x", Body: "x"}))

	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"missing image", []string{"--passphrase-file", key, "oci:" + filepath.Join(dir, "nope") + ":v1", "localhost/bad:1"}, "nope"},
		{"missing local image", []string{"--passphrase-file", key, "localhost/no-such-image:v9", "localhost/bad:2"}, "localhost/no-such-image:v9"},
		{"unknown transport", []string{"--passphrase-file", key, "ftp://example/x", "localhost/bad:3"}, "unknown transport \"ftp\""},
		{"unreadable passphrase file", []string{"--passphrase-file", filepath.Join(dir, "missing-key"), "oci:" + small + ":v1", "localhost/bad:4"}, "passphrase file"},
		{"no passphrase", []string{"oci:" + small + ":v1", "localhost/bad:5"}, "--passphrase-out"},
		{"unknown tee", []string{"--tee", "sgx", "--passphrase-file", key, "oci:" + small + ":v1", "localhost/bad:6"}, "snp, tdx, tpm, sample"},
		{"bad slop", []string{"--slop", "lots", "--passphrase-file", key, "oci:" + small + ":v1", "localhost/bad:7"}, "percentage"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := s.cwrun(t, append([]string{"build", "--tee", "sample", "--tmpdir", tmp}, tc.args...)...)
			if r.code == 0 {
				t.Fatalf("exit 0, want failure\n%s", r.stdout)
			}
			if !strings.Contains(r.stderr, tc.want) {
				t.Fatalf("stderr %q does not mention %q", r.stderr, tc.want)
			}
			noSealLeftovers(t, tmp)
		})
	}
	noImage(t, s, "localhost/bad")
}

func TestSealTooLittleSlop(t *testing.T) {
	need(t, "podman", "mkfs.ext4")
	needRoot(t)
	dir := t.TempDir()
	s := newStore(t)
	key := writeKey(t, dir, "k")
	src := bigImage(t, dir, 40<<20)
	r := s.cwrun(t, "build", "--tee", "sample", "--slop", "0%", "--passphrase-file", key, "--tmpdir", dir, src, "localhost/slop:0")
	if r.code == 0 || !strings.Contains(r.stderr, "too little slop") || !strings.Contains(r.stderr, "use --slop") {
		t.Fatalf("exit %d, stderr %q: want a refusal that names the slop needed", r.code, r.stderr)
	}
	noSealLeftovers(t, dir)
	noImage(t, s, "localhost/slop")
}

func TestSealDiskFull(t *testing.T) {
	need(t, "podman", "mkfs.ext4")
	needRoot(t)
	dir := t.TempDir()
	s := newStore(t)
	key := writeKey(t, dir, "k")
	src := bigImage(t, dir, 30<<20)
	full := filepath.Join(dir, "full")
	os.Mkdir(full, 0o700)
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", full).CombinedOutput(); err != nil {
		t.Skipf("cannot mount a small tmpfs: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", full).Run() })
	r := s.cwrun(t, "build", "--tee", "sample", "--passphrase-file", key, "--tmpdir", full, src, "localhost/full:1")
	if r.code == 0 {
		t.Fatal("sealing into a full tmpdir succeeded")
	}
	if !strings.Contains(r.stderr, "no space left") || !strings.Contains(r.stderr, "--tmpdir") {
		t.Fatalf("stderr %q: want 'no space left' and what to do", r.stderr)
	}
	entries, _ := os.ReadDir(full)
	if len(entries) != 0 {
		t.Fatalf("left in the tmpdir: %v", entries)
	}
	noImage(t, s, "localhost/full")
}

// TestSealInterrupted sends SIGINT in the middle of a seal: no image,
// no work folder, exit status 130.
func TestSealInterrupted(t *testing.T) {
	need(t, "podman", "mkfs.ext4")
	needRoot(t)
	dir := t.TempDir()
	s := newStore(t)
	key := writeKey(t, dir, "k")
	src := bigImage(t, dir, 200<<20)
	for _, stage := range []string{"making the ext4", "encrypting", "writing the sealed image"} {
		t.Run(stage, func(t *testing.T) {
			cmd := exec.Command(cwrunBin, s.flags("build", "--tee", "sample", "--passphrase-file", key, "--tmpdir", dir, src, "localhost/int:1")...)
			var stderr syncbuf.Buffer
			cmd.Stderr = &stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			deadline := time.Now().Add(2 * time.Minute)
			for !strings.Contains(stderr.String(), stage) {
				if time.Now().After(deadline) {
					cmd.Process.Kill()
					t.Fatalf("never reached %q: %s", stage, stderr.String())
				}
				time.Sleep(5 * time.Millisecond)
			}
			cmd.Process.Signal(syscall.SIGINT)
			err := cmd.Wait()
			ee, ok := err.(*exec.ExitError)
			if !ok {
				// It may have finished the stage before the signal landed.
				t.Logf("seal finished before SIGINT took effect: %v", err)
				s.podman(t, "rmi", "localhost/int:1")
				return
			}
			if ee.ExitCode() != 130 {
				t.Fatalf("exit %d, want 130\n%s", ee.ExitCode(), stderr.String())
			}
			noSealLeftovers(t, dir)
			noImage(t, s, "localhost/int")
		})
	}
}

func TestInspectMkcwFixture(t *testing.T) {
	fixture := "../../shared/fixtures/mkcw-busybox.oci.tar"
	if _, err := os.Stat(fixture); err != nil {
		t.Skipf("fixture %s absent: %v", fixture, err)
	}
	s := newStore(t)
	r := s.cwrun(t, "inspect", "--format", "json", "oci-archive:"+fixture+":cw")
	if r.code != 0 {
		t.Fatalf("cwrun inspect: exit %d: %s", r.code, r.stderr)
	}
	var ins struct {
		SealedBy string `json:"sealed_by"`
		Config   struct {
			TEE            string `json:"tee"`
			WorkloadID     string `json:"workload_id"`
			AttestationURL string `json:"attestation_url"`
			CPUs           int    `json:"cpus"`
			RAM            int    `json:"ram_mib"`
		} `json:"config"`
		FooterMatches bool `json:"footer_matches"`
		LUKS          struct {
			Version, KeyBits, SectorSize int
			Cipher, Mode                 string
		} `json:"luks"`
		DiskSize int64 `json:"disk_size"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &ins); err != nil {
		t.Fatalf("inspect JSON: %v\n%s", err, r.stdout)
	}
	c := ins.Config
	if c.TEE != "snp" || c.WorkloadID != "fixture-busybox" || c.CPUs != 1 || c.RAM != 256 || c.AttestationURL != "" {
		t.Errorf("config %+v", c)
	}
	if !ins.FooterMatches || !strings.Contains(ins.SealedBy, "buildah") {
		t.Errorf("footer matches %v, sealed by %q", ins.FooterMatches, ins.SealedBy)
	}
	if l := ins.LUKS; l.Version != 1 || l.Cipher != "aes" || l.Mode != "xts-plain64" || l.KeyBits != 512 || l.SectorSize != 512 {
		t.Errorf("luks %+v", l)
	}
	if ins.DiskSize != 12558336 {
		t.Errorf("disk size %d, want 12558336", ins.DiskSize)
	}
	text := s.cwrun(t, "inspect", "oci-archive:"+fixture+":cw")
	for _, want := range []string{"fixture-busybox", "LUKS1 aes-xts-plain64, 512-bit key", "256 MiB"} {
		if !strings.Contains(text.stdout, want) {
			t.Errorf("text output lacks %q:\n%s", want, text.stdout)
		}
	}
}

func TestInspectNotSealed(t *testing.T) {
	dir := t.TempDir()
	layout := filepath.Join(dir, "plain")
	testimage.WriteLayout(t, layout, "v1", testimage.Config{Cmd: []string{"/x"}}, testimage.Layer(t, E{Name: "x", Body: "x"}))
	r := newStore(t).cwrun(t, "inspect", "oci:"+layout+":v1")
	if r.code == 0 || !strings.Contains(r.stderr, "not a sealed image") || !strings.Contains(r.stderr, "cwrun build") {
		t.Fatalf("exit %d, stderr %q", r.code, r.stderr)
	}
}
