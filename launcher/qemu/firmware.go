package qemu

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/cwrun/cwrun/launcher/vm"
)

// ovmfPairs are the UEFI builds cwrun boots, best first: Debian's
// ovmf package ships the 4 MiB pair, older releases the 2 MiB one. Both
// halves of a pair must come from the same build.
var ovmfPairs = [][2]string{
	{"/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"},
	{"/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"},
}

// ErrNoFirmware says no UEFI firmware is installed.
var ErrNoFirmware = errors.New("UEFI firmware (OVMF) not found in /usr/share/OVMF: install Debian's ovmf package (apt-get install ovmf)")

// OVMF finds the UEFI firmware and gives the machine its own copy of
// the variable store in dir, so that no two machines, and never the
// distribution's template, share one.
func OVMF(dir string) (*vm.Firmware, error) {
	for _, p := range ovmfPairs {
		if _, err := os.Stat(p[0]); err != nil {
			continue
		}
		if _, err := os.Stat(p[1]); err != nil {
			continue
		}
		vars := filepath.Join(dir, "efivars.fd")
		if err := copyFile(p[1], vars); err != nil {
			return nil, fmt.Errorf("copying the UEFI variable store %s: %w", p[1], err)
		}
		return &vm.Firmware{Code: p[0], Vars: vars}, nil
	}
	return nil, ErrNoFirmware
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
