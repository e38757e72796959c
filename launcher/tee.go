package launcher

import (
	"fmt"
	"os"
	"strings"

	"github.com/cwrun/cwrun/sealed"
)

// teeHost says whether this host can launch a guest of the TEE an image
// was sealed for, when its key is to come from attestation. A passphrase
// given on the host (development mode) boots any image as a plain VM:
// the host holds the key then anyway.
func teeHost(t sealed.TEE, sysfs string) error {
	var what, param, dev string
	switch t {
	case sealed.TEESNP:
		what, param, dev = "AMD SEV-SNP", "module/kvm_amd/parameters/sev_snp", "/dev/sev"
	case sealed.TEETDX:
		what, param = "Intel TDX", "module/kvm_intel/parameters/tdx"
	default:
		return nil
	}
	b, err := os.ReadFile(sysfs + "/" + param)
	on := err == nil && (strings.TrimSpace(string(b)) == "Y" || strings.TrimSpace(string(b)) == "1")
	if dev != "" {
		if _, err := os.Stat(dev); err != nil {
			on = false
		}
	}
	if !on {
		return fmt.Errorf("the image is sealed for %s and its key is released only to a genuine %s guest, but this host has no %s (/sys/%s is not on): run it on a host with %s, or, for development, seal with --tee sample or pass --passphrase-file", t, what, what, param, what)
	}
	return fmt.Errorf("the image is sealed for %s: this host has %s, but cwrun's QEMU backend does not launch %s guests yet", t, what, what)
}
