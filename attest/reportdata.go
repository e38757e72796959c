package attest

import (
	"bytes"
	"crypto/sha512"
	"encoding/json"
	"fmt"

	"github.com/gowebpki/jcs"
)

// ReportDataSize is the size of the binding ReportData returns: the
// report data field of SNP and TDX evidence.
const ReportDataSize = 64

// maxJWKSize bounds a TEE public key JWK. An RSA-8192 JWK is about 1.4 KiB.
const maxJWKSize = 8 << 10

// ReportData binds a handshake as Trustee does: SHA-384 over the JCS
// (RFC 8785) form of {"additional-evidence":additional,"nonce":nonce,
// "tee-pubkey":teePubKey}, zero-padded to 64 bytes.
//
// The JWK is hashed in the form Trustee's kbs-types TeePubKey gives it
// (kty, alg and crv/x/y, n/e or pub), not as sent: both Trustee's guest
// and its KBS parse the key into that type and hash its serialisation,
// so members outside it never reach the hash. Doing the same keeps a
// Trustee guest and a Trustee KBS interoperable with ours.
func ReportData(nonce string, teePubKey json.RawMessage, additional string) ([]byte, error) {
	canon, err := runtimeDataJCS(nonce, teePubKey, additional)
	if err != nil {
		return nil, err
	}
	sum := sha512.Sum384(canon)
	out := make([]byte, ReportDataSize)
	copy(out, sum[:])
	return out, nil
}

// runtimeDataJCS returns the canonical JSON that ReportData hashes.
func runtimeDataJCS(nonce string, teePubKey json.RawMessage, additional string) ([]byte, error) {
	key, err := normalJWK(teePubKey)
	if err != nil {
		return nil, err
	}
	doc, err := json.Marshal(struct {
		Additional string            `json:"additional-evidence"`
		Nonce      string            `json:"nonce"`
		TeePubKey  map[string]string `json:"tee-pubkey"`
	}{additional, nonce, key})
	if err != nil {
		return nil, fmt.Errorf("encoding runtime data: %w", err)
	}
	canon, err := jcs.Transform(doc)
	if err != nil {
		return nil, fmt.Errorf("canonicalising runtime data (RFC 8785): %w", err)
	}
	return canon, nil
}

// jwkMembers lists, per kty, the members of Trustee's TeePubKey.
var jwkMembers = map[string][]string{
	"EC":  {"crv", "alg", "x", "y"},
	"RSA": {"alg", "n", "e"},
	"AKP": {"alg", "pub"},
}

// normalJWK parses a TEE public key JWK into the members Trustee's
// TeePubKey keeps. Every kept member must be a string; other members
// are dropped as serde drops them.
func normalJWK(raw json.RawMessage) (map[string]string, error) {
	if len(raw) > maxJWKSize {
		return nil, fmt.Errorf("tee-pubkey: %d bytes, more than the %d a JWK needs", len(raw), maxJWKSize)
	}
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || raw[0] != '{' {
		return nil, fmt.Errorf("tee-pubkey: want a JWK object, got %s", preview(raw))
	}
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(raw, &obj); err != nil {
		return nil, fmt.Errorf("tee-pubkey: not a JSON object: %w", err)
	}
	kty, err := jwkString(obj, "kty")
	if err != nil {
		return nil, err
	}
	members, ok := jwkMembers[kty]
	if !ok {
		return nil, fmt.Errorf("tee-pubkey: kty %q unsupported (want EC, RSA or AKP)", kty)
	}
	out := map[string]string{"kty": kty}
	for _, m := range members {
		v, err := jwkString(obj, m)
		if err != nil {
			return nil, err
		}
		out[m] = v
	}
	return out, nil
}

func jwkString(obj map[string]json.RawMessage, name string) (string, error) {
	raw, ok := obj[name]
	if !ok {
		return "", fmt.Errorf("tee-pubkey: member %q missing", name)
	}
	var s string
	if raw = bytes.TrimSpace(raw); len(raw) == 0 || raw[0] != '"' || json.Unmarshal(raw, &s) != nil {
		return "", fmt.Errorf("tee-pubkey: member %q is not a string: %s", name, preview(raw))
	}
	return s, nil
}

// preview quotes at most 40 bytes of untrusted input for an error.
func preview(b []byte) string {
	const n = 40
	if len(b) > n {
		return fmt.Sprintf("%q…", b[:n])
	}
	return fmt.Sprintf("%q", b)
}
