package attest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
)

// Size limits for the protocol's messages, for whoever reads them off
// the wire. An Attestation carries TDX quotes with event logs and SNP
// reports with certificate chains as JSON integer arrays, hence MiBs.
const (
	MaxRequestSize     = 64 << 10
	MaxChallengeSize   = 64 << 10
	MaxAttestationSize = 8 << 20
	MaxAttestResponse  = 1 << 20 // the EAR token
	maxNonceLen        = 1024
)

// ParseRequest decodes the body of POST /auth. Members beyond the
// protocol's are ignored, as Trustee ignores them; the known ones must
// have their types.
func ParseRequest(b []byte) (*Request, error) {
	var r Request
	if err := decodeMessage("auth request", b, MaxRequestSize, &r); err != nil {
		return nil, err
	}
	if r.Version == "" {
		return nil, errors.New(`auth request: "version" missing`)
	}
	if r.Tee == "" {
		return nil, errors.New(`auth request: "tee" missing`)
	}
	return &r, nil
}

// ParseChallenge decodes the answer to /auth.
func ParseChallenge(b []byte) (*Challenge, error) {
	var c Challenge
	if err := decodeMessage("challenge", b, MaxChallengeSize, &c); err != nil {
		return nil, err
	}
	if err := checkNonce(c.Nonce); err != nil {
		return nil, fmt.Errorf("challenge: %w", err)
	}
	return &c, nil
}

// ParseAttestation decodes the body of POST /attest and checks that the
// members the binding needs are there: a nonce, a tee-pubkey object and
// primary evidence.
func ParseAttestation(b []byte) (*Attestation, error) {
	var a Attestation
	if err := decodeMessage("attestation", b, MaxAttestationSize, &a); err != nil {
		return nil, err
	}
	if err := checkNonce(a.RuntimeData.Nonce); err != nil {
		return nil, fmt.Errorf("attestation: runtime-data: %w", err)
	}
	if k := bytes.TrimSpace(a.RuntimeData.TeePubKey); len(k) == 0 || k[0] != '{' {
		return nil, errors.New(`attestation: runtime-data: "tee-pubkey" is not a JWK object`)
	}
	if p := bytes.TrimSpace(a.TeeEvidence.Primary); len(p) == 0 || string(p) == "null" {
		return nil, errors.New(`attestation: tee-evidence: "primary_evidence" missing`)
	}
	return &a, nil
}

func checkNonce(n string) error {
	switch {
	case n == "":
		return errors.New(`"nonce" missing`)
	case len(n) > maxNonceLen:
		return fmt.Errorf(`"nonce" of %d bytes, more than %d`, len(n), maxNonceLen)
	}
	return nil
}

// decodeMessage decodes one JSON object of at most max bytes into v,
// refusing trailing data.
func decodeMessage(what string, b []byte, max int, v any) error {
	if len(b) > max {
		return fmt.Errorf("%s: %d bytes, more than %d", what, len(b), max)
	}
	if t := bytes.TrimSpace(b); len(t) == 0 || t[0] != '{' {
		return fmt.Errorf("%s: want a JSON object, got %s", what, preview(t))
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	if len(bytes.TrimSpace(b[dec.InputOffset():])) != 0 {
		return fmt.Errorf("%s: trailing data after the JSON object", what)
	}
	return nil
}
