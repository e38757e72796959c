package attest

import (
	"context"
	"crypto"
	"encoding/json"
	"errors"
	"net/http"
)

// errTODO marks what the attest helper is filling in.
var errTODO = errors.New("not implemented yet")

// ReportData binds a handshake as Trustee does: SHA-384 over the JCS
// (RFC 8785) form of {"additional-evidence":additional,"nonce":nonce,
// "tee-pubkey":teePubKey}, zero-padded to 64 bytes.
func ReportData(nonce string, teePubKey json.RawMessage, additional string) ([]byte, error) {
	return nil, errTODO
}

// TeeKey is the guest's ephemeral key pair for one handshake.
type TeeKey struct {
	Private crypto.PrivateKey
	JWK     json.RawMessage // public part, as sent in RuntimeData.TeePubKey
}

// NewTeeKey makes an EC P-256 ECDH-ES+A256KW key (the guest default).
func NewTeeKey() (*TeeKey, error) { return nil, errTODO }

// EncryptResource seals plaintext to a TEE public key JWK as a JWE in
// flattened JSON serialization, A256GCM, with ECDH-ES+A256KW (EC keys)
// or RSA-OAEP-256 (RSA keys).
func EncryptResource(teePubKey json.RawMessage, plaintext []byte) ([]byte, error) {
	return nil, errTODO
}

// DecryptResource opens a JWE made by EncryptResource.
func DecryptResource(key *TeeKey, jwe []byte) ([]byte, error) { return nil, errTODO }

// Client runs the RCAR handshake against a KBS and fetches resources.
type Client struct {
	// BaseURL is the broker's root, e.g. "https://kbs:8443" (the client
	// adds /kbs/v0).
	BaseURL  string
	HTTP     *http.Client // nil: http.DefaultClient
	Attester Attester
}

// Resource runs auth → attest → GET /resource/<path> and returns the
// decrypted resource. path is "repo/type/tag".
func (c *Client) Resource(ctx context.Context, path string) ([]byte, error) {
	return nil, errTODO
}
