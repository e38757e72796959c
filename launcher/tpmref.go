package launcher

import (
	"context"
	"fmt"

	"github.com/cwrun/cwrun/attest/tpm"
)

// TPMReferenceValues returns what a broker must expect from a tpm run of
// an image sealed for memMiB of RAM (0: the launcher's default): the
// digests of the kernel, initrd and command line that TPMBoot names, as
// OVMF and the kernel's EFI stub measure them, and the PCR 4 and 9 they
// end in. They are computed, not recorded from a boot; see
// tpm.DirectBoot for what that takes.
func TPMReferenceValues(ctx context.Context, opts Options, memMiB int) (map[string]string, error) {
	if memMiB == 0 {
		memMiB = defaultMemoryMiB
	}
	k, i, c, err := TPMBoot(ctx, opts)
	if err != nil {
		return nil, err
	}
	refs, err := tpm.DirectBoot{Kernel: k, Initrd: i, Cmdline: c, MemoryMiB: memMiB}.ReferenceValues()
	if err != nil {
		return nil, fmt.Errorf("computing the TPM reference values: %w", err)
	}
	return refs, nil
}
