// Package attest holds what both ends of attested key release share:
// the KBS protocol's messages (Trustee's RCAR handshake, version 0.4.0,
// see docs/kbs-protocol.md), the report-data binding, and the two seams
// every TEE plugs into: an Attester in the guest and a Verifier in the
// broker. Per-TEE code lives in attest/sample, attest/snp, attest/tdx
// and attest/tpm; the broker in attest/kbs knows only these interfaces.
package attest

import (
	"context"
	"encoding/json"
	"errors"
)

// ProtocolVersion is the only KBS protocol version spoken (Trustee
// refuses any other).
const ProtocolVersion = "0.4.0"

// TEE names, as sent in Request.Tee.
const (
	TeeSample = "sample"
	TeeSNP    = "snp"
	TeeTDX    = "tdx"
	TeeTPM    = "tpm"
)

// Request is the body of POST /kbs/v0/auth.
type Request struct {
	Version     string          `json:"version"`
	Tee         string          `json:"tee"`
	ExtraParams json.RawMessage `json:"extra-params"`
}

// Challenge is the answer to /auth.
type Challenge struct {
	Nonce       string          `json:"nonce"`
	ExtraParams json.RawMessage `json:"extra-params"`
}

// Attestation is the body of POST /kbs/v0/attest.
type Attestation struct {
	InitData    *InitData   `json:"init-data,omitempty"`
	RuntimeData RuntimeData `json:"runtime-data"`
	TeeEvidence TeeEvidence `json:"tee-evidence"`
}

// InitData is the optional measured configuration the guest booted with.
type InitData struct {
	Format string `json:"format"`
	Body   string `json:"body"`
}

// RuntimeData is what the evidence's report data binds.
type RuntimeData struct {
	Nonce     string          `json:"nonce"`
	TeePubKey json.RawMessage `json:"tee-pubkey"` // a JWK: EC P-256 ECDH-ES+A256KW or RSA RSA-OAEP-256
}

// TeeEvidence carries the TEE's evidence.
type TeeEvidence struct {
	Primary    json.RawMessage `json:"primary_evidence"`
	Additional string          `json:"additional_evidence"` // a JSON document as a string; "" when none
}

// AttestResponse is the answer to /attest.
type AttestResponse struct {
	Token string `json:"token"`
}

// Attester produces evidence in the guest. It is consumed by the RCAR
// client.
type Attester interface {
	// Tee is the name sent in Request.Tee.
	Tee() string
	// Evidence returns primary evidence (the Trustee JSON shape for this
	// TEE) whose report data is reportData. reportData is 64 bytes; an
	// attester whose TEE takes fewer uses the prefix it can carry.
	Evidence(ctx context.Context, reportData []byte) (json.RawMessage, error)
}

// Verifier checks evidence in the broker. It is consumed by attest/kbs.
type Verifier interface {
	// Tee is the name this verifier answers for.
	Tee() string
	// Verify checks the evidence's signatures up to the trust roots the
	// verifier was made with, and that it carries reportData (the
	// binding of nonce and TEE key). It returns what the evidence claims
	// about the guest; comparing those claims with a workload's reference
	// values is Appraise's job, not Verify's.
	//
	// Every error wraps ErrEvidence and says which check failed.
	Verify(ctx context.Context, evidence json.RawMessage, reportData []byte) (*Claims, error)
}

// Claims are what verified evidence says about the guest.
type Claims struct {
	Tee string `json:"tee"`
	// Insecure is true for evidence that proves nothing (sample); the
	// token and the broker's log say so.
	Insecure bool `json:"insecure,omitempty"`
	// Values are the measured facts, by the names reference values use,
	// lower-case hex for byte strings: for snp "measurement", "policy",
	// "policy_debug" ("true"/"false"), "host_data", "reported_tcb",
	// "chip_id"...; for tdx "mr_td", "rtmr0".."rtmr3", "mr_config_id"...;
	// for tpm "pcr0".."pcr23", "ak" (SHA-256 of the AK's SPKI).
	Values map[string]string `json:"values"`
}

// ErrEvidence is wrapped by every verification failure.
var ErrEvidence = errors.New("evidence rejected")
