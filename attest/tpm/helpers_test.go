package tpm

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
)

// quoteSpec describes a TPMS_ATTEST the tests build and sign with a
// software key: a stand-in for a TPM where the point is one check of
// the verifier, not TPM behaviour (swtpm_test.go has the real TPM).
type quoteSpec struct {
	magic   uint32
	typ     uint16
	extra   []byte
	hash    uint16 // bank in the selection
	sel     []byte // pcrSelect bytes
	digest  []byte // nil: computed over pcrs with SHA-256
	pcrs    [][]byte
	trailer []byte
}

func defaultSpec(rd []byte, pcrs [][]byte) quoteSpec {
	return quoteSpec{magic: tpmGeneratedValue, typ: tpmSTAttestQuote, extra: bytes.Clone(rd), hash: algSHA256, sel: []byte{0xff, 0xff, 0xff}, pcrs: pcrs}
}

func (q quoteSpec) marshal() []byte {
	var b []byte
	b = binary.BigEndian.AppendUint32(b, q.magic)
	b = binary.BigEndian.AppendUint16(b, q.typ)
	name := append([]byte{0, 0x0b}, make([]byte, 32)...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(q.extra)))
	b = append(b, q.extra...)
	b = binary.BigEndian.AppendUint64(b, 12345) // clock
	b = binary.BigEndian.AppendUint32(b, 7)     // resetCount
	b = binary.BigEndian.AppendUint32(b, 1)     // restartCount
	b = append(b, 1)                            // safe
	b = binary.BigEndian.AppendUint64(b, 0x2019102300163636)
	b = binary.BigEndian.AppendUint32(b, 1)
	b = binary.BigEndian.AppendUint16(b, q.hash)
	b = append(b, byte(len(q.sel)))
	b = append(b, q.sel...)
	d := q.digest
	if d == nil {
		h := sha256.New()
		for _, p := range q.pcrs {
			h.Write(p)
		}
		d = h.Sum(nil)
	}
	b = binary.BigEndian.AppendUint16(b, uint16(len(d)))
	b = append(b, d...)
	return append(b, q.trailer...)
}

// softAK signs quotes like a TPM's AK would.
type softAK struct {
	key crypto.Signer
	alg uint16
}

func newSoftAK(t testing.TB, alg uint16) *softAK {
	t.Helper()
	var (
		k   crypto.Signer
		err error
	)
	if alg == algECDSA {
		k, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	} else {
		k, err = rsa.GenerateKey(rand.Reader, 2048)
	}
	if err != nil {
		t.Fatal(err)
	}
	return &softAK{key: k, alg: alg}
}

func (a *softAK) spki(t testing.TB) []byte {
	b, err := x509.MarshalPKIXPublicKey(a.key.Public())
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// sign returns a TPMT_SIGNATURE over msg.
func (a *softAK) sign(t testing.TB, msg []byte) []byte {
	t.Helper()
	d := sha256.Sum256(msg)
	out := binary.BigEndian.AppendUint16(nil, a.alg)
	out = binary.BigEndian.AppendUint16(out, algSHA256)
	switch a.alg {
	case algECDSA:
		r, s, err := ecdsa.Sign(rand.Reader, a.key.(*ecdsa.PrivateKey), d[:])
		if err != nil {
			t.Fatal(err)
		}
		for _, v := range []([]byte){r.FillBytes(make([]byte, 32)), s.FillBytes(make([]byte, 32))} {
			out = binary.BigEndian.AppendUint16(out, uint16(len(v)))
			out = append(out, v...)
		}
	default:
		var (
			sig []byte
			err error
		)
		if a.alg == algRSAPSS {
			sig, err = rsa.SignPSS(rand.Reader, a.key.(*rsa.PrivateKey), crypto.SHA256, d[:], &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash})
		} else {
			sig, err = rsa.SignPKCS1v15(rand.Reader, a.key.(*rsa.PrivateKey), crypto.SHA256, d[:])
		}
		if err != nil {
			t.Fatal(err)
		}
		out = binary.BigEndian.AppendUint16(out, uint16(len(sig)))
		out = append(out, sig...)
	}
	return out
}

// evidence builds Trustee-shaped evidence for msg signed by a.
func (a *softAK) evidence(t testing.TB, msg []byte, pcrs [][]byte, eventLog []byte) json.RawMessage {
	t.Helper()
	ev := Evidence{
		AKPublic: base64.StdEncoding.EncodeToString(a.spki(t)),
		Quote: EvidenceQuote{
			Signature: base64.StdEncoding.EncodeToString(a.sign(t, msg)),
			Message:   base64.StdEncoding.EncodeToString(msg),
		},
	}
	for _, p := range pcrs {
		ev.Quote.PCRs = append(ev.Quote.PCRs, hex.EncodeToString(p))
	}
	if eventLog != nil {
		ev.EventLog = base64.StdEncoding.EncodeToString(eventLog)
	}
	b, err := json.Marshal(ev)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// zeroPCRs is a fresh TPM's SHA-256 bank.
func zeroPCRs() [][]byte {
	out := make([][]byte, numPCRs)
	for i := range out {
		out[i] = initialPCR(uint32(i), 0)
	}
	return out
}

func readFixture(t testing.TB) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "trustee_tpm_evidence.json"))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// logBuilder writes a crypto-agile event log (SHA-1 and SHA-256 banks)
// and tracks, independently of Replay, the SHA-256 PCR values it
// extends to.
type logBuilder struct {
	buf  bytes.Buffer
	pcrs [][]byte
}

func newLogBuilder(locality uint8) *logBuilder {
	lb := &logBuilder{pcrs: zeroPCRs()}
	lb.pcrs[0][31] = locality
	le := binary.LittleEndian
	var spec []byte
	spec = append(spec, specIDSignature...)
	spec = le.AppendUint32(spec, 0)          // platformClass
	spec = append(spec, 0, 2, 0, 2)          // minor, major, errata, uintnSize
	spec = le.AppendUint32(spec, 2)          // numberOfAlgorithms
	spec = le.AppendUint16(spec, algSHA1)    // SHA-1
	spec = le.AppendUint16(spec, 20)         //
	spec = le.AppendUint16(spec, algSHA256)  // SHA-256
	spec = le.AppendUint16(spec, sha256Size) //
	spec = append(spec, 0)                   // vendorInfoSize
	var hdr []byte
	hdr = le.AppendUint32(hdr, 0)
	hdr = le.AppendUint32(hdr, EvNoAction)
	hdr = append(hdr, make([]byte, 20)...)
	hdr = le.AppendUint32(hdr, uint32(len(spec)))
	lb.buf.Write(hdr)
	lb.buf.Write(spec)
	if locality != 0 {
		lb.raw(0, EvNoAction, make([]byte, 32), append([]byte(startupLocalitySignature), locality))
	}
	return lb
}

// raw appends an event with the given SHA-256 digest (SHA-1 digest
// zeros) without extending anything.
func (lb *logBuilder) raw(pcr, typ uint32, d256, data []byte) {
	le := binary.LittleEndian
	var b []byte
	b = le.AppendUint32(b, pcr)
	b = le.AppendUint32(b, typ)
	b = le.AppendUint32(b, 2)
	b = le.AppendUint16(b, algSHA1)
	b = append(b, make([]byte, 20)...)
	b = le.AppendUint16(b, algSHA256)
	b = append(b, d256...)
	b = le.AppendUint32(b, uint32(len(data)))
	b = append(b, data...)
	lb.buf.Write(b)
}

// measure logs and extends the SHA-256 of content.
func (lb *logBuilder) measure(pcr, typ uint32, content, data []byte) []byte {
	d := sha256.Sum256(content)
	lb.raw(pcr, typ, d[:], data)
	h := sha256.New()
	h.Write(lb.pcrs[pcr])
	h.Write(d[:])
	lb.pcrs[pcr] = h.Sum(nil)
	return d[:]
}

func taggedEvent(id uint32, desc string) []byte {
	b := binary.LittleEndian.AppendUint32(nil, id)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(desc)+1))
	return append(append(b, desc...), 0)
}

// bootLog is a direct kernel boot as OVMF and the Linux EFI stub log
// it: firmware, separators, the kernel in PCR 4, initrd and command
// line in PCR 9.
func bootLog(kernel, initrd, cmdline string) *logBuilder {
	lb := newLogBuilder(3)
	lb.measure(0, EvSCRTMVersion, []byte("OVMF"), []byte("OVMF\x00"))
	lb.measure(0, EvEFIPlatformFirmwareBlob, []byte("firmware volume"), make([]byte, 16))
	lb.measure(7, EvEFIVariableDriverConfig, []byte("SecureBoot=0"), []byte("SecureBoot"))
	for pcr := uint32(0); pcr <= 7; pcr++ {
		lb.measure(pcr, EvSeparator, []byte{0, 0, 0, 0}, []byte{0, 0, 0, 0})
	}
	lb.measure(4, EvEFIBootServicesApplication, []byte(kernel), make([]byte, 32))
	lb.measure(9, EvEventTag, []byte(initrd), taggedEvent(linuxInitrdTag, "Linux initrd"))
	lb.measure(9, EvEventTag, []byte(cmdline), taggedEvent(linuxLoadOptionsTag, "LOADED_IMAGE::LoadOptions"))
	lb.measure(5, EvEFIAction, []byte("Exit Boot Services Invocation"), []byte("Exit Boot Services Invocation"))
	return lb
}
