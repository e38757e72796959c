package launcher

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cwrun/cwrun/sealed"
)

func TestTEEHost(t *testing.T) {
	sys := t.TempDir()
	for _, tee := range []sealed.TEE{sealed.TEESample, sealed.TEETPM} {
		if err := teeHost(tee, sys); err != nil {
			t.Errorf("%s: %v", tee, err)
		}
	}
	err := teeHost(sealed.TEESNP, sys)
	if err == nil || !strings.Contains(err.Error(), "this host has no AMD SEV-SNP") || !strings.Contains(err.Error(), "--tee sample") {
		t.Errorf("snp on a host without it: %v", err)
	}
	err = teeHost(sealed.TEETDX, sys)
	if err == nil || !strings.Contains(err.Error(), "no Intel TDX") {
		t.Errorf("tdx on a host without it: %v", err)
	}
	p := filepath.Join(sys, "module/kvm_intel/parameters/tdx")
	os.MkdirAll(filepath.Dir(p), 0o755)
	os.WriteFile(p, []byte("Y\n"), 0o644)
	if err := teeHost(sealed.TEETDX, sys); err == nil || !strings.Contains(err.Error(), "does not launch Intel TDX guests yet") {
		t.Errorf("tdx on a host with it: %v", err)
	}
}
