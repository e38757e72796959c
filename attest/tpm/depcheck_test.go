package tpm_test

import (
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// TestGuestDeps: the guest's static init links this package (for its
// attester); it must build without cgo and carry no test or broker code.
func TestGuestDeps(t *testing.T) {
	if testing.Short() {
		t.Skip("runs go list")
	}
	gobin, err := exec.LookPath("go")
	if err != nil {
		gobin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	cmd := exec.Command(gobin, "list", "-deps", ".")
	cmd.Env = append(cmd.Environ(), "CGO_ENABLED=0")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps (CGO_ENABLED=0): %v\n%s", err, out)
	}
	for _, dep := range strings.Fields(string(out)) {
		for _, f := range []string{"testing", "github.com/google/go-tpm-tools", "github.com/cwrun/cwrun/attest/kbs", "github.com/cwrun/cwrun/attest/attesttest"} {
			if dep == f || strings.HasPrefix(dep, f+"/") {
				t.Errorf("the package links %s", dep)
			}
		}
	}
}
