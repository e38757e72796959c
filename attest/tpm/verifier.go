// Package tpm attests a guest with a TPM 2.0 quote in Trustee's `tpm`
// evidence shape: the attestation key's public key, a TPMS_ATTEST quote
// over PCRs 0–23 of the SHA-256 bank whose qualifying data is the
// handshake's report data, its signature, and the PCR values. cwrun adds
// the firmware event log (field "eventlog", base64) when the guest can
// read it; Trustee's verifier ignores that field.
//
// A quote proves PCR values only if the AK is a restricted key of a TPM
// the broker trusts: a restricted key refuses to sign data that starts
// with TPM_GENERATED_VALUE, so only the TPM itself can make a TPMS_ATTEST
// it signs. Nothing in the evidence proves the AK restricted; that is
// what registering the AK (Options.TrustedAKs, or the "ak" claim against
// a reference value) stands for.
package tpm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math/big"
	"strconv"
	"strings"

	"github.com/cwrun/cwrun/attest"
)

// ReportDataLen is how much of the 64-byte report data a quote carries
// as qualifying data. Trustee's attester passes all 64 bytes (TPM2B_DATA
// holds a SHA-512 digest on TPMs with that bank); TPMs whose largest
// bank is SHA-256 take only 32, so ShortReportDataLen is accepted too.
const (
	ReportDataLen      = 64
	ShortReportDataLen = 32
)

// Evidence is Trustee's `tpm` evidence, plus cwrun's optional event log.
type Evidence struct {
	AKPublic string        `json:"ak_public"` // base64 DER SubjectPublicKeyInfo
	Quote    EvidenceQuote `json:"tpm_quote"`
	// EventLog is the firmware's crypto-agile event log, base64; empty
	// when the guest could not read it.
	EventLog string `json:"eventlog,omitempty"`
	// EKCert and Credential are cwrun's credential activation (see
	// activation.go): the EK certificate (base64 DER) and the secret the
	// TPM recovered from the broker's credential (base64).
	EKCert     string `json:"ek_cert,omitempty"`
	Credential string `json:"ak_credential,omitempty"`
}

// EvidenceQuote is Trustee's "tpm_quote".
type EvidenceQuote struct {
	Signature string   `json:"signature"` // base64 TPMT_SIGNATURE
	Message   string   `json:"message"`   // base64 TPMS_ATTEST
	PCRs      []string `json:"pcrs"`      // hex SHA-256 bank, PCR 0..23
}

// Options configure a Verifier.
type Options struct {
	// TrustedAKs are the AKs accepted, as hex SHA-256 of the AK's DER
	// SubjectPublicKeyInfo (Trustee's trusted_ak hashes). Empty: every
	// AK whose quote verifies is accepted, and trust is left to the
	// broker comparing the "ak" claim with a reference value.
	TrustedAKs []string
	// RequireEventLog refuses evidence without an event log, for brokers
	// whose reference values are event digests.
	RequireEventLog bool
	// EKCAs are the CA certificates trusted to vouch for TPMs' EKs:
	// self-signed ones are trust anchors, the others intermediates. A
	// guest whose EK certificate chains to an anchor proves its AK by
	// credential activation, and its claims carry "ek_ca", the SHA-256
	// of the anchor's DER. None: only registered AKs are trusted.
	EKCAs []*x509.Certificate
	// CredentialKey is the secret (32 bytes or more) from which the
	// credentials' secrets are derived per handshake; every replica of
	// a broker must hold the same. Needed with EKCAs.
	CredentialKey []byte
	// PreviousCredentialKeys are earlier credential keys (a secrets key
	// rotation in progress): a credential that a replica not yet rotated
	// issued still activates. Challenges use CredentialKey.
	PreviousCredentialKeys [][]byte
}

type verifier struct {
	trusted                  map[[sha256.Size]byte]bool
	opts                     Options
	ekRoots, ekIntermediates *x509.CertPool
}

// NewVerifier returns the broker-side verifier for `tpm` evidence.
func NewVerifier(opts Options) (attest.Verifier, error) {
	v := &verifier{trusted: map[[sha256.Size]byte]bool{}, opts: opts}
	for _, s := range opts.TrustedAKs {
		b, err := hex.DecodeString(strings.TrimSpace(s))
		if err != nil || len(b) != sha256.Size {
			return nil, fmt.Errorf("tpm: trusted AK %q is not a hex SHA-256 digest of an AK's SubjectPublicKeyInfo (64 hex digits)", s)
		}
		v.trusted[[sha256.Size]byte(b)] = true
	}
	if len(opts.EKCAs) > 0 {
		if len(opts.CredentialKey) < 32 {
			return nil, fmt.Errorf("tpm: EK CAs need a credential key of at least 32 bytes")
		}
		v.ekRoots, v.ekIntermediates = x509.NewCertPool(), x509.NewCertPool()
		anchors := 0
		for _, c := range opts.EKCAs {
			if bytes.Equal(c.RawIssuer, c.RawSubject) && c.CheckSignatureFrom(c) == nil {
				v.ekRoots.AddCert(c)
				anchors++
			} else {
				v.ekIntermediates.AddCert(c)
			}
		}
		if anchors == 0 {
			return nil, fmt.Errorf("tpm: the EK CA certificates hold no self-signed (root) certificate to trust")
		}
	}
	return v, nil
}

func (v *verifier) Tee() string { return attest.TeeTPM }

// deny wraps attest.ErrEvidence with the failed check.
func deny(format string, a ...any) error {
	return fmt.Errorf("%w: tpm: %s", attest.ErrEvidence, fmt.Sprintf(format, a...))
}

// ParseEvidence decodes Trustee's `tpm` evidence JSON strictly in its
// types (unknown fields are ignored, as Trustee does: its attester adds
// fields such as "report_data").
func ParseEvidence(raw []byte) (*Evidence, error) {
	var ev Evidence
	if err := json.Unmarshal(raw, &ev); err != nil {
		return nil, fmt.Errorf("evidence is not Trustee's tpm JSON: %v", err)
	}
	switch {
	case ev.AKPublic == "":
		return nil, fmt.Errorf("evidence has no ak_public")
	case ev.Quote.Message == "" || ev.Quote.Signature == "":
		return nil, fmt.Errorf("evidence has no tpm_quote message or signature")
	case len(ev.Quote.PCRs) != numPCRs:
		return nil, fmt.Errorf("tpm_quote lists %d PCRs, want %d (PCR 0..23 of the SHA-256 bank)", len(ev.Quote.PCRs), numPCRs)
	}
	return &ev, nil
}

func (v *verifier) Verify(ctx context.Context, raw json.RawMessage, reportData []byte) (*attest.Claims, error) {
	if err := ctx.Err(); err != nil {
		return nil, deny("%v", err)
	}
	if len(reportData) != ReportDataLen {
		return nil, deny("expected report data is %d bytes, want %d", len(reportData), ReportDataLen)
	}
	ev, err := ParseEvidence(raw)
	if err != nil {
		return nil, deny("%v", err)
	}
	spki, err := base64.StdEncoding.DecodeString(ev.AKPublic)
	if err != nil {
		return nil, deny("ak_public is not base64: %v", err)
	}
	ak, err := parseAK(spki)
	if err != nil {
		return nil, deny("ak_public: %v", err)
	}
	akHash := sha256.Sum256(spki)
	if len(v.trusted) > 0 && !v.trusted[akHash] {
		return nil, deny("AK %x is not a trusted AK (register it with the broker if this TPM is yours)", akHash)
	}
	msg, err := base64.StdEncoding.DecodeString(ev.Quote.Message)
	if err != nil {
		return nil, deny("tpm_quote.message is not base64: %v", err)
	}
	sigBytes, err := base64.StdEncoding.DecodeString(ev.Quote.Signature)
	if err != nil {
		return nil, deny("tpm_quote.signature is not base64: %v", err)
	}
	sig, err := ParseSignature(sigBytes)
	if err != nil {
		return nil, deny("%v", err)
	}
	if err := verifySignature(ak, sig, msg); err != nil {
		return nil, deny("quote signature does not verify with the AK: %v", err)
	}
	q, err := ParseQuote(msg)
	if err != nil {
		return nil, deny("%v", err)
	}
	if !bindsReportData(q.ExtraData, reportData) {
		return nil, deny("quote's qualifying data is not this handshake's report data (a replayed or foreign quote)")
	}
	pcrs, err := decodePCRs(ev.Quote.PCRs)
	if err != nil {
		return nil, deny("%v", err)
	}
	if err := checkPCRDigest(q, sig.Hash, pcrs); err != nil {
		return nil, deny("%v", err)
	}
	claims := &attest.Claims{Tee: attest.TeeTPM, Values: map[string]string{
		"ak":               hex.EncodeToString(akHash[:]),
		"reset_count":      strconv.FormatUint(uint64(q.ResetCount), 10),
		"restart_count":    strconv.FormatUint(uint64(q.RestartCount), 10),
		"clock":            strconv.FormatUint(q.Clock, 10),
		"firmware_version": fmt.Sprintf("%016x", q.FirmwareVersion),
	}}
	for i, p := range pcrs {
		claims.Values["pcr"+strconv.Itoa(i)] = hex.EncodeToString(p)
	}
	if ev.EventLog == "" {
		if v.opts.RequireEventLog {
			return nil, deny("evidence carries no event log and this broker requires one")
		}
		return claims, nil
	}
	logBytes, err := base64.StdEncoding.DecodeString(ev.EventLog)
	if err != nil {
		return nil, deny("eventlog is not base64: %v", err)
	}
	log, err := ParseEventLog(logBytes)
	if err != nil {
		return nil, deny("%v", err)
	}
	if err := log.CheckReplay(pcrs); err != nil {
		return nil, deny("event log does not match the quoted PCRs: %v", err)
	}
	for k, val := range log.BootClaims() {
		claims.Values[k] = val
	}
	return claims, nil
}

// bindsReportData accepts the full 64 bytes, or the 32-byte prefix a
// TPM without a bank larger than SHA-256 can carry.
func bindsReportData(extra, rd []byte) bool {
	switch len(extra) {
	case ReportDataLen, ShortReportDataLen:
		return bytes.Equal(extra, rd[:len(extra)])
	}
	return false
}

func parseAK(spki []byte) (crypto.PublicKey, error) {
	pub, err := x509.ParsePKIXPublicKey(spki)
	if err != nil {
		return nil, fmt.Errorf("not a DER SubjectPublicKeyInfo: %v", err)
	}
	switch k := pub.(type) {
	case *rsa.PublicKey:
		if k.N.BitLen() < 2048 {
			return nil, fmt.Errorf("RSA AK of %d bits, want at least 2048", k.N.BitLen())
		}
	case *ecdsa.PublicKey:
	default:
		return nil, fmt.Errorf("AK is a %T, want RSA or ECDSA", pub)
	}
	return pub, nil
}

func verifySignature(ak crypto.PublicKey, sig *Signature, msg []byte) error {
	h, err := hashFor(sig.Hash)
	if err != nil {
		return err
	}
	hh := h.New()
	hh.Write(msg)
	digest := hh.Sum(nil)
	switch k := ak.(type) {
	case *rsa.PublicKey:
		switch sig.Alg {
		case algRSASSA:
			return rsa.VerifyPKCS1v15(k, h, digest, sig.RSA)
		case algRSAPSS:
			// TPMs sign with the salt as long as the digest, and some
			// with the largest salt; accept any salt length.
			return rsa.VerifyPSS(k, h, digest, sig.RSA, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthAuto})
		}
	case *ecdsa.PublicKey:
		if sig.Alg == algECDSA {
			r, s := new(big.Int).SetBytes(sig.R), new(big.Int).SetBytes(sig.S)
			if !ecdsa.Verify(k, digest, r, s) {
				return fmt.Errorf("ECDSA verification failed")
			}
			return nil
		}
	}
	return fmt.Errorf("signature algorithm %#04x does not fit a %T AK", sig.Alg, ak)
}

func decodePCRs(in []string) ([][]byte, error) {
	out := make([][]byte, len(in))
	for i, s := range in {
		b, err := hex.DecodeString(s)
		if err != nil || len(b) != sha256.Size {
			return nil, fmt.Errorf("tpm_quote.pcrs[%d] is not 64 hex digits", i)
		}
		out[i] = b
	}
	return out, nil
}

// checkPCRDigest requires the quote to cover exactly PCRs 0–23 of the
// SHA-256 bank (fewer would leave listed values unsigned) and its
// pcrDigest to be the signing hash over those values in order.
func checkPCRDigest(q *Quote, sigHash uint16, pcrs [][]byte) error {
	if len(q.Selection) != 1 || q.Selection[0].Hash != algSHA256 || len(q.Selection[0].PCRs) != numPCRs || q.Selection[0].PCRs[numPCRs-1] != numPCRs-1 {
		return fmt.Errorf("quote does not select exactly PCRs 0-23 of the SHA-256 bank (selection %v)", q.Selection)
	}
	h, err := hashFor(sigHash)
	if err != nil {
		return err
	}
	hh := h.New()
	for _, i := range q.Selection[0].PCRs {
		hh.Write(pcrs[i])
	}
	if got := hh.Sum(nil); !bytes.Equal(got, q.PCRDigest) {
		return fmt.Errorf("quote's PCR digest %x is not the digest of the listed PCRs (%x): a PCR value was changed", q.PCRDigest, got)
	}
	return nil
}
