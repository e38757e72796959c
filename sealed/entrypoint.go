package sealed

import "encoding/binary"

// EntrypointMessage is what a sealed image's /entrypoint prints when
// somebody runs the image with an ordinary container runtime.
const EntrypointMessage = "This image is designed to be run as a confidential workload using libkrun.\n"

// Entrypoint returns a minimal static x86-64 Linux executable that
// writes EntrypointMessage to stderr and exits 1, as buildah's does.
// It is generated rather than compiled so that sealing needs no
// toolchain and the layer is byte-for-byte reproducible.
func Entrypoint() []byte {
	const (
		base   = 0x400000
		ehSize = 64
		phSize = 56
		code   = ehSize + phSize
	)
	msg := []byte(EntrypointMessage)
	// write(2, msg, len); exit(1)
	text := []byte{
		0xb8, 0x01, 0x00, 0x00, 0x00, // mov eax, 1 (write)
		0xbf, 0x02, 0x00, 0x00, 0x00, // mov edi, 2
		0x48, 0x8d, 0x35, 0, 0, 0, 0, // lea rsi, [rip+msg]
		0xba, 0, 0, 0, 0, // mov edx, len
		0x0f, 0x05, // syscall
		0xb8, 0x3c, 0x00, 0x00, 0x00, // mov eax, 60 (exit)
		0xbf, 0x01, 0x00, 0x00, 0x00, // mov edi, 1
		0x0f, 0x05, // syscall
	}
	// rip after the lea is at offset 17; msg follows the text.
	binary.LittleEndian.PutUint32(text[13:], uint32(len(text)-17))
	binary.LittleEndian.PutUint32(text[18:], uint32(len(msg)))
	total := code + len(text) + len(msg)

	b := make([]byte, code, total)
	copy(b, "\x7fELF")
	b[4], b[5], b[6] = 2, 1, 1 // 64-bit, little endian, ELF version 1
	le := binary.LittleEndian
	le.PutUint16(b[16:], 2)    // ET_EXEC
	le.PutUint16(b[18:], 0x3e) // x86-64
	le.PutUint32(b[20:], 1)
	le.PutUint64(b[24:], base+code) // entry
	le.PutUint64(b[32:], ehSize)    // program headers
	le.PutUint16(b[52:], ehSize)
	le.PutUint16(b[54:], phSize)
	le.PutUint16(b[56:], 1)
	ph := b[ehSize:]
	le.PutUint32(ph[0:], 1) // PT_LOAD
	le.PutUint32(ph[4:], 5) // R+X
	le.PutUint64(ph[16:], base)
	le.PutUint64(ph[24:], base)
	le.PutUint64(ph[32:], uint64(total))
	le.PutUint64(ph[40:], uint64(total))
	le.PutUint64(ph[48:], 0x1000)
	b = append(b, text...)
	return append(b, msg...)
}
