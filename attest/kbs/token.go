package kbs

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"strings"
	"time"
)

// Attestation tokens are EAR-shaped JWTs, as Trustee's attestation
// service issues them, signed ES256 with the broker's token key; the
// public key rides in the header's "jwk" so that a relying party can
// pin it. JOSE is done by hand here: the broker needs exactly one
// algorithm per token kind, and a parser that knows only that one
// cannot be talked into another (no "alg":"none", no HMAC with a public
// key, no header-supplied keys).

// EAR names used in the tokens.
const (
	earProfile       = "tag:github.com,2023:veraison/ear"
	earStatusAffirm  = "affirming"
	earStatusWarning = "warning"
	earSubmod        = "cpu0"
	runtimeDataKey   = "runtime_data_claims"
)

// tokenClaims are the claims of an attestation token. Submods follows
// EAR (what Trustee's resource policies read); Cwrun repeats the facts
// in the form appraisal reads, so nothing has to be dug out of a TEE's
// annotated-evidence shape.
type tokenClaims struct {
	Profile    string                `json:"eat_profile"`
	IssuedAt   int64                 `json:"iat"`
	NotBefore  int64                 `json:"nbf"`
	Expires    int64                 `json:"exp"`
	VerifierID earVerifierID         `json:"ear.verifier-id"`
	Submods    map[string]earSubmodT `json:"submods"`
	Cwrun      cwrunClaims           `json:"cwrun"`
}

type earVerifierID struct {
	Developer string `json:"developer"`
	Build     string `json:"build"`
}

type earSubmodT struct {
	Status string `json:"ear.status"`
	// Evidence holds the TEE's claims under its name and the runtime
	// data (the TEE key) under "runtime_data_claims".
	Evidence map[string]json.RawMessage `json:"ear.veraison.annotated-evidence"`
}

type cwrunClaims struct {
	Tee      string            `json:"tee"`
	Insecure bool              `json:"insecure"`
	Values   map[string]string `json:"values"`
}

type runtimeDataClaims struct {
	TeePubKey json.RawMessage `json:"tee-pubkey"`
}

// tokenView is what the broker reads back from a verified token: the
// times, cwrun's claims and the TEE key. Decoding only these (the rest
// of the EAR shape is skipped) keeps a resource fetch cheap.
type tokenView struct {
	IssuedAt int64 `json:"iat"`
	Expires  int64 `json:"exp"`
	Submods  struct {
		CPU0 struct {
			Evidence struct {
				RuntimeData runtimeDataClaims `json:"runtime_data_claims"`
			} `json:"ear.veraison.annotated-evidence"`
		} `json:"cpu0"`
	} `json:"submods"`
	Cwrun cwrunClaims `json:"cwrun"`
}

// teePubKey is the TEE key the token's evidence bound.
func (c *tokenView) teePubKey() (json.RawMessage, error) {
	k := c.Submods.CPU0.Evidence.RuntimeData.TeePubKey
	if len(k) == 0 || string(k) == "null" {
		return nil, errors.New("token's runtime_data_claims carry no tee-pubkey")
	}
	return k, nil
}

// tokenSigner signs and verifies attestation tokens.
type tokenSigner struct {
	key *ecdsa.PrivateKey
	// header is the encoded protected header, the same for every token.
	header string
}

func newTokenSigner(key *ecdsa.PrivateKey) (*tokenSigner, error) {
	jwk, err := ecPublicJWK(&key.PublicKey)
	if err != nil {
		return nil, err
	}
	h, err := json.Marshal(struct {
		Alg string          `json:"alg"`
		Typ string          `json:"typ"`
		JWK json.RawMessage `json:"jwk"`
	}{"ES256", "JWT", jwk})
	if err != nil {
		return nil, err
	}
	return &tokenSigner{key: key, header: base64.RawURLEncoding.EncodeToString(h)}, nil
}

// ecPublicJWK renders a P-256 public key as a JWK.
func ecPublicJWK(pub *ecdsa.PublicKey) (json.RawMessage, error) {
	if pub.Curve != elliptic.P256() {
		return nil, errors.New("not a P-256 key")
	}
	b, err := pub.Bytes() // uncompressed point: 0x04 || X || Y
	if err != nil {
		return nil, err
	}
	return json.Marshal(map[string]string{
		"kty": "EC",
		"crv": "P-256",
		"alg": "ES256",
		"x":   base64.RawURLEncoding.EncodeToString(b[1:33]),
		"y":   base64.RawURLEncoding.EncodeToString(b[33:65]),
	})
}

func (t *tokenSigner) sign(claims *tokenClaims) (string, error) {
	payload, err := claims.appendJSON(make([]byte, 0, 1024))
	if err != nil {
		return "", err
	}
	return signES256(t.key, t.header, payload)
}

// signES256 makes a compact JWS over header (already encoded) and
// payload.
func signES256(key *ecdsa.PrivateKey, header string, payload []byte) (string, error) {
	var sb strings.Builder
	sb.Grow(len(header) + 1 + base64.RawURLEncoding.EncodedLen(len(payload)) + 1 + 86)
	sb.WriteString(header)
	sb.WriteByte('.')
	sb.WriteString(base64.RawURLEncoding.EncodeToString(payload))
	digest := sha256.Sum256([]byte(sb.String()))
	r, s, err := ecdsa.Sign(rand.Reader, key, digest[:])
	if err != nil {
		return "", err
	}
	var sig [64]byte
	r.FillBytes(sig[:32])
	s.FillBytes(sig[32:])
	sb.WriteByte('.')
	sb.WriteString(base64.RawURLEncoding.EncodeToString(sig[:]))
	return sb.String(), nil
}

// jwsParts splits a compact JWS and decodes its header, payload and
// signature. It bounds the size first: tokens arrive from anyone.
func jwsParts(tok string) (header, payload, sig []byte, signingInput string, err error) {
	if len(tok) > maxCookie {
		return nil, nil, nil, "", errors.New("token too long")
	}
	i := strings.IndexByte(tok, '.')
	j := strings.LastIndexByte(tok, '.')
	if i < 0 || i == j {
		return nil, nil, nil, "", errors.New("token is not a compact JWS (want header.payload.signature)")
	}
	if strings.IndexByte(tok[i+1:j], '.') >= 0 {
		return nil, nil, nil, "", errors.New("token has more than three parts (a JWE is not accepted)")
	}
	dec := base64.RawURLEncoding
	if header, err = dec.DecodeString(tok[:i]); err != nil {
		return nil, nil, nil, "", errors.New("token header is not base64url")
	}
	if payload, err = dec.DecodeString(tok[i+1 : j]); err != nil {
		return nil, nil, nil, "", errors.New("token payload is not base64url")
	}
	if sig, err = dec.DecodeString(tok[j+1:]); err != nil {
		return nil, nil, nil, "", errors.New("token signature is not base64url")
	}
	return header, payload, sig, tok[:j], nil
}

type joseHeader struct {
	Alg  string          `json:"alg"`
	Typ  string          `json:"typ,omitempty"`
	Crit []string        `json:"crit,omitempty"`
	JWK  json.RawMessage `json:"jwk,omitempty"`
}

func parseHeader(b []byte) (joseHeader, error) {
	var h joseHeader
	if err := json.Unmarshal(b, &h); err != nil {
		return h, errors.New("token header is not JSON")
	}
	if len(h.Crit) > 0 {
		// RFC 7515 4.1.11: unknown critical extensions must be refused.
		return h, fmt.Errorf("token header has critical extensions %q this broker does not know", h.Crit)
	}
	return h, nil
}

// verifyES256 checks a raw r||s signature.
func verifyES256(pub *ecdsa.PublicKey, signingInput string, sig []byte) bool {
	if len(sig) != 64 {
		return false
	}
	digest := sha256.Sum256([]byte(signingInput))
	r := new(big.Int).SetBytes(sig[:32])
	s := new(big.Int).SetBytes(sig[32:])
	return ecdsa.Verify(pub, digest[:], r, s)
}

// verify checks an attestation token: ES256 under the broker's own key
// (whatever the header's jwk says), and not expired at now.
func (t *tokenSigner) verify(tok string, now time.Time) (*tokenView, []byte, error) {
	return t.check(tok, now, true)
}

// check is verify with the signature check optional, for tokens whose
// origin is already proven (sealed in a session cookie).
func (t *tokenSigner) check(tok string, now time.Time, checkSig bool) (*tokenView, []byte, error) {
	hb, payload, sig, si, err := jwsParts(tok)
	if err != nil {
		return nil, nil, err
	}
	// The broker's own header (ES256, its key) needs no parsing; any
	// other is read and judged.
	if len(si) <= len(t.header) || si[:len(t.header)] != t.header || si[len(t.header)] != '.' {
		h, err := parseHeader(hb)
		if err != nil {
			return nil, nil, err
		}
		if h.Alg != "ES256" {
			return nil, nil, fmt.Errorf("token algorithm %q refused: attestation tokens are ES256", truncate(h.Alg, 16))
		}
	}
	if checkSig && !verifyES256(&t.key.PublicKey, si, sig) {
		return nil, nil, errors.New("token signature does not verify under this broker's token key")
	}
	c, err := decodeTokenView(payload)
	if err != nil {
		return nil, nil, errors.New("token claims are not the broker's shape")
	}
	if c.Expires == 0 || now.Unix() >= c.Expires {
		return nil, nil, errors.New("token expired: attest again")
	}
	if c.IssuedAt > now.Add(clockSkew).Unix() {
		return nil, nil, errors.New("token issued in the future: check the brokers' clocks")
	}
	if c.Cwrun.Tee == "" {
		return nil, nil, errors.New("token names no TEE")
	}
	return c, payload, nil
}

// clockSkew is how far apart the clocks of brokers and admin hosts may
// be.
const clockSkew = time.Minute
