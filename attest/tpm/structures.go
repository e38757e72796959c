package tpm

import (
	"crypto"
	"encoding/binary"
	"errors"
	"fmt"
)

// TPM 2.0 constants (TPM 2.0 Library, Part 2) used by the parsers. They
// are written out here, not taken from go-tpm, so that the broker's
// verifier depends on nothing but the standard library.
const (
	tpmGeneratedValue = 0xff544347 // TPM_GENERATED_VALUE: "\xffTCG"
	tpmSTAttestQuote  = 0x8018     // TPM_ST_ATTEST_QUOTE

	algRSASSA = 0x0014
	algRSAPSS = 0x0016
	algECDSA  = 0x0018
	algSHA1   = 0x0004
	algSHA256 = 0x000b
	algSHA384 = 0x000c
	algSHA512 = 0x000d

	// numPCRs is the PC Client platform's PCR count, and the length of
	// Trustee's "pcrs" list.
	numPCRs = 24
)

// errShort is what a reader returns when the bytes end early.
var errShort = errors.New("ends early")

// reader walks big-endian TPM wire structures; the first failure
// sticks, so parsers read everything and check err once.
type reader struct {
	b   []byte
	err error
}

func (r *reader) take(n int) []byte {
	if r.err != nil {
		return nil
	}
	if n < 0 || n > len(r.b) {
		r.err = errShort
		r.b = nil
		return nil
	}
	out := r.b[:n:n]
	r.b = r.b[n:]
	return out
}

func (r *reader) u8() uint8 {
	b := r.take(1)
	if b == nil {
		return 0
	}
	return b[0]
}

func (r *reader) u16() uint16 {
	b := r.take(2)
	if b == nil {
		return 0
	}
	return binary.BigEndian.Uint16(b)
}

func (r *reader) u32() uint32 {
	b := r.take(4)
	if b == nil {
		return 0
	}
	return binary.BigEndian.Uint32(b)
}

func (r *reader) u64() uint64 {
	b := r.take(8)
	if b == nil {
		return 0
	}
	return binary.BigEndian.Uint64(b)
}

// tpm2b reads a TPM2B: a 16-bit size and that many bytes.
func (r *reader) tpm2b() []byte { return r.take(int(r.u16())) }

// PCRSelection is one bank of a TPML_PCR_SELECTION.
type PCRSelection struct {
	Hash uint16 // TPM_ALG_ID of the bank
	PCRs []int  // selected PCR indices, ascending (the order the TPM digests them)
}

// Quote is a parsed TPMS_ATTEST of type TPM_ST_ATTEST_QUOTE.
type Quote struct {
	QualifiedSigner []byte // TPM2B_NAME of the AK
	ExtraData       []byte // the caller's qualifying data: the report data
	Clock           uint64
	ResetCount      uint32
	RestartCount    uint32
	Safe            bool
	FirmwareVersion uint64
	Selection       []PCRSelection
	PCRDigest       []byte
}

// ParseQuote parses a TPMS_ATTEST that must be a quote. It checks the
// structure only, not its signature.
func ParseQuote(b []byte) (*Quote, error) {
	r := &reader{b: b}
	magic := r.u32()
	typ := r.u16()
	if r.err != nil {
		return nil, fmt.Errorf("TPMS_ATTEST header: %w", r.err)
	}
	if magic != tpmGeneratedValue {
		// Only the TPM writes this value into structures it signs; a
		// restricted AK refuses to sign external data starting with it.
		return nil, fmt.Errorf("TPMS_ATTEST magic is %#08x, want TPM_GENERATED_VALUE %#08x", magic, tpmGeneratedValue)
	}
	if typ != tpmSTAttestQuote {
		return nil, fmt.Errorf("TPMS_ATTEST type is %#04x, want TPM_ST_ATTEST_QUOTE %#04x", typ, tpmSTAttestQuote)
	}
	q := &Quote{}
	q.QualifiedSigner = r.tpm2b()
	q.ExtraData = r.tpm2b()
	q.Clock = r.u64()
	q.ResetCount = r.u32()
	q.RestartCount = r.u32()
	safe := r.u8()
	q.FirmwareVersion = r.u64()
	n := r.u32()
	if r.err != nil {
		return nil, fmt.Errorf("TPMS_ATTEST: %w", r.err)
	}
	if safe > 1 {
		return nil, fmt.Errorf("TPMS_ATTEST clockInfo.safe is %d, want 0 or 1", safe)
	}
	q.Safe = safe == 1
	// A TPM has at most a handful of banks (HASH_COUNT); the bound keeps
	// a hostile count from allocating.
	if n > 16 {
		return nil, fmt.Errorf("TPML_PCR_SELECTION count is %d, more than any TPM has banks", n)
	}
	for i := uint32(0); i < n; i++ {
		hash := r.u16()
		sel := r.take(int(r.u8()))
		if r.err != nil {
			return nil, fmt.Errorf("TPML_PCR_SELECTION entry %d: %w", i, r.err)
		}
		s := PCRSelection{Hash: hash}
		for byteIdx, v := range sel {
			for bit := 0; bit < 8; bit++ {
				if v&(1<<bit) != 0 {
					s.PCRs = append(s.PCRs, byteIdx*8+bit)
				}
			}
		}
		q.Selection = append(q.Selection, s)
	}
	q.PCRDigest = r.tpm2b()
	if r.err != nil {
		return nil, fmt.Errorf("TPMS_QUOTE_INFO pcrDigest: %w", r.err)
	}
	if len(r.b) != 0 {
		return nil, fmt.Errorf("TPMS_ATTEST has %d bytes after the quote info", len(r.b))
	}
	return q, nil
}

// Signature is a parsed TPMT_SIGNATURE.
type Signature struct {
	Alg  uint16 // TPM_ALG_RSASSA, TPM_ALG_RSAPSS or TPM_ALG_ECDSA
	Hash uint16 // TPM_ALG_ID of the digest signed
	RSA  []byte // RSASSA and RSAPSS
	R, S []byte // ECDSA
}

// ParseSignature parses a TPMT_SIGNATURE of one of the algorithms the
// verifier accepts.
func ParseSignature(b []byte) (*Signature, error) {
	r := &reader{b: b}
	s := &Signature{Alg: r.u16(), Hash: r.u16()}
	if r.err != nil {
		return nil, fmt.Errorf("TPMT_SIGNATURE header: %w", r.err)
	}
	switch s.Alg {
	case algRSASSA, algRSAPSS:
		s.RSA = r.tpm2b()
	case algECDSA:
		s.R = r.tpm2b()
		s.S = r.tpm2b()
	default:
		return nil, fmt.Errorf("TPMT_SIGNATURE algorithm %#04x is not RSASSA, RSAPSS or ECDSA", s.Alg)
	}
	if r.err != nil {
		return nil, fmt.Errorf("TPMT_SIGNATURE: %w", r.err)
	}
	if len(r.b) != 0 {
		return nil, fmt.Errorf("TPMT_SIGNATURE has %d trailing bytes", len(r.b))
	}
	if _, err := hashFor(s.Hash); err != nil {
		return nil, fmt.Errorf("TPMT_SIGNATURE: %w", err)
	}
	return s, nil
}

// hashFor maps a TPM_ALG_ID to a Go hash. SHA-1 is refused: a quote
// signed over SHA-1 can be forged by collision.
func hashFor(alg uint16) (crypto.Hash, error) {
	switch alg {
	case algSHA256:
		return crypto.SHA256, nil
	case algSHA384:
		return crypto.SHA384, nil
	case algSHA512:
		return crypto.SHA512, nil
	}
	return 0, fmt.Errorf("hash algorithm %#04x is not SHA-256, SHA-384 or SHA-512", alg)
}
