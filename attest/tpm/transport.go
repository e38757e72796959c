package tpm

import (
	"encoding/binary"
	"fmt"
	"io"
	"sync"
)

// maxResponse bounds a TPM response (TPM 2.0 implementations use at most
// a few KiB; the PC Client profile's MAX_COMMAND_SIZE is 4096).
const maxResponse = 1 << 16

// streamTPM speaks raw TPM 2.0 commands over a byte stream (swtpm's
// server socket, a vsock, a pipe). go-tpm's own ReadWriter wrapper reads
// the response with one Read, which a socket may split; this reads the
// header, then exactly the size the header announces.
type streamTPM struct {
	mu sync.Mutex
	rw io.ReadWriter
}

func (s *streamTPM) Send(cmd []byte) ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, err := s.rw.Write(cmd); err != nil {
		return nil, fmt.Errorf("writing a TPM command: %w", err)
	}
	// Response header: tag u16, responseSize u32, responseCode u32.
	hdr := make([]byte, 10)
	if _, err := io.ReadFull(s.rw, hdr); err != nil {
		return nil, fmt.Errorf("reading a TPM response header: %w", err)
	}
	size := binary.BigEndian.Uint32(hdr[2:])
	if size < 10 || size > maxResponse {
		return nil, fmt.Errorf("TPM response announces %d bytes", size)
	}
	rsp := make([]byte, size)
	copy(rsp, hdr)
	if _, err := io.ReadFull(s.rw, rsp[10:]); err != nil {
		return nil, fmt.Errorf("reading a TPM response: %w", err)
	}
	return rsp, nil
}
