package attest_test

import (
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// TestGuestDeps keeps what the static guest links small and cgo-free:
// package attest and the in-guest attesters must never pull in the
// broker's policy engine, metrics, databases or image libraries.
func TestGuestDeps(t *testing.T) {
	gobin, err := exec.LookPath("go")
	if err != nil {
		gobin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	forbidden := []string{
		"github.com/open-policy-agent/",
		"github.com/prometheus/",
		"modernc.org/sqlite",
		"github.com/jackc/pgx",
		"go.podman.io/",
		"github.com/cwrun/cwrun/attest/kbs",
		"github.com/cwrun/cwrun/attest/attesttest",
		"github.com/google/go-sev-guest/testing",
		"github.com/google/go-tdx-guest/testing",
		"testing",
	}
	// The attesters' packages are linked by the guest init too.
	for _, pkg := range []string{".", "./sample", "./snp", "./tdx", "./tpm"} {
		cmd := exec.Command(gobin, "list", "-deps", pkg)
		cmd.Env = append(cmd.Environ(), "CGO_ENABLED=0")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("go list -deps %s (CGO_ENABLED=0): %v\n%s", pkg, err, out)
		}
		for _, dep := range strings.Fields(string(out)) {
			for _, f := range forbidden {
				// "x/" names a tree; "x" a package and what lies below it.
				if dep == f || strings.HasPrefix(dep, strings.TrimSuffix(f, "/")+"/") {
					t.Errorf("%s imports %s (via its dependencies); the guest must not carry it", pkg, dep)
				}
			}
		}
	}
}
