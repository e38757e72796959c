package tpm

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxtpm"

	"github.com/cwrun/cwrun/attest"
)

// Defaults of AttesterOptions.
const (
	DefaultDevice   = "/dev/tpmrm0"
	DefaultEventLog = "/sys/kernel/security/tpm0/binary_bios_measurements"
)

// AttesterOptions configure the guest-side attester.
type AttesterOptions struct {
	// Device is the TPM character device; DefaultDevice when empty. The
	// kernel's resource manager (tpmrm0) lets the attester share the TPM.
	Device string
	// Conn, when set, is a raw TPM 2.0 command stream used instead of
	// Device (swtpm's server socket in tests). NewAttester does not
	// close it.
	Conn io.ReadWriter
	// AKHandle is a persistent handle (0x81000000–0x81ffffff) holding
	// the AK: it is used when present and the AK is stored there when
	// not. 0: the AK is re-created as a transient primary key, which
	// the endorsement seed makes the same key every time.
	AKHandle uint32
	// ECC makes the AK an ECC P-256 ECDSA key instead of RSA 2048
	// RSASSA (Trustee's verifier accepts RSASSA only; cwrun's both).
	ECC bool
	// EventLog is the firmware event log to send; DefaultEventLog when
	// empty, "-" for none. An unreadable log is left out, not an error:
	// the broker decides whether it needs one.
	EventLog string
	// Logger receives debug notes; nil discards them.
	Logger *slog.Logger
}

// Attester quotes a TPM. It implements attest.Attester and io.Closer.
type Attester struct {
	mu       sync.Mutex
	tpm      transport.TPM
	closer   io.Closer // the device; nil for a caller's Conn
	ak       tpm2.TPMHandle
	akName   tpm2.TPM2BName
	akFlush  bool // a transient AK to flush on Close
	spki     []byte
	eventLog string
	log      *slog.Logger
	// ekCert and credSecret are this handshake's credential activation
	// (AuthParams, TakeChallenge), sent with the next evidence.
	ekCert, credSecret []byte
}

// NewAttester opens the TPM and prepares the AK.
func NewAttester(opts AttesterOptions) (attest.Attester, error) {
	a := &Attester{eventLog: opts.EventLog, log: opts.Logger}
	if a.log == nil {
		a.log = slog.New(slog.DiscardHandler)
	}
	if a.eventLog == "" {
		a.eventLog = DefaultEventLog
	}
	if opts.Conn != nil {
		a.tpm = &streamTPM{rw: opts.Conn}
	} else {
		dev := opts.Device
		if dev == "" {
			dev = DefaultDevice
		}
		t, err := linuxtpm.Open(dev)
		if err != nil {
			return nil, fmt.Errorf("tpm: no TPM at %s: %v (boot the guest with a TPM: cwrun run --tee tpm adds a vTPM)", dev, err)
		}
		a.tpm, a.closer = t, t
	}
	if err := a.loadAK(opts.AKHandle, opts.ECC); err != nil {
		a.Close()
		return nil, err
	}
	return a, nil
}

// Tee implements attest.Attester.
func (a *Attester) Tee() string { return attest.TeeTPM }

// AKPublic returns the AK's DER SubjectPublicKeyInfo, as evidence
// carries it; its SHA-256 is what a broker trusts.
func (a *Attester) AKPublic() []byte { return bytes.Clone(a.spki) }

// Close flushes a transient AK and closes the device (not a Conn).
func (a *Attester) Close() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	var errs []error
	if a.akFlush && a.tpm != nil {
		if _, err := (tpm2.FlushContext{FlushHandle: a.ak}).Execute(a.tpm); err != nil {
			errs = append(errs, fmt.Errorf("flushing the AK: %w", err))
		}
		a.akFlush = false
	}
	if a.closer != nil {
		errs = append(errs, a.closer.Close())
		a.closer = nil
	}
	a.tpm = nil
	return errors.Join(errs...)
}

// akTemplate is a restricted signing key under the endorsement
// hierarchy: restricted, so the TPM refuses to sign anything that
// mimics its own attestation structures; fixedTPM, so it never leaves
// this TPM.
func akTemplate(ecc bool) tpm2.TPMTPublic {
	attrs := tpm2.TPMAObject{
		FixedTPM:            true,
		FixedParent:         true,
		SensitiveDataOrigin: true,
		UserWithAuth:        true,
		NoDA:                true,
		Restricted:          true,
		SignEncrypt:         true,
	}
	if ecc {
		return tpm2.TPMTPublic{
			Type: tpm2.TPMAlgECC, NameAlg: tpm2.TPMAlgSHA256, ObjectAttributes: attrs,
			Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
				Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
				Scheme: tpm2.TPMTECCScheme{
					Scheme:  tpm2.TPMAlgECDSA,
					Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA256}),
				},
				CurveID: tpm2.TPMECCNistP256,
				KDF:     tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
			}),
			Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
				X: tpm2.TPM2BECCParameter{Buffer: make([]byte, 32)},
				Y: tpm2.TPM2BECCParameter{Buffer: make([]byte, 32)},
			}),
		}
	}
	return tpm2.TPMTPublic{
		Type: tpm2.TPMAlgRSA, NameAlg: tpm2.TPMAlgSHA256, ObjectAttributes: attrs,
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgRSA, &tpm2.TPMSRSAParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
			Scheme: tpm2.TPMTRSAScheme{
				Scheme:  tpm2.TPMAlgRSASSA,
				Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgRSASSA, &tpm2.TPMSSigSchemeRSASSA{HashAlg: tpm2.TPMAlgSHA256}),
			},
			KeyBits: 2048,
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: make([]byte, 256)}),
	}
}

func (a *Attester) loadAK(handle uint32, ecc bool) error {
	if handle != 0 {
		if handle>>24 != 0x81 {
			return fmt.Errorf("tpm: AK handle %#x is not a persistent handle (0x81xxxxxx)", handle)
		}
		rsp, err := (tpm2.ReadPublic{ObjectHandle: tpm2.TPMHandle(handle)}).Execute(a.tpm)
		if err == nil {
			pub, err := rsp.OutPublic.Contents()
			if err != nil {
				return fmt.Errorf("tpm: reading the AK at %#x: %v", handle, err)
			}
			if !pub.ObjectAttributes.Restricted || !pub.ObjectAttributes.SignEncrypt || pub.ObjectAttributes.Decrypt || !pub.ObjectAttributes.FixedTPM {
				return fmt.Errorf("tpm: the key at persistent handle %#x is not a restricted, fixedTPM signing key; evict it or choose another AK handle", handle)
			}
			a.ak, a.akName = tpm2.TPMHandle(handle), rsp.Name
			return a.setSPKI(pub)
		}
		a.log.Debug("no AK at the persistent handle; creating one", "handle", fmt.Sprintf("%#x", handle), "err", err)
	}
	cp, err := (tpm2.CreatePrimary{
		PrimaryHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
		InPublic:      tpm2.New2B(akTemplate(ecc)),
	}).Execute(a.tpm)
	if err != nil {
		return fmt.Errorf("tpm: creating the attestation key under the endorsement hierarchy: %v", err)
	}
	pub, err := cp.OutPublic.Contents()
	if err != nil {
		return fmt.Errorf("tpm: reading the new AK: %v", err)
	}
	a.ak, a.akName, a.akFlush = cp.ObjectHandle, cp.Name, true
	if err := a.setSPKI(pub); err != nil {
		return err
	}
	if handle == 0 {
		return nil
	}
	if _, err := (tpm2.EvictControl{
		Auth:             tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		ObjectHandle:     tpm2.NamedHandle{Handle: cp.ObjectHandle, Name: cp.Name},
		PersistentHandle: tpm2.TPMHandle(handle),
	}).Execute(a.tpm); err != nil {
		return fmt.Errorf("tpm: storing the AK at persistent handle %#x: %v", handle, err)
	}
	if _, err := (tpm2.FlushContext{FlushHandle: cp.ObjectHandle}).Execute(a.tpm); err != nil {
		return fmt.Errorf("tpm: flushing the transient AK: %v", err)
	}
	a.ak, a.akFlush = tpm2.TPMHandle(handle), false
	return nil
}

func (a *Attester) setSPKI(pub *tpm2.TPMTPublic) error {
	key, err := tpm2.Pub(*pub)
	if err != nil {
		return fmt.Errorf("tpm: the AK's public area: %v", err)
	}
	spki, err := x509.MarshalPKIXPublicKey(key)
	if err != nil {
		return fmt.Errorf("tpm: encoding the AK public key: %v", err)
	}
	a.spki = spki
	sum := sha256.Sum256(spki)
	a.log.Debug("TPM attestation key ready", "ak", hex.EncodeToString(sum[:]))
	return nil
}

// allPCRs selects PCRs 0–23 of the SHA-256 bank, as Trustee quotes.
func allPCRs() tpm2.TPMLPCRSelection {
	return tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{
		Hash: tpm2.TPMAlgSHA256, PCRSelect: []byte{0xff, 0xff, 0xff},
	}}}
}

// Evidence quotes PCRs 0–23 with the report data as qualifying data.
func (a *Attester) Evidence(ctx context.Context, reportData []byte) (json.RawMessage, error) {
	if len(reportData) != ReportDataLen {
		return nil, fmt.Errorf("tpm: report data is %d bytes, want %d", len(reportData), ReportDataLen)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.tpm == nil {
		return nil, errors.New("tpm: attester is closed")
	}
	// The PCRs are read after the quote, so something extending a PCR
	// in between makes them disagree with the signed digest; quote again
	// then rather than send evidence that cannot verify.
	var lastErr error
	for try := 0; try < 3; try++ {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		msg, sig, err := a.quote(reportData)
		if err != nil {
			return nil, err
		}
		pcrs, err := a.readPCRs()
		if err != nil {
			return nil, err
		}
		q, err := ParseQuote(msg)
		if err != nil {
			return nil, fmt.Errorf("tpm: the TPM's own quote does not parse: %v", err)
		}
		s, err := ParseSignature(sig)
		if err != nil {
			return nil, fmt.Errorf("tpm: the TPM's own signature does not parse: %v", err)
		}
		if lastErr = checkPCRDigest(q, s.Hash, pcrs); lastErr != nil {
			a.log.Debug("PCRs changed between quote and read; quoting again", "err", lastErr)
			continue
		}
		ev := Evidence{
			AKPublic: base64.StdEncoding.EncodeToString(a.spki),
			Quote: EvidenceQuote{
				Signature: base64.StdEncoding.EncodeToString(sig),
				Message:   base64.StdEncoding.EncodeToString(msg),
			},
		}
		for _, p := range pcrs {
			ev.Quote.PCRs = append(ev.Quote.PCRs, hex.EncodeToString(p))
		}
		if a.credSecret != nil {
			ev.EKCert = base64.StdEncoding.EncodeToString(a.ekCert)
			ev.Credential = base64.StdEncoding.EncodeToString(a.credSecret)
			a.credSecret = nil
		}
		if a.eventLog != "-" {
			if b, err := os.ReadFile(a.eventLog); err == nil && len(b) > 0 {
				ev.EventLog = base64.StdEncoding.EncodeToString(b)
			} else {
				a.log.Debug("no firmware event log sent", "path", a.eventLog, "err", err)
			}
		}
		return json.Marshal(ev)
	}
	return nil, fmt.Errorf("tpm: PCRs kept changing while quoting: %v", lastErr)
}

func (a *Attester) quote(reportData []byte) (msg, sig []byte, err error) {
	q := tpm2.Quote{
		SignHandle:     tpm2.AuthHandle{Handle: a.ak, Name: a.akName, Auth: tpm2.PasswordAuth(nil)},
		QualifyingData: tpm2.TPM2BData{Buffer: bytes.Clone(reportData)},
		InScheme:       tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
		PCRSelect:      allPCRs(),
	}
	rsp, err := q.Execute(a.tpm)
	if errors.Is(err, tpm2.TPMRCSize) {
		// A TPM whose largest bank is SHA-256 holds 32 bytes of
		// qualifying data; the verifier accepts that prefix.
		q.QualifyingData.Buffer = bytes.Clone(reportData[:ShortReportDataLen])
		rsp, err = q.Execute(a.tpm)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("tpm: quoting PCRs 0-23: %v", err)
	}
	return bytes.Clone(rsp.Quoted.Bytes()), tpm2.Marshal(rsp.Signature), nil
}

// readPCRs reads PCRs 0–23 of the SHA-256 bank; a TPM returns at most
// eight per TPM2_PCR_Read, so it asks until all have come.
func (a *Attester) readPCRs() ([][]byte, error) {
	out := make([][]byte, numPCRs)
	for {
		sel, missing := []byte{0, 0, 0}, 0
		for i, v := range out {
			if v == nil {
				sel[i/8] |= 1 << (i % 8)
				missing++
			}
		}
		if missing == 0 {
			return out, nil
		}
		rsp, err := (tpm2.PCRRead{PCRSelectionIn: tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{
			Hash: tpm2.TPMAlgSHA256, PCRSelect: sel,
		}}}}).Execute(a.tpm)
		if err != nil {
			return nil, fmt.Errorf("tpm: reading PCRs: %v", err)
		}
		var got []int
		for _, s := range rsp.PCRSelectionOut.PCRSelections {
			if s.Hash != tpm2.TPMAlgSHA256 {
				continue
			}
			for bi, v := range s.PCRSelect {
				for bit := 0; bit < 8; bit++ {
					if v&(1<<bit) != 0 {
						got = append(got, bi*8+bit)
					}
				}
			}
		}
		if len(got) == 0 || len(got) != len(rsp.PCRValues.Digests) {
			return nil, errors.New("tpm: the TPM returned no SHA-256 PCRs (is the SHA-256 bank allocated?)")
		}
		for k, i := range got {
			if i >= numPCRs || out[i] != nil || len(rsp.PCRValues.Digests[k].Buffer) != sha256.Size {
				return nil, fmt.Errorf("tpm: the TPM returned PCR %d unasked or with %d bytes", i, len(rsp.PCRValues.Digests[k].Buffer))
			}
			out[i] = bytes.Clone(rsp.PCRValues.Digests[k].Buffer)
		}
	}
}
