package vm

import (
	"errors"
	"strings"
	"testing"
)

func TestParseAccel(t *testing.T) {
	for in, want := range map[string]Accel{"": AccelAuto, "auto": AccelAuto, "kvm": AccelKVM, "tcg": AccelTCG} {
		if got, err := ParseAccel(in); err != nil || got != want {
			t.Errorf("%q: %q, %v", in, got, err)
		}
	}
	if _, err := ParseAccel("hvf"); err == nil {
		t.Error("hvf accepted")
	}
}

// TestResolve checks each accelerator against what this host's KVM
// really is (on this project's hosts: PVM, so unusable).
func TestResolve(t *testing.T) {
	kvmErr := ProbeKVM()
	if kvmErr != nil && !errors.Is(kvmErr, ErrKVMUnusable) {
		t.Fatalf("ProbeKVM: %v does not wrap ErrKVMUnusable", kvmErr)
	}
	if a, warn, err := AccelTCG.Resolve(); a != AccelTCG || warn != "" || err != nil {
		t.Errorf("tcg: %q %q %v", a, warn, err)
	}
	a, warn, err := AccelAuto.Resolve()
	if err != nil {
		t.Fatalf("auto: %v", err)
	}
	if kvmErr != nil {
		if a != AccelTCG || !strings.Contains(warn, "falling back to TCG") || strings.Contains(warn, "\n") {
			t.Errorf("auto without usable KVM: %q, warning %q (want tcg and one line)", a, warn)
		}
		if _, _, err := AccelKVM.Resolve(); err == nil || !strings.Contains(err.Error(), "--accel tcg") {
			t.Errorf("kvm without usable KVM: %v", err)
		}
	} else if a != AccelKVM || warn != "" {
		t.Errorf("auto with usable KVM: %q %q", a, warn)
	}
}
