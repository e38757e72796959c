package tests

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// The unit files in contrib/systemd are what operators copy: systemd's
// own checker must find nothing to say about them (unknown keys and
// bad values are only warnings to systemd, so any output fails), with
// the binaries where this build put them.
func TestSystemdUnits(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Fatal("systemd-analyze not found: hack/deps.sh installs it (Debian package systemd)")
	}
	units, _ := filepath.Glob("../contrib/systemd/*")
	if len(units) < 3 {
		t.Fatalf("contrib/systemd holds %d units, want the broker's service and its backup service and timer", len(units))
	}
	dir := t.TempDir()
	var args []string
	for _, u := range units {
		data, err := os.ReadFile(u)
		if err != nil {
			t.Fatal(err)
		}
		text := strings.ReplaceAll(string(data), "/usr/local/bin/cwrun", cwrunBin)
		if !strings.Contains(string(data), "/usr/local/bin/cwrun") && strings.HasSuffix(u, ".service") {
			t.Errorf("%s does not run /usr/local/bin/cwrun", u)
		}
		p := filepath.Join(dir, filepath.Base(u))
		if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		args = append(args, p)
	}
	out, err := exec.Command(analyze, append([]string{"verify", "--man=no"}, args...)...).CombinedOutput()
	if err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
}
