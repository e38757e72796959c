// Package tests holds cwrun's end-to-end tests: they build the real
// binary and drive it against real programs (cryptsetup, podman,
// mkfs.ext4, Debian's python3-cryptography). Each test makes its own
// images, keys and local storage; nothing is shared with the machine's
// podman store.
package tests

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

var cwrunBin string

func TestMain(m *testing.M) {
	flag.Parse()
	if testing.Short() {
		os.Exit(0)
	}
	dir, err := os.MkdirTemp("", "cwrun-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	cwrunBin = filepath.Join(dir, "cwrun")
	// cwrun-kbs lives next to cwrun, where `cwrun kbs` and `cwrun build
	// --kbs` look for it.
	for _, prog := range []string{"cwrun", "cwrun-kbs"} {
		build := exec.Command("go", "build", "-tags", "containers_image_openpgp exclude_graphdriver_btrfs",
			"-ldflags", "-X github.com/cwrun/cwrun/version.Version=e2e", "-o", filepath.Join(dir, prog), "../cmd/"+prog)
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			fmt.Fprintln(os.Stderr, "building", prog+":", err)
			os.Exit(1)
		}
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// need skips the test when a program it drives is missing.
func need(t *testing.T, progs ...string) {
	t.Helper()
	for _, p := range progs {
		if _, err := exec.LookPath(p); err != nil {
			if _, err := os.Stat(p); err != nil {
				t.Skipf("%s not installed (make deps installs it)", p)
			}
		}
	}
}

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (owners, device nodes, loop mounts); CI runs as root")
	}
}

// store is a private local image storage for one test, shared by cwrun
// and podman through the same --root/--runroot flags.
type store struct{ root, runRoot string }

func newStore(t *testing.T) store {
	t.Helper()
	// podman refuses run roots over 50 characters: t.TempDir's are longer.
	dir, err := os.MkdirTemp("", "cws")
	if err != nil {
		t.Fatal(err)
	}
	s := store{root: filepath.Join(dir, "root"), runRoot: filepath.Join(dir, "run")}
	t.Cleanup(func() {
		// Unmount whatever overlay mounts are left before removing.
		exec.Command("umount", "-R", s.root+"/overlay").Run()
		os.RemoveAll(dir)
	})
	return s
}

func (s store) flags(args ...string) []string {
	return append([]string{"--root", s.root, "--runroot", s.runRoot, "--storage-driver", "overlay"}, args...)
}

type result struct {
	stdout, stderr string
	code           int
}

// run runs a program with a deadline, returning what it printed and its exit code.
func run(t *testing.T, timeout time.Duration, name string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("%s %s: timed out after %s\n%s", name, strings.Join(args, " "), timeout, errb.String())
	}
	code := 0
	if err != nil {
		ee, ok := err.(*exec.ExitError)
		if !ok {
			t.Fatalf("%s: %v", name, err)
		}
		code = ee.ExitCode()
	}
	return result{out.String(), errb.String(), code}
}

// mustRun is run that fails the test on a non-zero exit.
func mustRun(t *testing.T, name string, args ...string) string {
	t.Helper()
	r := run(t, 5*time.Minute, name, args...)
	if r.code != 0 {
		t.Fatalf("%s %s: exit %d\nstdout: %s\nstderr: %s", name, strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

func (s store) cwrun(t *testing.T, args ...string) result {
	t.Helper()
	return run(t, 5*time.Minute, cwrunBin, s.flags(args...)...)
}

func (s store) podman(t *testing.T, args ...string) string {
	t.Helper()
	return mustRun(t, "podman", s.flags(args...)...)
}

func writeKey(t *testing.T, dir, pass string) string {
	t.Helper()
	p := filepath.Join(dir, "key")
	if err := os.WriteFile(p, []byte(pass), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}
