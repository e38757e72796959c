// Package luks writes and reads LUKS1 and LUKS2 encrypted volumes in pure
// Go, so that cwrun can seal a disk on a host without cryptsetup and the
// static guest init can unlock one without cryptsetup or libc.
//
// It supports exactly what cwrun's sealed disks need: aes-xts-plain64 with
// a PBKDF2 keyslot and the LUKS1 anti-forensic splitter, the layout that
// `buildah mkcw` writes (LUKS1) and cwrun's default (LUKS2). Everything
// else is refused with an *UnsupportedError that names the feature.
//
// It must never write a volume key or passphrase anywhere but into the
// caller's memory, never log secrets, and never import anything beyond the
// standard library and golang.org/x: it is linked into the CGO_ENABLED=0
// guest init. Headers read from disk are hostile input: the parser bounds
// every size it reads before allocating.
package luks

import (
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"strings"
)

// ErrWrongPassphrase is returned by Open when no keyslot opens with the
// given passphrase.
var ErrWrongPassphrase = errors.New("luks: no keyslot opens with this passphrase")

// ErrNotLUKS is returned when a header does not start with the LUKS magic.
var ErrNotLUKS = errors.New("luks: not a LUKS volume (bad magic)")

// UnsupportedError says which LUKS feature a volume uses that cwrun does not
// implement. Callers test for it with errors.As.
type UnsupportedError struct {
	Feature string // what, e.g. "keyslot 0 kdf argon2id"
	Detail  string // why or what cwrun supports instead
}

func (e *UnsupportedError) Error() string {
	if e.Detail == "" {
		return "luks: unsupported: " + e.Feature
	}
	return "luks: unsupported: " + e.Feature + "; " + e.Detail
}

// FormatError reports a structurally invalid header (bad checksum, sizes out
// of range, inconsistent fields): the volume is corrupt or not meant for a
// LUKS reader.
type FormatError struct {
	What string
}

func (e *FormatError) Error() string { return "luks: invalid header: " + e.What }

func formatErr(format string, args ...any) error {
	return &FormatError{What: fmt.Sprintf(format, args...)}
}

// Params chooses how New lays out a volume. The zero value gives cwrun's
// defaults.
type Params struct {
	// Version is 1 or 2. Default 2.
	Version int
	// SectorSize is the encryption sector size in bytes, 512 or 4096, for
	// LUKS2. Default 4096. LUKS1 always uses 512 and rejects anything else.
	SectorSize int
	// Iterations is the PBKDF2-SHA256 iteration count of the keyslot and of
	// the volume key digest. Default 1000, the minimum cryptsetup accepts:
	// cwrun's passphrases are 256 random bits, so key stretching buys
	// nothing and would slow every boot.
	Iterations int
	// Rand is the source of the volume key, salts, UUID and AF stripes.
	// Default crypto/rand.Reader. Only tests should set it.
	Rand io.Reader
	// UUID is the volume UUID in its 36-character text form. Default
	// random (version 4).
	UUID string
}

// Info describes a volume as its header declares it. No secret is in it.
type Info struct {
	Version       int    // 1 or 2
	Cipher        string // "aes"
	Mode          string // "xts-plain64"
	KeyBits       int    // volume key size in bits, 512 for cwrun
	Hash          string // LUKS1: the header's hash spec; LUKS2: the hash of the segment's digest
	SectorSize    int    // encryption sector size in bytes
	PayloadOffset int64  // bytes from the start of the device to payload byte 0
	PayloadSize   int64  // bytes; 0 means "to the end of the device" (always for LUKS1, "dynamic" for LUKS2)
	UUID          string
	Keyslots      int // number of active keyslots
	Iterations    int // PBKDF2 iterations of the first active keyslot; 0 if it is not PBKDF2
}

// CipherSpec is the cipher in dm-crypt's notation, e.g. "aes-xts-plain64",
// for building a dm-crypt table.
func (i Info) CipherSpec() string {
	return i.Cipher + "-" + i.Mode
}

const (
	defaultIterations = 1000
	volumeKeyBytes    = 64 // aes-xts with two AES-256 keys
	afStripes         = 4000
	saltBytes         = 32
	cipherName        = "aes"
	cipherMode        = "xts-plain64"
	cipherSpec        = "aes-xts-plain64"
	hashName          = "sha256"
)

// Volume is an unlocked (or freshly made) LUKS volume: it holds the volume
// key. Call Wipe when done with it. A Volume is safe for concurrent use by
// several goroutines, except Wipe.
type Volume struct {
	info   Info
	key    []byte
	xts    *xtsCipher
	header []byte // nil for volumes from Open
}

// New makes a fresh random volume key and a header that protects it with
// passphrase, for a payload of payloadSize bytes. payloadSize must be a
// positive multiple of the encryption sector size. LUKS2 headers record
// payloadSize as the segment's fixed size, because a sealed disk carries a
// footer after the payload that must not be decrypted as data.
func New(passphrase []byte, payloadSize int64, p Params) (*Volume, error) {
	if len(passphrase) == 0 {
		return nil, errors.New("luks: new volume: empty passphrase; pass the key broker's passphrase")
	}
	if p.Version == 0 {
		p.Version = 2
	}
	if p.Iterations == 0 {
		p.Iterations = defaultIterations
	}
	if p.Iterations < 1 || p.Iterations > 1<<32-1 {
		return nil, fmt.Errorf("luks: new volume: iterations %d out of range 1..2^32-1", p.Iterations)
	}
	if p.Rand == nil {
		p.Rand = rand.Reader
	}
	switch p.Version {
	case 1:
		if p.SectorSize != 0 && p.SectorSize != 512 {
			return nil, fmt.Errorf("luks: new volume: LUKS1 has 512-byte sectors only, not %d; use Version 2 for %d-byte sectors", p.SectorSize, p.SectorSize)
		}
		p.SectorSize = 512
	case 2:
		if p.SectorSize == 0 {
			p.SectorSize = 4096
		}
		if p.SectorSize != 512 && p.SectorSize != 4096 {
			return nil, fmt.Errorf("luks: new volume: sector size %d: use 512 or 4096", p.SectorSize)
		}
	default:
		return nil, fmt.Errorf("luks: new volume: version %d: use 1 or 2", p.Version)
	}
	if payloadSize <= 0 || payloadSize%int64(p.SectorSize) != 0 {
		return nil, fmt.Errorf("luks: new volume: payload size %d is not a positive multiple of the %d-byte sector size; round it up to %d",
			payloadSize, p.SectorSize, roundUp(max(payloadSize, 1), int64(p.SectorSize)))
	}
	if p.UUID == "" {
		u, err := newUUID(p.Rand)
		if err != nil {
			return nil, err
		}
		p.UUID = u
	} else if len(p.UUID) >= 40 {
		return nil, fmt.Errorf("luks: new volume: UUID %q longer than the header's 39 characters", p.UUID)
	}

	key := make([]byte, volumeKeyBytes)
	if _, err := io.ReadFull(p.Rand, key); err != nil {
		return nil, fmt.Errorf("luks: new volume: reading random volume key: %w", err)
	}
	var hdr []byte
	var err error
	if p.Version == 1 {
		hdr, err = makeLUKS1(passphrase, key, p)
	} else {
		hdr, err = makeLUKS2(passphrase, key, payloadSize, p)
	}
	if err != nil {
		clear(key)
		return nil, err
	}
	c, err := newXTS(key)
	if err != nil {
		clear(key)
		return nil, err
	}
	info := Info{
		Version:       p.Version,
		Cipher:        cipherName,
		Mode:          cipherMode,
		KeyBits:       volumeKeyBytes * 8,
		Hash:          hashName,
		SectorSize:    p.SectorSize,
		PayloadOffset: int64(len(hdr)),
		UUID:          p.UUID,
		Keyslots:      1,
		Iterations:    p.Iterations,
	}
	if p.Version == 2 {
		info.PayloadSize = payloadSize
	}
	return &Volume{info: info, key: key, xts: c, header: hdr}, nil
}

// Header returns a copy of the bytes to write at offset 0 of the device:
// binary headers, JSON areas and keyslot areas, exactly PayloadOffset()
// bytes. It returns nil for a Volume from Open, whose header is on disk.
func (v *Volume) Header() []byte {
	if v.header == nil {
		return nil
	}
	return append([]byte(nil), v.header...)
}

// PayloadOffset is the byte offset of payload byte 0 on the device.
func (v *Volume) PayloadOffset() int64 { return v.info.PayloadOffset }

// Info describes the volume; it is what Parse returns for its header.
func (v *Volume) Info() Info { return v.info }

// VolumeKey returns a copy of the volume key, which is what a dm-crypt table
// needs. The caller owns the copy and must clear it (clear(key)) as soon as
// it is handed on: it unlocks the whole disk.
func (v *Volume) VolumeKey() []byte {
	return append([]byte(nil), v.key...)
}

// Wipe zeroes the volume key held by v and drops the cipher. The AES key
// schedules inside crypto/aes cannot be zeroed from outside; dropping the
// last reference is the best Go allows. v is unusable afterwards.
func (v *Volume) Wipe() {
	clear(v.key)
	v.key = nil
	v.xts = nil
}

// Parse reads and validates a LUKS1 or LUKS2 header from r without a
// passphrase, for `cwrun inspect` and for checks before unlocking.
func Parse(r io.ReaderAt) (Info, error) {
	h, err := parseHeader(r)
	if err != nil {
		return Info{}, err
	}
	return h.info, nil
}

// Open parses the header from r and unlocks the volume key with passphrase,
// trying every keyslot. It returns ErrWrongPassphrase (possibly joined with
// an *UnsupportedError for keyslots it could not try) when none opens. Open
// accepts any PBKDF2 iteration count: disks from `buildah mkcw` carry about
// 2.3 million, which costs seconds.
func Open(r io.ReaderAt, passphrase []byte) (*Volume, error) {
	return open(r, passphrase, 0)
}

// open is Open with an optional cap on PBKDF2 iterations (0 = none), so that
// fuzzing cannot stall on hostile iteration counts.
func open(r io.ReaderAt, passphrase []byte, maxIter int) (*Volume, error) {
	h, err := parseHeader(r)
	if err != nil {
		return nil, err
	}
	if h.info.Cipher != cipherName || h.info.Mode != cipherMode {
		return nil, &UnsupportedError{Feature: "payload cipher " + h.info.CipherSpec(), Detail: "cwrun reads only aes-xts-plain64 volumes"}
	}
	key, err := h.unlock(r, passphrase, maxIter)
	if err != nil {
		return nil, err
	}
	c, err := newXTS(key)
	if err != nil {
		clear(key)
		return nil, err
	}
	return &Volume{info: h.info, key: key, xts: c}, nil
}

func roundUp(n, m int64) int64 { return (n + m - 1) / m * m }

func newUUID(r io.Reader) (string, error) {
	var b [16]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return "", fmt.Errorf("luks: new volume: reading random UUID: %w", err)
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16]), nil
}

// splitSpec splits dm-crypt notation "aes-xts-plain64" into "aes" and
// "xts-plain64".
func splitSpec(spec string) (string, string) {
	c, m, _ := strings.Cut(spec, "-")
	return c, m
}
