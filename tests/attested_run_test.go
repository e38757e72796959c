package tests

import (
	"context"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/cwrun/cwrun/attest/kbs"
	"github.com/cwrun/cwrun/attest/kbs/config"
	"github.com/cwrun/cwrun/internal/testimage"
)

var workloadIDRE = regexp.MustCompile(`workload id\s+(\S+)`)

// TestAttestedRun is the whole key-release chain with sample evidence:
// `cwrun build --kbs` registers the disk key with a real broker process
// and hands it to nobody; `cwrun run` boots with no passphrase on the
// host, the guest attests through the launcher's relay, gets the key as
// a JWE and unlocks its disk. Then the broker's denials reach the user.
func TestAttestedRun(t *testing.T) {
	needVM(t)
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	testimage.WriteLayout(t, src, "v1", testimage.Config{
		Cmd: []string{"/bin/sh", "-c", sealedCmd}, Env: []string{"PATH=/bin", "FOO=bar"}, WorkingDir: "/work",
	}, busyboxLayer(t))
	kdir := kbsInit(t)
	b := startBroker(t, kdir, "--tees", "sample")
	s := newStore(t)
	sealedRef := "oci:" + filepath.Join(dir, "sealed") + ":kbs"
	kbsFlags := []string{"--kbs", b.url, "--kbs-admin-key", filepath.Join(kdir, config.AdminKeyFile), "--kbs-cacert", filepath.Join(kdir, config.CACertFile)}

	r := s.cwrun(t, append(append([]string{"build", "--tee", "sample", "--cpus", "1", "--memory", "512"}, kbsFlags...), "oci:"+src+":v1", sealedRef)...)
	if r.code != 0 {
		t.Fatalf("build --kbs: exit %d\n%s\nbroker log:\n%s", r.code, r.stderr, b.log())
	}
	m := workloadIDRE.FindStringSubmatch(r.stdout)
	if m == nil {
		t.Fatalf("build output names no workload id:\n%s", r.stdout)
	}
	id := m[1]
	if !strings.Contains(r.stdout, "held by the broker only") {
		t.Errorf("build output does not say where the key went:\n%s", r.stdout)
	}
	ctx := context.Background()
	ad := b.admin(t)
	w, err := ad.Workload(ctx, id)
	if err != nil {
		t.Fatalf("the broker does not know workload %s after build --kbs: %v", id, err)
	}
	if w.Tee != "sample" || w.CPUs != 1 || w.MemoryMiB != 512 {
		t.Errorf("registered workload %+v: want tee sample, 1 vCPU, 512 MiB", w)
	}

	e := newVMEnv(t, s)
	caFlag := []string{"--kbs-cacert", filepath.Join(kdir, config.CACertFile)}
	t.Run("released", func(t *testing.T) {
		r := e.run(t, append(append([]string{"run"}, caFlag...), sealedRef)...)
		if r.code != 3 || !strings.Contains(r.stdout, "hello from the guest") || !strings.Contains(r.stdout, "FOO=bar") {
			t.Fatalf("attested run: exit %d (want 3)\nstdout: %s\nstderr: %s\nbroker log:\n%s", r.code, r.stdout, r.stderr, b.log())
		}
	})

	// A broker restarting while a guest boots (a rolling upgrade): the
	// relay answers 503, the user is told once, the guest asks again,
	// and the boot goes on once a broker answers at the same address.
	parent := t
	t.Run("broker restarting", func(t *testing.T) {
		u, err := url.Parse(b.url)
		if err != nil {
			t.Fatal(err)
		}
		b.kill()
		b.wait()
		run := e.start(t, append(append([]string{"run"}, caFlag...), sealedRef)...)
		warning := "cannot reach the key broker at " + b.url
		for deadline := time.Now().Add(2 * time.Minute); !strings.Contains(run.stderr.String(), warning); time.Sleep(50 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("no warning %q in 2 minutes\nstderr: %s", warning, run.stderr.String())
			}
		}
		// Long enough for the guest to ask a few times more.
		time.Sleep(3 * time.Second)
		b = startBrokerFor(t, parent, kdir, "--tees", "sample", "--listen", "127.0.0.1:"+u.Port())
		if code := run.exitCode(t); code != 3 || !strings.Contains(run.out.String(), "hello from the guest") {
			t.Fatalf("a guest whose broker came back: exit %d (want 3)\nstdout: %s\nstderr: %s\nbroker log:\n%s", code, run.out.String(), run.stderr.String(), b.log())
		}
		t.Logf("the user sees:\n%s", run.stderr.String())
		if n := strings.Count(run.stderr.String(), warning); n != 1 {
			t.Errorf("the warning came %d times; want once:\n%s", n, run.stderr.String())
		}
	})

	t.Run("denied by a reference value", func(t *testing.T) {
		// Sample evidence says svn 1; the workload now wants 7.
		if _, err := ad.ReplaceWorkload(ctx, kbs.WorkloadSpec{ID: id, Tee: "sample", References: map[string][]string{"svn": {"7"}}, CPUs: 1, MemoryMiB: 512}); err != nil {
			t.Fatal(err)
		}
		r := e.run(t, append(append([]string{"run"}, caFlag...), sealedRef)...)
		if r.code == 0 || r.code == 3 || strings.Contains(r.stdout, "hello from the guest") {
			t.Fatalf("a guest failing its reference values ran: exit %d\n%s", r.code, r.stdout)
		}
		t.Logf("the user sees:\n%s", r.stderr)
		if !strings.Contains(r.stderr, "svn") || !strings.Contains(r.stderr, "403") {
			t.Errorf("the denial does not say which check failed:\n%s", r.stderr)
		}
	})

	t.Run("unknown workload", func(t *testing.T) {
		if err := ad.DeleteWorkload(ctx, id); err != nil {
			t.Fatal(err)
		}
		r := e.run(t, append(append([]string{"run"}, caFlag...), sealedRef)...)
		if r.code == 0 || r.code == 3 {
			t.Fatalf("a removed workload's disk was unlocked: exit %d\n%s", r.code, r.stdout)
		}
		if !strings.Contains(r.stderr, id) {
			t.Errorf("the failure does not name the workload %s:\n%s", id, r.stderr)
		}
	})

	// Nothing secret in the broker's log, and the disk key reached no
	// file the host kept: the sealed layout holds only the encrypted disk.
	if strings.Contains(b.log(), "passphrase\":\"") {
		t.Errorf("the broker logged a passphrase:\n%s", b.log())
	}
	if err := filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() && strings.Contains(p, "passphrase") {
			t.Errorf("a passphrase file appeared on the host: %s", p)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}
