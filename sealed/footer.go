package sealed

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// The footer at the end of disk.img:
//
//	[payload][zero pad][config JSON]["KRUN"][uint64 LE length of the JSON]
//
// libkrun reads it from the last 12 bytes, so the layout is fixed. The
// padding makes the whole file a multiple of 4096 bytes, as buildah's
// disks are: a block device ends on a sector boundary, so only then does
// a guest see the footer's last bytes.
const (
	footerMagic = "KRUN"
	trailerSize = 12
	// MaxConfigSize bounds the JSON a reader accepts from an untrusted
	// disk; real configs are a few hundred bytes.
	MaxConfigSize = 1 << 20
	// Align is what the payload is padded to before the footer.
	Align = 4096
)

// ErrNoFooter says the file does not end with a krun footer.
var ErrNoFooter = errors.New("no krun workload footer (the last 12 bytes are not \"KRUN\" + length)")

// Footer returns the bytes to append after a payload that ends at file
// offset end: zero padding, the config JSON and the trailer, ending on
// an Align boundary.
func Footer(end int64, config []byte) []byte {
	used := end + int64(len(config)) + trailerSize
	pad := (Align - used%Align) % Align
	b := make([]byte, pad, pad+int64(len(config))+trailerSize)
	b = append(b, config...)
	b = append(b, footerMagic...)
	return binary.LittleEndian.AppendUint64(b, uint64(len(config)))
}

// ReadFooter reads the config JSON at the end of a disk of the given
// size, and returns it with the file offset where the JSON starts.
func ReadFooter(r io.ReaderAt, size int64) (config []byte, at int64, err error) {
	if size < trailerSize {
		return nil, 0, fmt.Errorf("disk of %d bytes: %w", size, ErrNoFooter)
	}
	var t [trailerSize]byte
	if _, err := r.ReadAt(t[:], size-trailerSize); err != nil {
		return nil, 0, fmt.Errorf("reading disk footer: %w", err)
	}
	if string(t[:4]) != footerMagic {
		return nil, 0, ErrNoFooter
	}
	n := binary.LittleEndian.Uint64(t[4:])
	if n == 0 || n > MaxConfigSize || int64(n) > size-trailerSize {
		return nil, 0, fmt.Errorf("disk footer claims a %d-byte config in a %d-byte disk: corrupt footer", n, size)
	}
	at = size - trailerSize - int64(n)
	config = make([]byte, n)
	if _, err := r.ReadAt(config, at); err != nil {
		return nil, 0, fmt.Errorf("reading disk footer config: %w", err)
	}
	return config, at, nil
}
