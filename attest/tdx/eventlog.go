package tdx

import (
	"bytes"
	"crypto/sha512"
	"encoding/binary"
	"errors"
	"fmt"
)

// The CC event log (the ACPI CCEL table's data, UEFI 2.10 §38.4) is a
// TCG2 "crypto agile" log: one TCG_PCR_EVENT carrying the Spec ID event
// that lists the digest algorithms, then TCG_PCR_EVENT2 records whose
// index is the measurement register they extended: 0 MRTD, 1-4 RTMR0-3.
// Replaying it gives the RTMRs the quote must hold.

const (
	evNoAction   = 0x00000003
	algSHA384    = 0x000C
	rtmrCount    = 4
	rtmrSize     = sha512.Size384
	maxEvents    = 1 << 16
	maxEventSize = 1 << 24
)

var specIDSignature = []byte("Spec ID Event03\x00")

// eventLog is a replayed CC event log.
type eventLog struct {
	RTMR [rtmrCount][rtmrSize]byte
	// Extended says which RTMRs any event extended.
	Extended [rtmrCount]bool
	Events   int
}

type reader struct {
	b   []byte
	off int
}

var errShort = errors.New("the event log ends inside an event")

func (r *reader) u16() (uint16, error) {
	if len(r.b)-r.off < 2 {
		return 0, errShort
	}
	v := binary.LittleEndian.Uint16(r.b[r.off:])
	r.off += 2
	return v, nil
}

func (r *reader) u32() (uint32, error) {
	if len(r.b)-r.off < 4 {
		return 0, errShort
	}
	v := binary.LittleEndian.Uint32(r.b[r.off:])
	r.off += 4
	return v, nil
}

func (r *reader) bytes(n uint32) ([]byte, error) {
	if uint64(len(r.b)-r.off) < uint64(n) {
		return nil, errShort
	}
	v := r.b[r.off : r.off+int(n)]
	r.off += int(n)
	return v, nil
}

// replayEventLog parses a CC event log and replays its SHA-384 digests
// into RTMR values.
func replayEventLog(data []byte) (*eventLog, error) {
	r := &reader{b: data}
	// The first event is in the SHA-1 TCG_PCR_EVENT format and carries
	// the Spec ID event: which algorithms each later event has, and
	// their digest sizes.
	if _, err := r.u32(); err != nil {
		return nil, fmt.Errorf("no Spec ID event: %w", err)
	}
	if typ, err := r.u32(); err != nil || typ != evNoAction {
		return nil, errors.New("the event log does not start with a Spec ID event")
	}
	if _, err := r.bytes(20); err != nil {
		return nil, err
	}
	size, err := r.u32()
	if err != nil {
		return nil, err
	}
	spec, err := r.bytes(size)
	if err != nil {
		return nil, err
	}
	sizes, err := parseSpecID(spec)
	if err != nil {
		return nil, err
	}

	log := &eventLog{}
	for r.off < len(data) {
		// The CCEL area is larger than its log; the rest is 0xFF (or
		// zero) filled.
		if rest := data[r.off:]; len(rest) < 8 || isFill(rest[:8]) {
			break
		}
		if log.Events >= maxEvents {
			return nil, fmt.Errorf("the event log has more than %d events", maxEvents)
		}
		index, _ := r.u32()
		typ, _ := r.u32()
		count, err := r.u32()
		if err != nil {
			return nil, err
		}
		if count == 0 || int(count) > len(sizes) {
			return nil, fmt.Errorf("event %d has %d digests, the Spec ID event lists %d algorithms", log.Events, count, len(sizes))
		}
		var sha384 []byte
		for i := uint32(0); i < count; i++ {
			alg, err := r.u16()
			if err != nil {
				return nil, err
			}
			n, ok := sizes[alg]
			if !ok {
				return nil, fmt.Errorf("event %d has a digest of algorithm %#04x, which the Spec ID event does not list", log.Events, alg)
			}
			d, err := r.bytes(uint32(n))
			if err != nil {
				return nil, err
			}
			if alg == algSHA384 {
				sha384 = d
			}
		}
		size, err := r.u32()
		if err != nil {
			return nil, err
		}
		if size > maxEventSize {
			return nil, fmt.Errorf("event %d claims %d bytes of data", log.Events, size)
		}
		if _, err := r.bytes(size); err != nil {
			return nil, err
		}
		log.Events++
		if typ == evNoAction {
			continue // informational: extends nothing
		}
		if index < 1 || index > rtmrCount {
			return nil, fmt.Errorf("event %d extends measurement register %d; a TD event log extends RTMR0-3 (indices 1-4)", log.Events-1, index)
		}
		if sha384 == nil {
			return nil, fmt.Errorf("event %d has no SHA-384 digest", log.Events-1)
		}
		mr := &log.RTMR[index-1]
		h := sha512.New384()
		h.Write(mr[:])
		h.Write(sha384)
		h.Sum(mr[:0])
		log.Extended[index-1] = true
	}
	return log, nil
}

// parseSpecID reads TCG_EfiSpecIDEvent's digest sizes by algorithm.
func parseSpecID(spec []byte) (map[uint16]uint16, error) {
	r := &reader{b: spec}
	sig, err := r.bytes(16)
	if err != nil || !bytes.Equal(sig, specIDSignature) {
		return nil, errors.New(`the first event is not a "Spec ID Event03": not a crypto-agile event log`)
	}
	// platformClass u32, specVersionMinor, specVersionMajor, specErrata,
	// uintnSize: one byte each.
	if _, err := r.bytes(8); err != nil {
		return nil, err
	}
	n, err := r.u32()
	if err != nil {
		return nil, err
	}
	if n == 0 || n > 16 {
		return nil, fmt.Errorf("the Spec ID event lists %d algorithms", n)
	}
	sizes := map[uint16]uint16{}
	for i := uint32(0); i < n; i++ {
		alg, err := r.u16()
		if err != nil {
			return nil, err
		}
		size, err := r.u16()
		if err != nil {
			return nil, err
		}
		if size == 0 || size > 64 {
			return nil, fmt.Errorf("the Spec ID event gives algorithm %#04x a %d-byte digest", alg, size)
		}
		sizes[alg] = size
	}
	if sizes[algSHA384] != rtmrSize {
		return nil, errors.New("the event log has no SHA-384 digests, which RTMRs need")
	}
	return sizes, nil
}

func isFill(b []byte) bool {
	return bytes.Equal(b, []byte{0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF}) ||
		bytes.Equal(b, make([]byte, len(b)))
}
