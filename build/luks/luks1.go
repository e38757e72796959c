package luks

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// LUKS1 on-disk layout (LUKS1 On-Disk Format Specification 1.2.3).
const (
	luks1HeaderLen   = 592
	luks1KeyslotsOff = 208
	luks1KeyslotLen  = 48
	luks1NumKeys     = 8
	luks1Active      = 0x00AC71F3
	luks1Inactive    = 0x0000DEAD
	luks1DigestLen   = 20
	// Keyslot areas start and are aligned at 4096 bytes, as cryptsetup
	// lays them out (LUKS_ALIGN_KEYSLOTS).
	luks1AlignSectors = 8
)

var luksMagic = []byte{'L', 'U', 'K', 'S', 0xba, 0xbe}

// luks1Layout returns each keyslot's material offset and the payload offset,
// in 512-byte sectors. All eight keyslot areas must exist even though only
// slot 0 is used: cryptsetup rejects a header whose disabled slots point
// past the payload offset. The result, 4040 sectors, is what cryptsetup
// luksFormat --align-payload 8 writes: the smallest header cryptsetup makes
// that keeps the payload 4096-byte aligned.
func luks1Layout() (slots [luks1NumKeys]uint32, payload uint32) {
	afSectors := uint32(roundUp(volumeKeyBytes*afStripes, afSector) / afSector)
	stride := uint32(roundUp(int64(afSectors), luks1AlignSectors))
	cur := uint32(luks1AlignSectors)
	for i := range slots {
		slots[i] = cur
		cur += stride
	}
	return slots, cur
}

func putString(dst []byte, s string) { copy(dst, s) }

func makeLUKS1(passphrase, key []byte, p Params) ([]byte, error) {
	slots, payload := luks1Layout()
	hdr := make([]byte, int(payload)*afSector)
	copy(hdr[0:], luksMagic)
	binary.BigEndian.PutUint16(hdr[6:], 1)
	putString(hdr[8:40], cipherName)
	putString(hdr[40:72], cipherMode)
	putString(hdr[72:104], hashName)
	binary.BigEndian.PutUint32(hdr[104:], payload)
	binary.BigEndian.PutUint32(hdr[108:], volumeKeyBytes)
	mkSalt, err := randomBytes(p.Rand, saltBytes, "digest salt")
	if err != nil {
		return nil, err
	}
	mkDigest := pbkdf2Key(sha256.New, key, mkSalt, p.Iterations, luks1DigestLen)
	copy(hdr[112:132], mkDigest)
	copy(hdr[132:164], mkSalt)
	binary.BigEndian.PutUint32(hdr[164:], uint32(p.Iterations))
	putString(hdr[168:208], p.UUID)

	salt, err := randomBytes(p.Rand, saltBytes, "keyslot salt")
	if err != nil {
		return nil, err
	}
	for i := range luks1NumKeys {
		ks := hdr[luks1KeyslotsOff+i*luks1KeyslotLen:]
		binary.BigEndian.PutUint32(ks[0:], luks1Inactive)
		binary.BigEndian.PutUint32(ks[40:], slots[i])
		binary.BigEndian.PutUint32(ks[44:], afStripes)
	}
	ks := hdr[luks1KeyslotsOff:]
	binary.BigEndian.PutUint32(ks[0:], luks1Active)
	binary.BigEndian.PutUint32(ks[4:], uint32(p.Iterations))
	copy(ks[8:40], salt)
	material, err := sealKeyslot(p.Rand, passphrase, key, salt, p.Iterations, sha256.New)
	if err != nil {
		return nil, err
	}
	copy(hdr[int(slots[0])*afSector:], material)
	return hdr, nil
}

// cString reads a NUL-padded fixed-size text field.
func cString(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

func parseLUKS1(first []byte) (*header, error) {
	if len(first) < luks1HeaderLen {
		return nil, formatErr("LUKS1 header truncated: %d of %d bytes", len(first), luks1HeaderLen)
	}
	b := first[:luks1HeaderLen]
	h := &header{info: Info{
		Version:    1,
		Cipher:     cString(b[8:40]),
		Mode:       cString(b[40:72]),
		Hash:       cString(b[72:104]),
		SectorSize: 512,
		UUID:       cString(b[168:208]),
	}}
	payload := binary.BigEndian.Uint32(b[104:])
	keyBytes := int(binary.BigEndian.Uint32(b[108:]))
	mkIter := binary.BigEndian.Uint32(b[164:])
	h.info.PayloadOffset = int64(payload) * afSector
	if keyBytes < 1 || keyBytes > maxKeyBytes {
		return nil, formatErr("LUKS1 key size %d bytes, want 1..%d", keyBytes, maxKeyBytes)
	}
	h.info.KeyBits = keyBytes * 8
	if mkIter == 0 {
		return nil, formatErr("LUKS1 digest iterations 0")
	}
	_, hashOK := hashFunc(h.info.Hash)
	dg := &digest{
		hash:       h.info.Hash,
		iterations: int(mkIter),
		salt:       append([]byte(nil), b[132:164]...),
		value:      append([]byte(nil), b[112:132]...),
	}
	afSectors := roundUp(int64(keyBytes)*afStripes, afSector) / afSector
	for i := range luks1NumKeys {
		k := b[luks1KeyslotsOff+i*luks1KeyslotLen:]
		active := binary.BigEndian.Uint32(k[0:])
		iter := binary.BigEndian.Uint32(k[4:])
		off := binary.BigEndian.Uint32(k[40:])
		stripes := binary.BigEndian.Uint32(k[44:])
		switch active {
		case luks1Inactive:
			continue
		case luks1Active:
		default:
			return nil, formatErr("LUKS1 keyslot %d state %#x is neither active nor disabled", i, active)
		}
		if stripes != afStripes {
			return nil, formatErr("LUKS1 keyslot %d has %d AF stripes; LUKS1 requires %d", i, stripes, afStripes)
		}
		if iter == 0 {
			return nil, formatErr("LUKS1 keyslot %d iterations 0", i)
		}
		if int64(off)*afSector < luks1HeaderLen {
			return nil, formatErr("LUKS1 keyslot %d material at sector %d overlaps the header", i, off)
		}
		if payload != 0 && int64(off)+afSectors > int64(payload) {
			return nil, formatErr("LUKS1 keyslot %d material (sectors %d..%d) runs into the payload at sector %d", i, off, int64(off)+afSectors, payload)
		}
		if h.info.Keyslots == 0 {
			h.info.Iterations = int(iter)
		}
		h.info.Keyslots++
		ks := keyslot{
			id:           i,
			kdfHash:      h.info.Hash,
			iterations:   int(iter),
			salt:         append([]byte(nil), k[8:40]...),
			keyBytes:     keyBytes,
			stripes:      afStripes,
			afHash:       h.info.Hash,
			areaOffset:   int64(off) * afSector,
			areaKeyBytes: keyBytes,
			digest:       dg,
		}
		if !hashOK {
			ks.unsupported = &UnsupportedError{Feature: fmt.Sprintf("keyslot %d hash %q", i, h.info.Hash), Detail: "cwrun reads sha1, sha256, sha384 and sha512"}
		}
		h.keyslots = append(h.keyslots, ks)
	}
	return h, nil
}

// parseHeader reads the start of r, checks the magic and parses the header
// of whichever version it declares.
func parseHeader(r io.ReaderAt) (*header, error) {
	first := make([]byte, luks2BinLen)
	n, err := r.ReadAt(first, 0)
	if n < len(first) && err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("luks: reading header: %w", err)
	}
	first = first[:n]
	if n < len(luksMagic)+2 || !bytes.Equal(first[:len(luksMagic)], luksMagic) {
		return nil, ErrNotLUKS
	}
	switch v := binary.BigEndian.Uint16(first[6:]); v {
	case 1:
		return parseLUKS1(first)
	case 2:
		return parseLUKS2(r, first)
	default:
		return nil, &UnsupportedError{Feature: fmt.Sprintf("LUKS version %d", v), Detail: "cwrun reads LUKS1 and LUKS2"}
	}
}
