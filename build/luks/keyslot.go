package luks

import (
	"crypto/subtle"
	"errors"
	"fmt"
	"hash"
	"io"
)

// Bounds on what a header may make the reader allocate or compute.
const (
	maxKeyBytes = 64 // aes-xts-512; the largest key cryptsetup makes for xts
	afSector    = 512
	// Keyslot material is read in one piece: at most maxKeyBytes*afStripes.
	maxAFBytes = maxKeyBytes * afStripes
)

// keyslot is one parsed keyslot of either version, everything needed to
// try a passphrase on it.
type keyslot struct {
	id           int
	unsupported  error // non-nil: cannot be tried, says why
	kdfHash      string
	iterations   int
	salt         []byte
	keyBytes     int // volume key length
	stripes      int
	afHash       string
	areaOffset   int64
	areaKeyBytes int // key length of the cipher protecting the area
	digest       *digest
}

// digest checks a candidate volume key: PBKDF2(key, salt, iterations)
// must equal value.
type digest struct {
	hash       string
	iterations int
	salt       []byte
	value      []byte
}

// header is a parsed header of either version.
type header struct {
	info     Info
	keyslots []keyslot // active keyslots, in id order
}

// unlock tries passphrase on every keyslot and returns the volume key.
func (h *header) unlock(r io.ReaderAt, passphrase []byte, maxIter int) ([]byte, error) {
	var skipped []error
	tried := 0
	for _, ks := range h.keyslots {
		if ks.unsupported != nil {
			skipped = append(skipped, ks.unsupported)
			continue
		}
		if maxIter > 0 && (ks.iterations > maxIter || ks.digest.iterations > maxIter) {
			skipped = append(skipped, &UnsupportedError{Feature: fmt.Sprintf("keyslot %d iterations %d", ks.id, ks.iterations), Detail: fmt.Sprintf("over this reader's cap of %d", maxIter)})
			continue
		}
		tried++
		key, err := ks.open(r, passphrase)
		if err != nil {
			return nil, err
		}
		if key != nil {
			return key, nil
		}
	}
	switch {
	case tried == 0 && len(skipped) > 0:
		return nil, fmt.Errorf("luks: no keyslot can be tried: %w", errors.Join(skipped...))
	case tried == 0:
		return nil, fmt.Errorf("%w: the header has no active keyslot", ErrWrongPassphrase)
	case len(skipped) > 0:
		return nil, fmt.Errorf("%w (keyslots not tried: %w)", ErrWrongPassphrase, errors.Join(skipped...))
	}
	return nil, ErrWrongPassphrase
}

// open returns the volume key, or nil if passphrase does not open ks.
func (ks *keyslot) open(r io.ReaderAt, passphrase []byte) ([]byte, error) {
	kdfHash, _ := hashFunc(ks.kdfHash)
	afHash, _ := hashFunc(ks.afHash)
	afLen := ks.keyBytes * ks.stripes
	material := make([]byte, roundUp(int64(afLen), afSector))
	defer clear(material)
	if n, err := r.ReadAt(material, ks.areaOffset); n < len(material) {
		if err == nil || errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return nil, fmt.Errorf("luks: reading keyslot %d material (%d bytes at %d): %w; the device is truncated", ks.id, len(material), ks.areaOffset, err)
	}
	dk := pbkdf2Key(kdfHash, passphrase, ks.salt, ks.iterations, ks.areaKeyBytes)
	c, err := newXTS(dk)
	clear(dk)
	if err != nil {
		return nil, fmt.Errorf("luks: keyslot %d: %w", ks.id, err)
	}
	c.cryptSectors(material, 0, afSector, false)
	key := afMerge(material[:afLen], ks.keyBytes, ks.stripes, afHash)
	if !ks.digest.check(key) {
		clear(key)
		return nil, nil
	}
	return key, nil
}

func (d *digest) check(key []byte) bool {
	h, _ := hashFunc(d.hash)
	got := pbkdf2Key(h, key, d.salt, d.iterations, len(d.value))
	defer clear(got)
	return subtle.ConstantTimeCompare(got, d.value) == 1
}

// sealKeyslot AF-splits key, encrypts the stripes with a key derived from
// passphrase and returns the material padded to whole 512-byte sectors.
func sealKeyslot(rnd io.Reader, passphrase, key, salt []byte, iterations int, h func() hash.Hash) ([]byte, error) {
	split, err := afSplit(rnd, key, afStripes, h)
	if err != nil {
		return nil, err
	}
	material := make([]byte, roundUp(int64(len(split)), afSector))
	copy(material, split)
	clear(split)
	dk := pbkdf2Key(h, passphrase, salt, iterations, len(key))
	c, err := newXTS(dk)
	clear(dk)
	if err != nil {
		return nil, err
	}
	c.cryptSectors(material, 0, afSector, true)
	return material, nil
}

func randomBytes(r io.Reader, n int, what string) ([]byte, error) {
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		return nil, fmt.Errorf("luks: new volume: reading random %s: %w", what, err)
	}
	return b, nil
}
