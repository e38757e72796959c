package luks

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strconv"
)

// LUKS2 on-disk layout (LUKS2 On-Disk Format Specification, cryptsetup's
// docs/on-disk-format-luks2.pdf).
const (
	luks2BinLen = 4096
	// The smallest metadata size cryptsetup allows: 4 KiB binary header
	// plus 12 KiB JSON, twice (primary and secondary).
	luks2HdrSize      = 16384
	luks2KeyslotsOff  = 2 * luks2HdrSize
	luks2MaxHdrSize   = 4 << 20 // cryptsetup's largest metadata size
	luks2MaxKeyslots  = 32
	luks2MaxDigests   = 8
	luks2MaxSegments  = 16
	luks2CsumOff      = 448
	luks2CsumLen      = 64
	luks2SaltLen      = 64
	luks2KeyslotAlign = 4096
)

var luks2SecondMagic = []byte{'S', 'K', 'U', 'L', 0xba, 0xbe}

// luks2Layout returns the keyslots area size and the payload offset in
// bytes. The keyslots area holds exactly one 512-bit keyslot (256000 bytes
// of AF material rounded to 4 KiB): 32 KiB of headers + 252 KiB = 284 KiB,
// 4096-aligned. cryptsetup 2.6 writes the same layout for
// `--luks2-keyslots-size 258048 --offset 568` and accepts it, warning only
// that no second keyslot fits. cwrun never adds one: the key broker holds
// the single passphrase.
func luks2Layout() (keyslotsSize, payloadOff int64) {
	keyslotsSize = roundUp(volumeKeyBytes*afStripes, luks2KeyslotAlign)
	return keyslotsSize, luks2KeyslotsOff + keyslotsSize
}

// JSON metadata, as cryptsetup writes it. 64-bit sizes are strings.
type jsonHeader struct {
	Keyslots map[string]jsonKeyslot     `json:"keyslots"`
	Tokens   map[string]json.RawMessage `json:"tokens"`
	Segments map[string]jsonSegment     `json:"segments"`
	Digests  map[string]jsonDigest      `json:"digests"`
	Config   jsonConfig                 `json:"config"`
}

type jsonKeyslot struct {
	Type    string   `json:"type"`
	KeySize int      `json:"key_size"`
	AF      jsonAF   `json:"af"`
	Area    jsonArea `json:"area"`
	KDF     jsonKDF  `json:"kdf"`
}

type jsonAF struct {
	Type    string `json:"type"`
	Stripes int    `json:"stripes"`
	Hash    string `json:"hash"`
}

type jsonArea struct {
	Type       string `json:"type"`
	Offset     string `json:"offset"`
	Size       string `json:"size"`
	Encryption string `json:"encryption"`
	KeySize    int    `json:"key_size"`
}

type jsonKDF struct {
	Type       string `json:"type"`
	Hash       string `json:"hash,omitempty"`
	Iterations int    `json:"iterations,omitempty"`
	Salt       string `json:"salt"`
}

type jsonSegment struct {
	Type       string          `json:"type"`
	Offset     string          `json:"offset"`
	Size       string          `json:"size"`
	IVTweak    string          `json:"iv_tweak"`
	Encryption string          `json:"encryption"`
	SectorSize int             `json:"sector_size"`
	Integrity  json.RawMessage `json:"integrity,omitempty"`
}

type jsonDigest struct {
	Type       string   `json:"type"`
	Keyslots   []string `json:"keyslots"`
	Segments   []string `json:"segments"`
	Hash       string   `json:"hash"`
	Iterations int      `json:"iterations"`
	Salt       string   `json:"salt"`
	Digest     string   `json:"digest"`
}

type jsonConfig struct {
	JSONSize     string            `json:"json_size"`
	KeyslotsSize string            `json:"keyslots_size"`
	Requirements *jsonRequirements `json:"requirements,omitempty"`
}

type jsonRequirements struct {
	Mandatory []string `json:"mandatory"`
}

func makeLUKS2(passphrase, key []byte, payloadSize int64, p Params) ([]byte, error) {
	keyslotsSize, payloadOff := luks2Layout()
	hdr := make([]byte, payloadOff)
	ksSalt, err := randomBytes(p.Rand, saltBytes, "keyslot salt")
	if err != nil {
		return nil, err
	}
	dgSalt, err := randomBytes(p.Rand, saltBytes, "digest salt")
	if err != nil {
		return nil, err
	}
	material, err := sealKeyslot(p.Rand, passphrase, key, ksSalt, p.Iterations, sha256.New)
	if err != nil {
		return nil, err
	}
	copy(hdr[luks2KeyslotsOff:], material)
	dg := pbkdf2Key(sha256.New, key, dgSalt, p.Iterations, sha256.Size)
	b64 := base64.StdEncoding.EncodeToString
	itoa := func(n int64) string { return strconv.FormatInt(n, 10) }
	meta := jsonHeader{
		Keyslots: map[string]jsonKeyslot{"0": {
			Type:    "luks2",
			KeySize: volumeKeyBytes,
			AF:      jsonAF{Type: "luks1", Stripes: afStripes, Hash: hashName},
			Area: jsonArea{Type: "raw", Offset: itoa(luks2KeyslotsOff), Size: itoa(keyslotsSize),
				Encryption: cipherSpec, KeySize: volumeKeyBytes},
			KDF: jsonKDF{Type: "pbkdf2", Hash: hashName, Iterations: p.Iterations, Salt: b64(ksSalt)},
		}},
		Tokens: map[string]json.RawMessage{},
		Segments: map[string]jsonSegment{"0": {
			Type: "crypt", Offset: itoa(payloadOff), Size: itoa(payloadSize), IVTweak: "0",
			Encryption: cipherSpec, SectorSize: p.SectorSize,
		}},
		Digests: map[string]jsonDigest{"0": {
			Type: "pbkdf2", Keyslots: []string{"0"}, Segments: []string{"0"}, Hash: hashName,
			Iterations: p.Iterations, Salt: b64(dgSalt), Digest: b64(dg),
		}},
		Config: jsonConfig{JSONSize: itoa(luks2HdrSize - luks2BinLen), KeyslotsSize: itoa(keyslotsSize)},
	}
	js, err := json.Marshal(meta)
	if err != nil {
		return nil, fmt.Errorf("luks: encoding LUKS2 metadata: %w", err)
	}
	if len(js) >= luks2HdrSize-luks2BinLen {
		return nil, fmt.Errorf("luks: LUKS2 metadata is %d bytes, over the %d-byte JSON area", len(js), luks2HdrSize-luks2BinLen)
	}
	for i, off := range []int64{0, luks2HdrSize} {
		h := hdr[off : off+luks2HdrSize]
		if i == 0 {
			copy(h, luksMagic)
		} else {
			copy(h, luks2SecondMagic)
		}
		binary.BigEndian.PutUint16(h[6:], 2)
		binary.BigEndian.PutUint64(h[8:], luks2HdrSize)
		binary.BigEndian.PutUint64(h[16:], 1) // seqid
		putString(h[72:104], hashName)
		salt, err := randomBytes(p.Rand, luks2SaltLen, "header salt")
		if err != nil {
			return nil, err
		}
		copy(h[104:168], salt)
		putString(h[168:208], p.UUID)
		binary.BigEndian.PutUint64(h[256:], uint64(off))
		copy(h[luks2BinLen:], js)
		sum := sha256.Sum256(h)
		copy(h[luks2CsumOff:], sum[:])
	}
	return hdr, nil
}

// luks2Bin is the parsed binary header.
type luks2Bin struct {
	hdrSize int64
	seqid   uint64
	uuid    string
	json    []byte
}

// readLUKS2Bin reads and checksums the binary header and JSON area at off.
func readLUKS2Bin(r io.ReaderAt, off int64, magic []byte) (*luks2Bin, error) {
	bin := make([]byte, luks2BinLen)
	if n, err := r.ReadAt(bin, off); n < len(bin) {
		return nil, formatErr("LUKS2 header at %d: truncated (%v)", off, err)
	}
	if !bytes.Equal(bin[:len(magic)], magic) || binary.BigEndian.Uint16(bin[6:]) != 2 {
		return nil, formatErr("LUKS2 header at %d: bad magic or version", off)
	}
	size := binary.BigEndian.Uint64(bin[8:])
	if size < luks2HdrSize || size > luks2MaxHdrSize || size&(size-1) != 0 {
		return nil, formatErr("LUKS2 header at %d: header size %d is not a power of two in 16 KiB..4 MiB", off, size)
	}
	if got := binary.BigEndian.Uint64(bin[256:]); got != uint64(off) {
		return nil, formatErr("LUKS2 header at %d: says it is at %d", off, got)
	}
	alg := cString(bin[72:104])
	hf, ok := hashFunc(alg)
	if !ok {
		return nil, &UnsupportedError{Feature: fmt.Sprintf("LUKS2 header checksum %q", alg), Detail: "cwrun checks sha1, sha256, sha384 and sha512 checksums"}
	}
	// Probe the last byte before allocating up to 4 MiB for a size that a
	// hostile or truncated header may merely claim.
	if n, _ := r.ReadAt(make([]byte, 1), off+int64(size)-1); n != 1 {
		return nil, formatErr("LUKS2 header at %d: device ends inside its %d-byte metadata", off, size)
	}
	full := make([]byte, size)
	copy(full, bin)
	if n, err := r.ReadAt(full[luks2BinLen:], off+luks2BinLen); n < len(full)-luks2BinLen {
		return nil, formatErr("LUKS2 header at %d: JSON area truncated (%v)", off, err)
	}
	want := append([]byte(nil), full[luks2CsumOff:luks2CsumOff+luks2CsumLen]...)
	clear(full[luks2CsumOff : luks2CsumOff+luks2CsumLen])
	hh := hf()
	hh.Write(full)
	sum := hh.Sum(nil)
	if !bytes.Equal(sum, want[:len(sum)]) {
		return nil, formatErr("LUKS2 header at %d: checksum mismatch", off)
	}
	js := full[luks2BinLen:]
	if i := bytes.IndexByte(js, 0); i >= 0 {
		js = js[:i]
	}
	return &luks2Bin{hdrSize: int64(size), seqid: binary.BigEndian.Uint64(bin[16:]), uuid: cString(bin[168:208]), json: js}, nil
}

// readLUKS2Metadata returns the valid binary header with the highest seqid,
// falling back to the secondary copy when the primary is damaged.
func readLUKS2Metadata(r io.ReaderAt) (*luks2Bin, error) {
	primary, perr := readLUKS2Bin(r, 0, luksMagic)
	if perr == nil {
		if sec, err := readLUKS2Bin(r, primary.hdrSize, luks2SecondMagic); err == nil && sec.seqid > primary.seqid {
			return sec, nil
		}
		return primary, nil
	}
	for off := int64(luks2HdrSize); off <= luks2MaxHdrSize; off *= 2 {
		if sec, err := readLUKS2Bin(r, off, luks2SecondMagic); err == nil {
			return sec, nil
		}
	}
	return nil, fmt.Errorf("luks: primary header unusable and no valid secondary header: %w", perr)
}

func parseUint(s, what string) (int64, error) {
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 {
		return 0, formatErr("%s %q is not a non-negative integer", what, s)
	}
	return n, nil
}

func parseLUKS2(r io.ReaderAt, _ []byte) (*header, error) {
	bin, err := readLUKS2Metadata(r)
	if err != nil {
		return nil, err
	}
	var meta jsonHeader
	if err := json.Unmarshal(bin.json, &meta); err != nil {
		return nil, formatErr("LUKS2 JSON metadata: %v", err)
	}
	if js, err := parseUint(meta.Config.JSONSize, "config json_size"); err != nil {
		return nil, err
	} else if js != bin.hdrSize-luks2BinLen {
		return nil, formatErr("config json_size %d does not match header size %d", js, bin.hdrSize)
	}
	if meta.Config.Requirements != nil && len(meta.Config.Requirements.Mandatory) > 0 {
		return nil, &UnsupportedError{Feature: fmt.Sprintf("LUKS2 mandatory requirements %q", meta.Config.Requirements.Mandatory),
			Detail: "finish or abort the operation with cryptsetup first"}
	}
	if len(meta.Keyslots) > luks2MaxKeyslots || len(meta.Digests) > luks2MaxDigests || len(meta.Segments) > luks2MaxSegments {
		return nil, formatErr("LUKS2 metadata has %d keyslots, %d digests, %d segments; limits are %d, %d, %d",
			len(meta.Keyslots), len(meta.Digests), len(meta.Segments), luks2MaxKeyslots, luks2MaxDigests, luks2MaxSegments)
	}
	if len(meta.Segments) != 1 {
		return nil, &UnsupportedError{Feature: fmt.Sprintf("LUKS2 volume with %d segments", len(meta.Segments)), Detail: "cwrun reads volumes with exactly one crypt segment"}
	}
	var segID string
	var seg jsonSegment
	for id, s := range meta.Segments {
		segID, seg = id, s
	}
	if seg.Type != "crypt" {
		return nil, &UnsupportedError{Feature: fmt.Sprintf("segment %s of type %q", segID, seg.Type), Detail: "cwrun reads crypt segments"}
	}
	if len(seg.Integrity) > 0 && string(seg.Integrity) != "null" {
		return nil, &UnsupportedError{Feature: fmt.Sprintf("segment %s with integrity protection", segID), Detail: "cwrun reads plain aes-xts segments"}
	}
	if seg.IVTweak != "0" {
		return nil, &UnsupportedError{Feature: fmt.Sprintf("segment %s iv_tweak %q", segID, seg.IVTweak), Detail: "cwrun reads segments with iv_tweak 0"}
	}
	switch seg.SectorSize {
	case 512, 1024, 2048, 4096:
	default:
		return nil, formatErr("segment %s sector size %d, want 512, 1024, 2048 or 4096", segID, seg.SectorSize)
	}
	segOff, err := parseUint(seg.Offset, "segment offset")
	if err != nil {
		return nil, err
	}
	if segOff < 2*bin.hdrSize || segOff%int64(seg.SectorSize) != 0 {
		return nil, formatErr("segment %s offset %d is inside the metadata or not a multiple of its %d-byte sectors", segID, segOff, seg.SectorSize)
	}
	var segSize int64
	if seg.Size != "dynamic" {
		if segSize, err = parseUint(seg.Size, "segment size"); err != nil {
			return nil, err
		}
		if segSize%int64(seg.SectorSize) != 0 {
			return nil, formatErr("segment %s size %d is not a multiple of its %d-byte sectors", segID, segSize, seg.SectorSize)
		}
	}
	h := &header{info: Info{
		Version:       2,
		SectorSize:    seg.SectorSize,
		PayloadOffset: segOff,
		PayloadSize:   segSize,
		UUID:          bin.uuid,
	}}
	h.info.Cipher, h.info.Mode = splitSpec(seg.Encryption)

	digests := map[string]*digest{} // keyslot id -> digest of the segment
	var digestErr = map[string]error{}
	for id, d := range meta.Digests {
		if !slices.Contains(d.Segments, segID) {
			continue
		}
		if h.info.Hash == "" {
			h.info.Hash = d.Hash
		}
		dg, err := parseDigest(id, d)
		for _, ks := range d.Keyslots {
			if err != nil {
				digestErr[ks] = err
			} else {
				digests[ks] = dg
			}
		}
	}

	ids := make([]int, 0, len(meta.Keyslots))
	for id := range meta.Keyslots {
		n, err := strconv.Atoi(id)
		if err != nil || n < 0 || n >= luks2MaxKeyslots || strconv.Itoa(n) != id {
			return nil, formatErr("keyslot id %q is not 0..%d", id, luks2MaxKeyslots-1)
		}
		ids = append(ids, n)
	}
	slices.Sort(ids)
	for _, n := range ids {
		id := strconv.Itoa(n)
		ks, err := parseKeyslot(n, meta.Keyslots[id], bin.hdrSize)
		if err != nil {
			return nil, err
		}
		if ks.unsupported == nil {
			if err := digestErr[id]; err != nil {
				ks.unsupported = err
			} else if ks.digest = digests[id]; ks.digest == nil {
				ks.unsupported = &UnsupportedError{Feature: fmt.Sprintf("keyslot %d", n), Detail: "no digest of the data segment lists it"}
			}
		}
		if h.info.Keyslots == 0 {
			h.info.KeyBits = ks.keyBytes * 8
			if meta.Keyslots[id].KDF.Type == "pbkdf2" {
				h.info.Iterations = ks.iterations
			}
		}
		h.info.Keyslots++
		h.keyslots = append(h.keyslots, ks)
	}
	return h, nil
}

func decodeB64(s, what string, maxLen int) ([]byte, error) {
	if base64.StdEncoding.DecodedLen(len(s)) > maxLen+3 {
		return nil, formatErr("%s longer than %d bytes", what, maxLen)
	}
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil || len(b) == 0 || len(b) > maxLen {
		return nil, formatErr("%s is not base64 of 1..%d bytes", what, maxLen)
	}
	return b, nil
}

func parseDigest(id string, d jsonDigest) (*digest, error) {
	if d.Type != "pbkdf2" {
		return nil, &UnsupportedError{Feature: fmt.Sprintf("digest %s of type %q", id, d.Type), Detail: "cwrun reads pbkdf2 digests"}
	}
	if _, ok := hashFunc(d.Hash); !ok {
		return nil, &UnsupportedError{Feature: fmt.Sprintf("digest %s hash %q", id, d.Hash), Detail: "cwrun reads sha1, sha256, sha384 and sha512"}
	}
	if d.Iterations < 1 || d.Iterations > 1<<32-1 {
		return nil, formatErr("digest %s iterations %d", id, d.Iterations)
	}
	salt, err := decodeB64(d.Salt, "digest "+id+" salt", 64)
	if err != nil {
		return nil, err
	}
	value, err := decodeB64(d.Digest, "digest "+id+" value", 64)
	if err != nil {
		return nil, err
	}
	return &digest{hash: d.Hash, iterations: d.Iterations, salt: salt, value: value}, nil
}

// parseKeyslot checks one JSON keyslot. Structural errors fail the parse;
// features cwrun lacks mark the keyslot unsupported so that others can
// still be tried.
func parseKeyslot(n int, k jsonKeyslot, hdrSize int64) (keyslot, error) {
	ks := keyslot{id: n, keyBytes: k.KeySize}
	unsup := func(feature, detail string) (keyslot, error) {
		ks.unsupported = &UnsupportedError{Feature: fmt.Sprintf("keyslot %d %s", n, feature), Detail: detail}
		return ks, nil
	}
	if k.KeySize < 1 || k.KeySize > maxKeyBytes {
		return ks, formatErr("keyslot %d key size %d, want 1..%d bytes", n, k.KeySize, maxKeyBytes)
	}
	if k.Type != "luks2" {
		return unsup(fmt.Sprintf("of type %q", k.Type), "cwrun reads luks2 keyslots")
	}
	if k.KDF.Type != "pbkdf2" {
		return unsup(fmt.Sprintf("uses %s", k.KDF.Type), "cwrun reads only pbkdf2 keyslots; re-add the key with cryptsetup luksConvertKey --pbkdf pbkdf2")
	}
	if k.AF.Type != "luks1" || k.AF.Stripes != afStripes {
		return unsup(fmt.Sprintf("anti-forensic splitter %q with %d stripes", k.AF.Type, k.AF.Stripes), "cwrun reads luks1 AF with 4000 stripes")
	}
	if k.Area.Type != "raw" || k.Area.Encryption != cipherSpec {
		return unsup(fmt.Sprintf("area %q encrypted with %q", k.Area.Type, k.Area.Encryption), "cwrun reads raw areas with aes-xts-plain64")
	}
	for _, hn := range []string{k.KDF.Hash, k.AF.Hash} {
		if _, ok := hashFunc(hn); !ok {
			return unsup(fmt.Sprintf("hash %q", hn), "cwrun reads sha1, sha256, sha384 and sha512")
		}
	}
	switch k.Area.KeySize {
	case 32, 48, 64:
	default:
		return ks, formatErr("keyslot %d area key size %d, want 32, 48 or 64", n, k.Area.KeySize)
	}
	if k.KDF.Iterations < 1 || k.KDF.Iterations > 1<<32-1 {
		return ks, formatErr("keyslot %d iterations %d", n, k.KDF.Iterations)
	}
	off, err := parseUint(k.Area.Offset, fmt.Sprintf("keyslot %d area offset", n))
	if err != nil {
		return ks, err
	}
	size, err := parseUint(k.Area.Size, fmt.Sprintf("keyslot %d area size", n))
	if err != nil {
		return ks, err
	}
	need := roundUp(int64(k.KeySize)*afStripes, afSector)
	if off < 2*hdrSize || size < need || off > 1<<50 {
		return ks, formatErr("keyslot %d area [%d, +%d) overlaps the metadata or is smaller than its %d bytes of material", n, off, size, need)
	}
	salt, err := decodeB64(k.KDF.Salt, fmt.Sprintf("keyslot %d salt", n), 64)
	if err != nil {
		return ks, err
	}
	ks.kdfHash = k.KDF.Hash
	ks.iterations = k.KDF.Iterations
	ks.salt = salt
	ks.stripes = afStripes
	ks.afHash = k.AF.Hash
	ks.areaOffset = off
	ks.areaKeyBytes = k.Area.KeySize
	return ks, nil
}
