package tests

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cwrun/cwrun/internal/testimage"
	digest "github.com/opencontainers/go-digest"
)

// startRegistry runs Debian's docker-registry (distribution) on a free
// loopback port and returns its host:port.
func startRegistry(t *testing.T) string {
	t.Helper()
	need(t, "docker-registry")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	dir := t.TempDir()
	cfg := filepath.Join(dir, "config.yml")
	os.WriteFile(cfg, []byte(fmt.Sprintf("version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: %s\n", filepath.Join(dir, "data"), addr)), 0o644)
	cmd := exec.Command("docker-registry", "serve", cfg)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return addr
		}
		if time.Now().After(deadline) {
			t.Fatalf("registry did not listen on %s", addr)
		}
	}
}

// TestSealThroughRegistry reads the source from a registry process and
// pushes the sealed image back to it.
func TestSealThroughRegistry(t *testing.T) {
	need(t, "skopeo", "mkfs.ext4")
	needRoot(t)
	reg := startRegistry(t)
	dir := t.TempDir()
	layout := filepath.Join(dir, "src")
	testimage.WriteLayout(t, layout, "v1", testimage.Config{Cmd: []string{"/hello"}},
		testimage.Layer(t, E{Name: "hello", Mode: 0o755, Body: "hi"}))
	mustRun(t, "skopeo", "copy", "-q", "--dest-tls-verify=false", "oci:"+layout+":v1", "docker://"+reg+"/app:v1")
	s := newStore(t)
	key := writeKey(t, dir, "registry-pass")

	r := s.cwrun(t, "--tls-verify=false", "build", "--tee", "tdx", "--passphrase-file", key,
		"docker://"+reg+"/app:v1", "docker://"+reg+"/app:sealed")
	if r.code != 0 {
		t.Fatalf("cwrun build: exit %d\n%s", r.code, r.stderr)
	}
	out := mustRun(t, "skopeo", "inspect", "--raw", "--tls-verify=false", "docker://"+reg+"/app:sealed")
	src := mustRun(t, "skopeo", "inspect", "--raw", "--tls-verify=false", "docker://"+reg+"/app:v1")
	base := fmt.Sprintf(`"org.opencontainers.image.base.digest":"%s"`, digest.FromString(src))
	for _, want := range []string{`"io.cwrun.sealed":"true"`, `"io.cwrun.tee":"tdx"`, "application/vnd.oci.image.layer.v1.tar\"",
		`"org.opencontainers.image.base.name":"` + reg + `/app:v1"`, base} {
		if !strings.Contains(out, want) {
			t.Errorf("pushed manifest lacks %s:\n%s", want, out)
		}
	}
	ins := s.cwrun(t, "--tls-verify=false", "inspect", "docker://"+reg+"/app:sealed")
	if ins.code != 0 || !strings.Contains(ins.stdout, "tdx") || !strings.Contains(ins.stdout, "LUKS2") {
		t.Fatalf("inspect of the pushed image: exit %d\n%s%s", ins.code, ins.stdout, ins.stderr)
	}
	// Without --tls-verify=false the plain-HTTP registry is refused.
	if r := s.cwrun(t, "inspect", "docker://"+reg+"/app:sealed"); r.code == 0 {
		t.Fatal("inspect over plain HTTP succeeded with TLS verification on")
	}
}

// TestSealHonoursPolicy: a policy.json that rejects the registry stops
// the seal before anything is read.
func TestSealHonoursPolicy(t *testing.T) {
	need(t, "skopeo", "mkfs.ext4")
	needRoot(t)
	reg := startRegistry(t)
	dir := t.TempDir()
	layout := filepath.Join(dir, "src")
	testimage.WriteLayout(t, layout, "v1", testimage.Config{Cmd: []string{"/x"}}, testimage.Layer(t, E{Name: "x", Body: "x"}))
	mustRun(t, "skopeo", "copy", "-q", "--dest-tls-verify=false", "oci:"+layout+":v1", "docker://"+reg+"/app:v1")
	policy := filepath.Join(dir, "policy.json")
	os.WriteFile(policy, []byte(`{"default":[{"type":"insecureAcceptAnything"}],"transports":{"docker":{"`+reg+`":[{"type":"reject"}]}}}`), 0o644)
	s := newStore(t)
	r := s.cwrun(t, "--tls-verify=false", "--signature-policy", policy, "build", "--tee", "sample",
		"--passphrase-file", writeKey(t, dir, "k"), "docker://"+reg+"/app:v1", "localhost/app:sealed")
	if r.code == 0 || !strings.Contains(r.stderr, "policy.json refuses") {
		t.Fatalf("exit %d, stderr %q: want a policy refusal", r.code, r.stderr)
	}
}
