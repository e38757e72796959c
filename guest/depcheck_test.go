package guest

import (
	"os/exec"
	"strings"
	"testing"
)

// TestDependencies keeps the guest small and out of reach of the host
// side: the init must never link image/storage libraries, cwrun's
// build packages (build/luks, the LUKS reader, excepted) or the broker.
func TestDependencies(t *testing.T) {
	if _, err := exec.LookPath("go"); err != nil {
		t.Skip("needs the go tool")
	}
	for _, pkg := range []string{"github.com/cwrun/cwrun/guest", "github.com/cwrun/cwrun/cmd/cwrun-init"} {
		out, err := exec.Command("go", "list", "-deps", pkg).CombinedOutput()
		if err != nil {
			t.Fatalf("go list -deps %s: %v\n%s", pkg, err, out)
		}
		deps := strings.Fields(string(out))
		if len(deps) < 10 {
			t.Fatalf("go list -deps %s listed only %v", pkg, deps)
		}
		for _, d := range deps {
			if forbidden(d) {
				t.Errorf("%s imports %s (transitively): the guest must not", pkg, d)
			}
		}
	}
}

func forbidden(pkg string) bool {
	for _, p := range []string{"go.podman.io/image", "go.podman.io/storage", "github.com/containers/image", "github.com/containers/storage", "github.com/cwrun/cwrun/attest/kbs"} {
		if pkg == p || strings.HasPrefix(pkg, p+"/") {
			return true
		}
	}
	const build = "github.com/cwrun/cwrun/build"
	if pkg == build || strings.HasPrefix(pkg, build+"/") {
		return pkg != build+"/luks" && !strings.HasPrefix(pkg, build+"/luks/")
	}
	return false
}

func TestForbidden(t *testing.T) {
	for pkg, want := range map[string]bool{
		"go.podman.io/image/v5/types":         true,
		"go.podman.io/storage":                true,
		"github.com/cwrun/cwrun/build":        true,
		"github.com/cwrun/cwrun/build/rootfs": true,
		"github.com/cwrun/cwrun/build/luks":   false,
		"github.com/cwrun/cwrun/attest/kbs":   true,
		"github.com/cwrun/cwrun/attest":       false,
		"github.com/cwrun/cwrun/buildinfo":    false,
		"github.com/cwrun/cwrun/sealed":       false,
		"golang.org/x/sys/unix":               false,
	} {
		if forbidden(pkg) != want {
			t.Errorf("forbidden(%s) = %v", pkg, !want)
		}
	}
}
