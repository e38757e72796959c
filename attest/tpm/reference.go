package tpm

import (
	"bytes"
	"crypto/sha256"
	"debug/pe"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"unicode/utf16"
)

// DirectBoot is a guest that QEMU boots through UEFI firmware (OVMF) on
// a q35 machine with -kernel, -initrd and -append. Its ReferenceValues
// are what that boot measures, computed without booting it, so that a
// broker can be told what to expect when the image is sealed.
//
// What gets measured, as checked against swtpm event logs of QEMU 7.2
// with Debian's OVMF and a 6.1 kernel:
//   - PCR 4: the kernel's Authenticode (PE) digest, when OVMF starts it.
//     OVMF hashes the kernel as QEMU hands it over, which is not the
//     file: QEMU's x86 loader writes the loader type, heap end, command
//     line address and the initrd's address and size into the boot
//     header, and the initrd's address depends on the guest's RAM. So
//     the kernel digest depends on the initrd's size and the memory.
//   - PCR 9 (by the kernel's EFI stub): the load options, which OVMF
//     makes from the command line and " initrd=initrd" in UTF-16 with
//     its terminating NUL; then the initrd's plain SHA-256.
type DirectBoot struct {
	// Kernel and Initrd are the files given to QEMU.
	Kernel, Initrd string
	// Cmdline is QEMU's -append.
	Cmdline string
	// MemoryMiB is the guest's RAM (-m).
	MemoryMiB int
}

// Reference value names, as the verifier's claims carry them.
const (
	ClaimKernelDigest  = "kernel_digest"
	ClaimInitrdDigest  = "initrd_digest"
	ClaimCmdlineDigest = "cmdline_digest"
)

// ReferenceValues returns the digests a DirectBoot measures, by claim
// name: kernel_digest, initrd_digest and cmdline_digest, and the values
// PCR 4 and PCR 9 end with (pcr4, pcr9) when OVMF measures nothing else
// into them.
func (b DirectBoot) ReferenceValues() (map[string]string, error) {
	if b.MemoryMiB <= 0 {
		return nil, errors.New("tpm reference values: the guest's memory size is needed (QEMU writes the initrd's address, which depends on it, into the measured kernel header)")
	}
	initrd, err := os.Open(b.Initrd)
	if err != nil {
		return nil, fmt.Errorf("tpm reference values: %w", err)
	}
	defer initrd.Close()
	ih := sha256.New()
	initrdSize, err := io.Copy(ih, initrd)
	if err != nil {
		return nil, fmt.Errorf("tpm reference values: reading %s: %w", b.Initrd, err)
	}
	kernel, err := os.ReadFile(b.Kernel)
	if err != nil {
		return nil, fmt.Errorf("tpm reference values: %w", err)
	}
	patched, err := qemuBootHeader(kernel, initrdSize, uint64(b.MemoryMiB)<<20)
	if err != nil {
		return nil, fmt.Errorf("tpm reference values: kernel %s: %w", b.Kernel, err)
	}
	kd, err := Authenticode(patched)
	if err != nil {
		return nil, fmt.Errorf("tpm reference values: kernel %s: %w", b.Kernel, err)
	}
	cd := sha256.Sum256(loadOptions(b.Cmdline + " initrd=initrd"))
	return bootReferences(kd, ih.Sum(nil), cd[:]), nil
}

// bootReferences names the digests of a direct boot and computes the
// PCRs they end in: PCR 4 holds the kernel (measured when OVMF loads
// it), the "calling the boot option" action (when it starts it) and the
// separator; PCR 9 the stub's load options, then the initrd.
func bootReferences(kernel, initrd, cmdline []byte) map[string]string {
	zero := make([]byte, sha256.Size)
	action := sha256.Sum256([]byte("Calling EFI Application from Boot Option"))
	separator := sha256.Sum256([]byte{0, 0, 0, 0})
	pcr4 := extend(extend(extend(zero, kernel), action[:]), separator[:])
	pcr9 := extend(extend(zero, cmdline), initrd)
	return map[string]string{
		ClaimKernelDigest:  hex.EncodeToString(kernel),
		ClaimInitrdDigest:  hex.EncodeToString(initrd),
		ClaimCmdlineDigest: hex.EncodeToString(cmdline),
		"pcr4":             hex.EncodeToString(pcr4),
		"pcr9":             hex.EncodeToString(pcr9),
	}
}

func extend(pcr, digest []byte) []byte {
	h := sha256.New()
	h.Write(pcr)
	h.Write(digest)
	return h.Sum(nil)
}

// loadOptions encodes s as UEFI load options: UCS-2, little endian,
// NUL-terminated.
func loadOptions(s string) []byte {
	u := utf16.Encode([]rune(s))
	out := make([]byte, 0, 2*len(u)+2)
	for _, c := range u {
		out = binary.LittleEndian.AppendUint16(out, c)
	}
	return append(out, 0, 0)
}

// Linux x86 boot protocol offsets (Documentation/arch/x86/boot.rst).
const (
	hdrTypeOfLoader = 0x210
	hdrLoadFlags    = 0x211
	hdrRamdiskImage = 0x218
	hdrRamdiskSize  = 0x21c
	hdrHeapEndPtr   = 0x224
	hdrCmdLinePtr   = 0x228
	hdrInitrdMax    = 0x22c
	hdrXLoadFlags   = 0x236
	hdrMagic        = 0x202
	hdrVersion      = 0x206

	xlfCanBeLoadedAbove4G = 1 << 1
	canUseHeap            = 0x80
	// qemuLoader is QEMU's type_of_loader (high nibble B, revision 0).
	qemuLoader = 0xb0
	// QEMU's addresses for a "high and recent" kernel (protocol >= 2.02).
	qemuRealAddr    = 0x10000
	qemuCmdlineAddr = 0x20000
	// qemuACPIDataSize is the RAM QEMU keeps for ACPI tables at the top
	// of low memory (pc/q35 machine types since 2.x).
	qemuACPIDataSize = 0x20000 + 0x8000
)

// qemuBootHeader returns kernel with the boot header edits QEMU's x86
// loader (hw/i386/x86.c, x86_load_linux, QEMU 7.2) makes before it
// hands the kernel to the firmware, for a q35 machine with mem bytes of
// RAM and an initrd of initrdSize bytes.
func qemuBootHeader(kernel []byte, initrdSize int64, mem uint64) ([]byte, error) {
	if len(kernel) < 0x300 || binary.LittleEndian.Uint32(kernel[hdrMagic:]) != 0x53726448 { // "HdrS"
		return nil, errors.New("not a Linux x86 bzImage (no HdrS boot header)")
	}
	version := binary.LittleEndian.Uint16(kernel[hdrVersion:])
	if version < 0x202 || kernel[hdrLoadFlags]&1 == 0 {
		return nil, fmt.Errorf("boot protocol %d.%02d or a low kernel: QEMU loads those at other addresses, which cwrun does not model", version>>8, version&0xff)
	}
	out := bytes.Clone(kernel)
	// q35 keeps RAM below 4 GiB up to 2.75 GiB, else puts 2 GiB there.
	below4G := mem
	if mem >= 0xb0000000 {
		below4G = 0x80000000
	}
	initrdMax := uint64(0xffffffff)
	if version < 0x20c || binary.LittleEndian.Uint16(out[hdrXLoadFlags:])&xlfCanBeLoadedAbove4G == 0 {
		initrdMax = uint64(binary.LittleEndian.Uint32(out[hdrInitrdMax:]))
	}
	if initrdMax >= below4G-qemuACPIDataSize {
		initrdMax = below4G - qemuACPIDataSize - 1
	}
	binary.LittleEndian.PutUint32(out[hdrCmdLinePtr:], qemuCmdlineAddr)
	out[hdrTypeOfLoader] = qemuLoader
	out[hdrLoadFlags] |= canUseHeap
	binary.LittleEndian.PutUint16(out[hdrHeapEndPtr:], qemuCmdlineAddr-qemuRealAddr-0x200)
	if initrdSize > 0 {
		if uint64(initrdSize) >= initrdMax {
			return nil, fmt.Errorf("an initrd of %d bytes does not fit below %#x", initrdSize, initrdMax)
		}
		addr := (initrdMax - uint64(initrdSize)) &^ 4095
		binary.LittleEndian.PutUint32(out[hdrRamdiskImage:], uint32(addr))
		binary.LittleEndian.PutUint32(out[hdrRamdiskSize:], uint32(initrdSize))
	}
	return out, nil
}

// Authenticode returns the SHA-256 Authenticode digest of a PE image,
// as UEFI firmware measures an EFI application: the headers without the
// checksum and the certificate table entry, the sections in file order,
// then any data after them except the certificate table.
func Authenticode(img []byte) ([]byte, error) {
	f, err := pe.NewFile(bytes.NewReader(img))
	if err != nil {
		return nil, fmt.Errorf("not a PE image: %w", err)
	}
	if len(img) < 0x40 {
		return nil, errors.New("PE image too short")
	}
	opt := int(binary.LittleEndian.Uint32(img[0x3c:])) + 4 + 20 // PE signature + COFF header
	var dirs, sizeOfHeaders int
	var cert pe.DataDirectory
	switch oh := f.OptionalHeader.(type) {
	case *pe.OptionalHeader64:
		dirs, sizeOfHeaders = opt+112, int(oh.SizeOfHeaders)
		if oh.NumberOfRvaAndSizes > 4 {
			cert = oh.DataDirectory[4]
		}
	case *pe.OptionalHeader32:
		dirs, sizeOfHeaders = opt+96, int(oh.SizeOfHeaders)
		if oh.NumberOfRvaAndSizes > 4 {
			cert = oh.DataDirectory[4]
		}
	default:
		return nil, errors.New("PE image without an optional header")
	}
	checksum, certEntry := opt+64, dirs+4*8
	if certEntry+8 > sizeOfHeaders || sizeOfHeaders > len(img) {
		return nil, errors.New("PE headers are truncated")
	}
	h := sha256.New()
	h.Write(img[:checksum])
	h.Write(img[checksum+4 : certEntry])
	h.Write(img[certEntry+8 : sizeOfHeaders])
	secs := slices.Clone(f.Sections)
	slices.SortFunc(secs, func(a, b *pe.Section) int { return int(a.Offset) - int(b.Offset) })
	hashed := sizeOfHeaders
	for _, s := range secs {
		if s.Size == 0 {
			continue
		}
		end := int(s.Offset) + int(s.Size)
		if int(s.Offset) < 0 || end > len(img) || end < int(s.Offset) {
			return nil, fmt.Errorf("PE section %s runs past the end of the image", s.Name)
		}
		h.Write(img[s.Offset:end])
		hashed += int(s.Size)
	}
	if rest := len(img) - int(cert.Size); rest > hashed {
		h.Write(img[hashed:rest])
	}
	return h.Sum(nil), nil
}
