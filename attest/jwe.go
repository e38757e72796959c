package attest

import (
	"crypto"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"

	"github.com/go-jose/go-jose/v4"
)

// JWE algorithms spoken (Trustee's, less the deprecated RSA1_5).
const (
	AlgECDH = "ECDH-ES+A256KW"
	AlgRSA  = "RSA-OAEP-256"
	EncGCM  = "A256GCM"
)

// MaxResourceJWE bounds a resource's JWE as DecryptResource and the
// client accept it. Resources are keys and small secrets; 1 MiB leaves
// room for anything of that kind.
const MaxResourceJWE = 1 << 20

// RSA key sizes EncryptResource accepts: below 2048 bits is breakable,
// above 8192 only makes the broker spin.
const (
	minRSABits = 2048
	maxRSABits = 8192
)

// TeeKey is the guest's ephemeral key pair for one handshake.
type TeeKey struct {
	// Private is an *ecdsa.PrivateKey (ECDH-ES+A256KW) or an
	// *rsa.PrivateKey (RSA-OAEP-256).
	Private crypto.PrivateKey
	JWK     json.RawMessage // public part, as sent in RuntimeData.TeePubKey
}

// ecJWK is a TEE public key in exactly the members Trustee's TeePubKey
// keeps, so that what is sent is what is hashed.
type ecJWK struct {
	Kty string `json:"kty"`
	Crv string `json:"crv"`
	Alg string `json:"alg"`
	X   string `json:"x"`
	Y   string `json:"y"`
}

type rsaJWK struct {
	Kty string `json:"kty"`
	Alg string `json:"alg"`
	N   string `json:"n"`
	E   string `json:"e"`
}

// NewTeeKey makes an EC P-256 ECDH-ES+A256KW key (the guest default).
func NewTeeKey() (*TeeKey, error) {
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating the TEE key (P-256): %w", err)
	}
	return TeeKeyFrom(priv)
}

// TeeKeyFrom wraps an existing *ecdsa.PrivateKey (P-256, P-384, P-521)
// or *rsa.PrivateKey as a TeeKey, computing its public JWK. Tests and
// guests with a sealed long-term key use it; a handshake normally uses
// NewTeeKey.
func TeeKeyFrom(priv crypto.PrivateKey) (*TeeKey, error) {
	var jwk any
	switch k := priv.(type) {
	case *ecdsa.PrivateKey:
		pub, err := k.PublicKey.ECDH()
		if err != nil {
			return nil, fmt.Errorf("TEE key: %w", err)
		}
		crv, size, err := curveName(pub.Curve())
		if err != nil {
			return nil, err
		}
		pt := pub.Bytes() // 0x04 || X || Y, fixed size
		jwk = ecJWK{
			Kty: "EC", Crv: crv, Alg: AlgECDH,
			X: b64url(pt[1 : 1+size]),
			Y: b64url(pt[1+size:]),
		}
	case *rsa.PrivateKey:
		if bits := k.N.BitLen(); bits < minRSABits || bits > maxRSABits {
			return nil, fmt.Errorf("TEE key: RSA-%d outside %d..%d bits", bits, minRSABits, maxRSABits)
		}
		jwk = rsaJWK{
			Kty: "RSA", Alg: AlgRSA,
			N: b64url(k.N.Bytes()),
			E: b64url(big.NewInt(int64(k.E)).Bytes()),
		}
	default:
		return nil, fmt.Errorf("TEE key: %T unsupported (want *ecdsa.PrivateKey or *rsa.PrivateKey)", priv)
	}
	b, err := json.Marshal(jwk)
	if err != nil {
		return nil, fmt.Errorf("encoding the TEE key's JWK: %w", err)
	}
	return &TeeKey{Private: priv, JWK: b}, nil
}

func b64url(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }

func curveName(c ecdh.Curve) (name string, size int, err error) {
	switch c {
	case ecdh.P256():
		return "P-256", 32, nil
	case ecdh.P384():
		return "P-384", 48, nil
	case ecdh.P521():
		return "P-521", 66, nil
	}
	return "", 0, fmt.Errorf("TEE key: curve %v unsupported (want P-256, P-384 or P-521)", c)
}

func curveByName(name string) (ecdh.Curve, elliptic.Curve, int, bool) {
	switch name {
	case "P-256":
		return ecdh.P256(), elliptic.P256(), 32, true
	case "P-384":
		return ecdh.P384(), elliptic.P384(), 48, true
	case "P-521":
		return ecdh.P521(), elliptic.P521(), 66, true
	}
	return nil, nil, 0, false
}

// ParseTeePubKey parses and checks a TEE public key JWK as a guest sent
// it: EC (P-256, P-384, P-521) with alg ECDH-ES+A256KW, the point on
// the curve, or RSA (2048..8192 bits) with alg RSA-OAEP-256. It returns
// an *ecdsa.PublicKey or an *rsa.PublicKey. The broker calls it (through
// EncryptResource) on untrusted input.
func ParseTeePubKey(jwk json.RawMessage) (crypto.PublicKey, error) {
	m, err := normalJWK(jwk)
	if err != nil {
		return nil, err
	}
	switch m["kty"] {
	case "EC":
		if m["alg"] != AlgECDH {
			return nil, fmt.Errorf("tee-pubkey: EC key with alg %q; only %s is spoken", m["alg"], AlgECDH)
		}
		curve, ecurve, size, ok := curveByName(m["crv"])
		if !ok {
			return nil, fmt.Errorf("tee-pubkey: crv %q unsupported (want P-256, P-384 or P-521)", m["crv"])
		}
		x, err := b64Field(m, "x", size)
		if err != nil {
			return nil, err
		}
		y, err := b64Field(m, "y", size)
		if err != nil {
			return nil, err
		}
		// crypto/ecdh checks the point is on the curve and not infinity.
		if _, err := curve.NewPublicKey(append(append([]byte{4}, x...), y...)); err != nil {
			return nil, fmt.Errorf("tee-pubkey: not a point on %s: %w", m["crv"], err)
		}
		return &ecdsa.PublicKey{Curve: ecurve, X: new(big.Int).SetBytes(x), Y: new(big.Int).SetBytes(y)}, nil
	case "RSA":
		if m["alg"] != AlgRSA {
			return nil, fmt.Errorf("tee-pubkey: RSA key with alg %q; only %s is spoken (RSA1_5 is deprecated)", m["alg"], AlgRSA)
		}
		n, err := b64Field(m, "n", -1)
		if err != nil {
			return nil, err
		}
		e, err := b64Field(m, "e", -1)
		if err != nil {
			return nil, err
		}
		N := new(big.Int).SetBytes(n)
		if bits := N.BitLen(); bits < minRSABits || bits > maxRSABits {
			return nil, fmt.Errorf("tee-pubkey: RSA-%d outside %d..%d bits", bits, minRSABits, maxRSABits)
		}
		if len(e) == 0 || len(e) > 4 {
			return nil, fmt.Errorf("tee-pubkey: RSA exponent of %d bytes", len(e))
		}
		E := int(new(big.Int).SetBytes(e).Int64())
		if E < 3 || E%2 == 0 {
			return nil, fmt.Errorf("tee-pubkey: RSA exponent %d invalid", E)
		}
		return &rsa.PublicKey{N: N, E: E}, nil
	}
	return nil, fmt.Errorf("tee-pubkey: kty %q cannot receive resources (want EC or RSA)", m["kty"])
}

// b64Field decodes a base64url member; size >= 0 demands that length.
func b64Field(m map[string]string, name string, size int) ([]byte, error) {
	b, err := base64.RawURLEncoding.DecodeString(m[name])
	if err != nil {
		return nil, fmt.Errorf("tee-pubkey: member %q is not base64url: %w", name, err)
	}
	if size >= 0 && len(b) != size {
		return nil, fmt.Errorf("tee-pubkey: member %q is %d bytes, want %d", name, len(b), size)
	}
	return b, nil
}

// EncryptResource seals plaintext to a TEE public key JWK as a JWE in
// flattened JSON serialization, A256GCM, with ECDH-ES+A256KW (EC keys)
// or RSA-OAEP-256 (RSA keys).
func EncryptResource(teePubKey json.RawMessage, plaintext []byte) ([]byte, error) {
	pub, err := ParseTeePubKey(teePubKey)
	if err != nil {
		return nil, err
	}
	// Leave room for the JWE's own overhead (base64, header, wrapped key).
	if len(plaintext) > MaxResourceJWE/2 {
		return nil, fmt.Errorf("resource of %d bytes is too large to seal (at most %d)", len(plaintext), MaxResourceJWE/2)
	}
	alg := jose.ECDH_ES_A256KW
	if _, ok := pub.(*rsa.PublicKey); ok {
		alg = jose.RSA_OAEP_256
	}
	enc, err := jose.NewEncrypter(jose.A256GCM, jose.Recipient{Algorithm: alg, Key: pub}, nil)
	if err != nil {
		return nil, fmt.Errorf("sealing resource (%s): %w", alg, err)
	}
	obj, err := enc.Encrypt(plaintext)
	if err != nil {
		return nil, fmt.Errorf("sealing resource (%s): %w", alg, err)
	}
	out := obj.FullSerialize()
	if out == "" {
		return nil, errors.New("sealing resource: JWE serialisation failed")
	}
	return []byte(out), nil
}

// flatJWE is the only JWE shape DecryptResource accepts: flattened JSON
// serialization, no per-recipient or shared unprotected header. Trustee
// sends "aad": null.
type flatJWE struct {
	Protected    string  `json:"protected"`
	EncryptedKey string  `json:"encrypted_key"`
	AAD          *string `json:"aad,omitempty"`
	IV           string  `json:"iv"`
	Ciphertext   *string `json:"ciphertext"` // "" for an empty resource
	Tag          string  `json:"tag"`
}

// DecryptResource opens a JWE made by EncryptResource. It runs in the
// guest on bytes the untrusted host relayed, so it accepts only the
// flattened JSON form, the one alg that fits key, A256GCM, and no
// compression.
func DecryptResource(key *TeeKey, jwe []byte) ([]byte, error) {
	if key == nil || key.Private == nil {
		return nil, errors.New("decrypting resource: no TEE key")
	}
	if len(jwe) > MaxResourceJWE {
		return nil, fmt.Errorf("decrypting resource: JWE of %d bytes, more than %d", len(jwe), MaxResourceJWE)
	}
	var wantAlg jose.KeyAlgorithm
	switch key.Private.(type) {
	case *ecdsa.PrivateKey:
		wantAlg = jose.ECDH_ES_A256KW
	case *rsa.PrivateKey:
		wantAlg = jose.RSA_OAEP_256
	default:
		return nil, fmt.Errorf("decrypting resource: TEE key of type %T unsupported", key.Private)
	}

	// Members are matched exactly, as go-jose's case-sensitive JSON
	// decoder matches them, so what is checked here is what it opens.
	var flat flatJWE
	if err := decodeExact(jwe, &flat, "protected", "encrypted_key", "aad", "iv", "ciphertext", "tag"); err != nil {
		return nil, fmt.Errorf("decrypting resource: not a flattened JSON JWE: %w", err)
	}
	for name, v := range map[string]string{"protected": flat.Protected, "encrypted_key": flat.EncryptedKey, "iv": flat.IV, "tag": flat.Tag} {
		if v == "" {
			return nil, fmt.Errorf("decrypting resource: JWE member %q missing or empty", name)
		}
	}
	if flat.Ciphertext == nil {
		return nil, errors.New(`decrypting resource: JWE member "ciphertext" missing`)
	}
	hdrJSON, err := base64.RawURLEncoding.DecodeString(flat.Protected)
	if err != nil {
		return nil, fmt.Errorf("decrypting resource: protected header is not base64url: %w", err)
	}
	var hdr map[string]json.RawMessage
	if err := json.Unmarshal(hdrJSON, &hdr); err != nil || hdr == nil {
		return nil, fmt.Errorf("decrypting resource: protected header is not a JSON object: %s", preview(hdrJSON))
	}
	var alg, enc string
	json.Unmarshal(hdr["alg"], &alg)
	json.Unmarshal(hdr["enc"], &enc)
	if alg != string(wantAlg) {
		return nil, fmt.Errorf("decrypting resource: alg %q, want %s for this TEE key", clean(alg, 40), wantAlg)
	}
	if enc != EncGCM {
		return nil, fmt.Errorf("decrypting resource: enc %q, want %s", clean(enc, 40), EncGCM)
	}
	// Compression would let a small JWE expand without bound; critical
	// extensions would change meaning in ways this code does not know.
	if zip, ok := hdr["zip"]; ok {
		return nil, fmt.Errorf("decrypting resource: compressed JWE (zip %s) refused", preview(zip))
	}
	if _, ok := hdr["crit"]; ok {
		return nil, errors.New("decrypting resource: JWE with critical header extensions refused")
	}

	obj, err := jose.ParseEncryptedJSON(string(jwe), []jose.KeyAlgorithm{wantAlg}, []jose.ContentEncryption{jose.A256GCM})
	if err != nil {
		return nil, fmt.Errorf("decrypting resource: %w", err)
	}
	plain, err := obj.Decrypt(key.Private)
	if err != nil {
		return nil, fmt.Errorf("decrypting resource (%s, %s): %w; the resource was not sealed to this handshake's key, or was altered on the way", wantAlg, EncGCM, err)
	}
	return plain, nil
}
