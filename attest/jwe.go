package attest

import (
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/big"

	"github.com/cwrun/cwrun/attest/internal/jsonx"
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

	// ecdh is Private as a crypto/ecdh key, made once: converting costs
	// a scalar multiplication. It is used only while Private is still
	// ecdhOf.
	ecdh   *ecdh.PrivateKey
	ecdhOf *ecdsa.PrivateKey
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
	// Generated with crypto/ecdh and given its ecdsa form by hand, so
	// that the public point is computed once, not once per conversion.
	ek, err := ecdh.P256().GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating the TEE key (P-256): %w", err)
	}
	pt := ek.PublicKey().Bytes() // 0x04 || X || Y
	priv := &ecdsa.PrivateKey{
		PublicKey: ecdsa.PublicKey{Curve: elliptic.P256(), X: new(big.Int).SetBytes(pt[1:33]), Y: new(big.Int).SetBytes(pt[33:])},
		D:         new(big.Int).SetBytes(ek.Bytes()),
	}
	return &TeeKey{Private: priv, JWK: ecJWKOf("P-256", 32, pt), ecdh: ek, ecdhOf: priv}, nil
}

// ecJWKOf renders the public JWK of an uncompressed point; base64url
// needs no JSON escaping, so it is written directly.
func ecJWKOf(crv string, size int, pt []byte) json.RawMessage {
	b64 := base64.RawURLEncoding
	out := make([]byte, 0, 64+2*b64.EncodedLen(size))
	out = append(out, `{"kty":"EC","crv":"`...)
	out = append(out, crv...)
	out = append(out, `","alg":"`+AlgECDH+`","x":"`...)
	out = b64.AppendEncode(out, pt[1:1+size])
	out = append(out, `","y":"`...)
	out = b64.AppendEncode(out, pt[1+size:])
	return append(out, `"}`...)
}

// TeeKeyFrom wraps an existing *ecdsa.PrivateKey (P-256, P-384, P-521)
// or *rsa.PrivateKey as a TeeKey, computing its public JWK. Tests and
// guests with a sealed long-term key use it; a handshake normally uses
// NewTeeKey.
func TeeKeyFrom(priv crypto.PrivateKey) (*TeeKey, error) {
	switch k := priv.(type) {
	case *ecdsa.PrivateKey:
		ek, err := k.ECDH()
		if err != nil {
			return nil, fmt.Errorf("TEE key: %w", err)
		}
		crv, size, err := curveName(ek.Curve())
		if err != nil {
			return nil, err
		}
		return &TeeKey{Private: priv, JWK: ecJWKOf(crv, size, ek.PublicKey().Bytes()), ecdh: ek, ecdhOf: k}, nil
	case *rsa.PrivateKey:
		if bits := k.N.BitLen(); bits < minRSABits || bits > maxRSABits {
			return nil, fmt.Errorf("TEE key: RSA-%d outside %d..%d bits", bits, minRSABits, maxRSABits)
		}
		b, err := json.Marshal(rsaJWK{
			Kty: "RSA", Alg: AlgRSA,
			N: b64url(k.N.Bytes()),
			E: b64url(big.NewInt(int64(k.E)).Bytes()),
		})
		if err != nil {
			return nil, fmt.Errorf("encoding the TEE key's JWK: %w", err)
		}
		return &TeeKey{Private: priv, JWK: b}, nil
	}
	return nil, fmt.Errorf("TEE key: %T unsupported (want *ecdsa.PrivateKey or *rsa.PrivateKey)", priv)
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
	k, err := parseTeeKey(jwk)
	if err != nil {
		return nil, err
	}
	if k.rsa != nil {
		return k.rsa, nil
	}
	_, ecurve, size, _ := curveByName(k.crv)
	pt := k.ec.Bytes()
	return &ecdsa.PublicKey{Curve: ecurve, X: new(big.Int).SetBytes(pt[1 : 1+size]), Y: new(big.Int).SetBytes(pt[1+size:])}, nil
}

// teePub is a parsed TEE public key: ec (with its curve's name and
// coordinate size) or rsa.
type teePub struct {
	ec   *ecdh.PublicKey
	crv  string
	size int
	rsa  *rsa.PublicKey
}

func parseTeeKey(jwk json.RawMessage) (*teePub, error) {
	m, err := normalJWK(jwk)
	if err != nil {
		return nil, err
	}
	switch m.kty {
	case "EC":
		if m.alg != AlgECDH {
			return nil, fmt.Errorf("tee-pubkey: EC key with alg %q; only %s is spoken", m.alg, AlgECDH)
		}
		curve, _, size, ok := curveByName(m.crv)
		if !ok {
			return nil, fmt.Errorf("tee-pubkey: crv %q unsupported (want P-256, P-384 or P-521)", m.crv)
		}
		x, err := b64Field("x", m.x, size)
		if err != nil {
			return nil, err
		}
		y, err := b64Field("y", m.y, size)
		if err != nil {
			return nil, err
		}
		// crypto/ecdh checks the point is on the curve and not infinity.
		pub, err := curve.NewPublicKey(append(append([]byte{4}, x...), y...))
		if err != nil {
			return nil, fmt.Errorf("tee-pubkey: not a point on %s: %w", m.crv, err)
		}
		return &teePub{ec: pub, crv: m.crv, size: size}, nil
	case "RSA":
		if m.alg != AlgRSA {
			return nil, fmt.Errorf("tee-pubkey: RSA key with alg %q; only %s is spoken (RSA1_5 is deprecated)", m.alg, AlgRSA)
		}
		n, err := b64Field("n", m.n, -1)
		if err != nil {
			return nil, err
		}
		e, err := b64Field("e", m.e, -1)
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
		return &teePub{rsa: &rsa.PublicKey{N: N, E: E}}, nil
	}
	return nil, fmt.Errorf("tee-pubkey: kty %q cannot receive resources (want EC or RSA)", m.kty)
}

// b64Field decodes a base64url member; size >= 0 demands that length.
func b64Field(name, v string, size int) ([]byte, error) {
	b, err := base64.RawURLEncoding.DecodeString(v)
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
//
// JOSE is done here directly (crypto/ecdh, the Concat KDF of RFC 7518
// §4.6, the AES key wrap of RFC 3394, AES-GCM) rather than through a
// general JOSE library: the broker seals one resource per handshake,
// and a general library's key conversions and reflection cost more than
// the cryptography. The tests check the output against go-jose's
// decrypter and an independent implementation.
func EncryptResource(teePubKey json.RawMessage, plaintext []byte) ([]byte, error) {
	pub, err := parseTeeKey(teePubKey)
	if err != nil {
		return nil, err
	}
	// Leave room for the JWE's own overhead (base64, header, wrapped key).
	if len(plaintext) > MaxResourceJWE/2 {
		return nil, fmt.Errorf("resource of %d bytes is too large to seal (at most %d)", len(plaintext), MaxResourceJWE/2)
	}
	var cek [cekSize]byte
	if _, err := rand.Read(cek[:]); err != nil {
		return nil, fmt.Errorf("sealing resource: %w", err)
	}
	defer clear(cek[:])
	var hdr, encKey []byte
	if pub.rsa != nil {
		encKey, err = rsa.EncryptOAEP(sha256.New(), rand.Reader, pub.rsa, cek[:], nil)
		if err != nil {
			return nil, fmt.Errorf("sealing resource (%s): %w", AlgRSA, err)
		}
		hdr = []byte(`{"alg":"` + AlgRSA + `","enc":"` + EncGCM + `"}`)
	} else {
		eph, err := pub.ec.Curve().GenerateKey(rand.Reader)
		if err != nil {
			return nil, fmt.Errorf("sealing resource (%s): %w", AlgECDH, err)
		}
		z, err := eph.ECDH(pub.ec)
		if err != nil {
			return nil, fmt.Errorf("sealing resource (%s): %w", AlgECDH, err)
		}
		kek := concatKDFSHA256(z, AlgECDH, nil, nil, 256)
		clear(z)
		encKey, err = wrapKey(kek[:], cek[:])
		clear(kek[:])
		if err != nil {
			return nil, fmt.Errorf("sealing resource (%s): %w", AlgECDH, err)
		}
		// go-jose's header, member for member: alg, enc, epk (kty, crv,
		// x, y); Trustee's guest reads epk's crv, x and y.
		pt := eph.PublicKey().Bytes()
		hdr = make([]byte, 0, 128+2*base64.RawURLEncoding.EncodedLen(pub.size))
		hdr = append(hdr, `{"alg":"`+AlgECDH+`","enc":"`+EncGCM+`","epk":{"kty":"EC","crv":"`...)
		hdr = append(hdr, pub.crv...)
		hdr = append(hdr, `","x":"`...)
		hdr = base64.RawURLEncoding.AppendEncode(hdr, pt[1:1+pub.size])
		hdr = append(hdr, `","y":"`...)
		hdr = base64.RawURLEncoding.AppendEncode(hdr, pt[1+pub.size:])
		hdr = append(hdr, `"}}`...)
	}
	gcm, err := newGCM(cek[:])
	if err != nil {
		return nil, fmt.Errorf("sealing resource: %w", err)
	}
	var iv [gcmIVSize]byte
	if _, err := rand.Read(iv[:]); err != nil {
		return nil, fmt.Errorf("sealing resource: %w", err)
	}
	b64 := base64.RawURLEncoding
	protected := b64.AppendEncode(nil, hdr)
	sealed := gcm.Seal(make([]byte, 0, len(plaintext)+gcmTagSize), iv[:], plaintext, protected)
	ct, tag := sealed[:len(plaintext)], sealed[len(plaintext):]

	// The members are base64url, so nothing in them needs JSON escaping.
	out := make([]byte, 0, 96+len(protected)+b64.EncodedLen(len(encKey))+b64.EncodedLen(len(sealed))+16)
	out = append(out, `{"protected":"`...)
	out = append(out, protected...)
	out = append(out, `","encrypted_key":"`...)
	out = b64.AppendEncode(out, encKey)
	out = append(out, `","iv":"`...)
	out = b64.AppendEncode(out, iv[:])
	out = append(out, `","ciphertext":"`...)
	out = b64.AppendEncode(out, ct)
	out = append(out, `","tag":"`...)
	out = b64.AppendEncode(out, tag)
	out = append(out, `"}`...)
	return out, nil
}

// Sizes fixed by A256GCM and A256KW.
const (
	cekSize    = 32
	gcmIVSize  = 12
	gcmTagSize = 16
)

func newGCM(key []byte) (cipher.AEAD, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

// concatKDF derives a key of bits (at most 256) from the shared secret
// z: RFC 7518 §4.6.2, the Concat KDF of NIST SP 800-56A with SHA-256.
// One round gives all the bits ECDH-ES+A256KW needs; the key is the
// first bits/8 bytes of
//
//	SHA-256(counter=1 || Z || len(alg) || alg || len(apu) || apu ||
//	        len(apv) || apv || keydatalen=bits)
func concatKDFSHA256(z []byte, alg string, apu, apv []byte, bits int) [32]byte {
	h := sha256.New()
	var n [4]byte
	put := func(v int) {
		binary.BigEndian.PutUint32(n[:], uint32(v))
		h.Write(n[:])
	}
	put(1)
	h.Write(z)
	put(len(alg))
	io.WriteString(h, alg)
	put(len(apu))
	h.Write(apu)
	put(len(apv))
	h.Write(apv)
	put(bits)
	var out [32]byte
	h.Sum(out[:0])
	return out
}

// aesKeyWrapIV is RFC 3394's default initial value.
const aesKeyWrapIV = 0xA6A6A6A6A6A6A6A6

// wrapKey wraps key (a multiple of 8 bytes, at least 16) under kek:
// RFC 3394 §2.2.1.
func wrapKey(kek, key []byte) ([]byte, error) {
	if len(key) < 16 || len(key)%8 != 0 {
		return nil, fmt.Errorf("AES key wrap: key of %d bytes (want a multiple of 8, at least 16)", len(key))
	}
	block, err := aes.NewCipher(kek)
	if err != nil {
		return nil, err
	}
	n := len(key) / 8
	out := make([]byte, 8+len(key))
	copy(out[8:], key)
	a := uint64(aesKeyWrapIV)
	var b [16]byte
	for j := 0; j < 6; j++ {
		for i := 1; i <= n; i++ {
			r := out[8*i : 8*i+8]
			binary.BigEndian.PutUint64(b[:8], a)
			copy(b[8:], r)
			block.Encrypt(b[:], b[:])
			a = binary.BigEndian.Uint64(b[:8]) ^ uint64(n*j+i)
			copy(r, b[8:])
		}
	}
	binary.BigEndian.PutUint64(out[:8], a)
	return out, nil
}

// unwrapKey reverses wrapKey and checks the integrity value: RFC
// 3394 §2.2.2 and §2.2.3.
func unwrapKey(kek, wrapped []byte) ([]byte, error) {
	if len(wrapped) < 24 || len(wrapped)%8 != 0 {
		return nil, fmt.Errorf("wrapped key of %d bytes (want a multiple of 8, at least 24)", len(wrapped))
	}
	block, err := aes.NewCipher(kek)
	if err != nil {
		return nil, err
	}
	n := len(wrapped)/8 - 1
	out := make([]byte, len(wrapped)-8)
	copy(out, wrapped[8:])
	a := binary.BigEndian.Uint64(wrapped[:8])
	var b [16]byte
	for j := 5; j >= 0; j-- {
		for i := n; i >= 1; i-- {
			r := out[8*(i-1) : 8*i]
			binary.BigEndian.PutUint64(b[:8], a^uint64(n*j+i))
			copy(b[8:], r)
			block.Decrypt(b[:], b[:])
			a = binary.BigEndian.Uint64(b[:8])
			copy(r, b[8:])
		}
	}
	var got, want [8]byte
	binary.BigEndian.PutUint64(got[:], a)
	binary.BigEndian.PutUint64(want[:], aesKeyWrapIV)
	if subtle.ConstantTimeCompare(got[:], want[:]) != 1 {
		clear(out)
		return nil, errors.New("AES key unwrap: integrity check failed")
	}
	return out, nil
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

// errNotSealed is the answer to every cryptographic failure while
// opening: which step failed would tell a forger too much, and the
// remedy is the same.
const errNotSealed = "the resource was not sealed to this handshake's key, or was altered on the way"

// errCrypto marks a failure to open the content key, reported without
// detail.
var errCrypto = errors.New("the content key does not open")

// DecryptResource opens a JWE made by EncryptResource (or by Trustee's
// KBS). It runs in the guest on bytes the untrusted host relayed, so it
// accepts only the flattened JSON form, the one alg that fits key,
// A256GCM, no compression and no critical extensions.
func DecryptResource(key *TeeKey, jwe []byte) ([]byte, error) {
	if key == nil || key.Private == nil {
		return nil, errors.New("decrypting resource: no TEE key")
	}
	if len(jwe) > MaxResourceJWE {
		return nil, fmt.Errorf("decrypting resource: JWE of %d bytes, more than %d", len(jwe), MaxResourceJWE)
	}
	var wantAlg string
	switch key.Private.(type) {
	case *ecdsa.PrivateKey:
		wantAlg = AlgECDH
	case *rsa.PrivateKey:
		wantAlg = AlgRSA
	default:
		return nil, fmt.Errorf("decrypting resource: TEE key of type %T unsupported", key.Private)
	}

	flat, err := parseFlatJWE(jwe)
	if err != nil {
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
	hdr, err := parseJWEHeader(hdrJSON)
	if err != nil {
		return nil, fmt.Errorf("decrypting resource: protected header is not a JSON object: %s", preview(hdrJSON))
	}
	if hdr.alg != wantAlg {
		return nil, fmt.Errorf("decrypting resource: alg %q, want %s for this TEE key", clean(hdr.alg, 40), wantAlg)
	}
	if hdr.enc != EncGCM {
		return nil, fmt.Errorf("decrypting resource: enc %q, want %s", clean(hdr.enc, 40), EncGCM)
	}
	// Compression would let a small JWE expand without bound; critical
	// extensions would change meaning in ways this code does not know.
	if hdr.zip != nil {
		return nil, fmt.Errorf("decrypting resource: compressed JWE (zip %s) refused", preview(hdr.zip))
	}
	if hdr.crit {
		return nil, errors.New("decrypting resource: JWE with critical header extensions refused")
	}

	b64 := base64.RawURLEncoding
	encKey, err := b64.DecodeString(flat.EncryptedKey)
	if err != nil {
		return nil, fmt.Errorf("decrypting resource: encrypted_key is not base64url: %w", err)
	}
	iv, err := b64.DecodeString(flat.IV)
	if err != nil || len(iv) != gcmIVSize {
		return nil, fmt.Errorf("decrypting resource: iv is not %d bytes of base64url", gcmIVSize)
	}
	tag, err := b64.DecodeString(flat.Tag)
	if err != nil || len(tag) != gcmTagSize {
		return nil, fmt.Errorf("decrypting resource: tag is not %d bytes of base64url", gcmTagSize)
	}
	sealed, err := b64.AppendDecode(make([]byte, 0, b64.DecodedLen(len(*flat.Ciphertext))+gcmTagSize), []byte(*flat.Ciphertext))
	if err != nil {
		return nil, fmt.Errorf("decrypting resource: ciphertext is not base64url: %w", err)
	}
	sealed = append(sealed, tag...)
	// RFC 7516 §5.1 step 14: with an aad member, the AEAD's additional
	// data is the encoded header, a period and the encoded aad.
	aad := []byte(flat.Protected)
	if flat.AAD != nil {
		aad = append(append(aad, '.'), *flat.AAD...)
	}

	var cek []byte
	switch priv := key.Private.(type) {
	case *ecdsa.PrivateKey:
		cek, err = key.unwrapECDH(priv, hdr, encKey)
	case *rsa.PrivateKey:
		cek, err = rsa.DecryptOAEP(sha256.New(), nil, priv, encKey, nil)
		if err != nil || len(cek) != cekSize {
			clear(cek)
			cek, err = nil, errCrypto
		}
	}
	// Which cryptographic step failed is not said: the host relays these
	// bytes and may be probing (the RSA-OAEP and key unwrap failures in
	// particular must look alike).
	notSealed := fmt.Errorf("decrypting resource (%s, %s): %s", wantAlg, EncGCM, errNotSealed)
	if errors.Is(err, errCrypto) {
		return nil, notSealed
	}
	if err != nil {
		return nil, fmt.Errorf("decrypting resource (%s, %s): %w; %s", wantAlg, EncGCM, err, errNotSealed)
	}
	defer clear(cek)
	gcm, err := newGCM(cek)
	if err != nil {
		return nil, fmt.Errorf("decrypting resource: %w", err)
	}
	plain, err := gcm.Open(sealed[:0], iv, sealed, aad)
	if err != nil {
		return nil, notSealed
	}
	if plain == nil {
		plain = []byte{}
	}
	return plain, nil
}

// unwrapECDH recovers the content key of an ECDH-ES+A256KW JWE: the
// ephemeral key from the header's epk (on this key's curve), the Concat
// KDF with the header's apu and apv if any, and the AES key unwrap.
func (k *TeeKey) unwrapECDH(priv *ecdsa.PrivateKey, hdr *jweHeader, encKey []byte) ([]byte, error) {
	ek, err := k.ecdhKey(priv)
	if err != nil {
		return nil, err
	}
	crv, _, err := curveName(ek.Curve())
	if err != nil {
		return nil, err
	}
	if hdr.epk == nil {
		return nil, errors.New("no epk in the protected header")
	}
	epk, err := parseEPK(hdr.epk)
	if err != nil {
		return nil, errors.New("epk is not a JSON object")
	}
	if epk.kty != "EC" || epk.crv != crv {
		return nil, fmt.Errorf("epk is kty %q crv %q, want an EC key on %s", clean(epk.kty, 16), clean(epk.crv, 16), crv)
	}
	pub, err := ecPoint(ek.Curve(), epk.x, epk.y)
	if err != nil {
		return nil, fmt.Errorf("epk: %w", err)
	}
	var apu, apv []byte
	if hdr.apu != nil {
		if apu, err = base64.RawURLEncoding.DecodeString(*hdr.apu); err != nil {
			return nil, errors.New("header apu is not base64url")
		}
	}
	if hdr.apv != nil {
		if apv, err = base64.RawURLEncoding.DecodeString(*hdr.apv); err != nil {
			return nil, errors.New("header apv is not base64url")
		}
	}
	z, err := ek.ECDH(pub)
	if err != nil {
		return nil, err
	}
	kek := concatKDFSHA256(z, AlgECDH, apu, apv, 256)
	clear(z)
	cek, err := unwrapKey(kek[:], encKey)
	clear(kek[:])
	if err != nil || len(cek) != cekSize {
		clear(cek)
		return nil, errCrypto
	}
	return cek, nil
}

// parseFlatJWE reads the flattened JSON serialization: an object of
// exactly these members, names matched exactly as JOSE's and serde's
// decoders match them (encoding/json alone would take "Protected").
// Strings may be null (then absent), as encoding/json reads them.
func parseFlatJWE(b []byte) (*flatJWE, error) {
	var f flatJWE
	r := jsonx.NewReader(b)
	optional := func(dst **string) error {
		if r.Null() {
			*dst = nil
			return nil
		}
		s, err := r.String()
		*dst = &s
		return err
	}
	required := func(dst *string) error {
		if r.Null() {
			return nil
		}
		s, err := r.String()
		*dst = s
		return err
	}
	err := r.Object(func(name string) error {
		switch name {
		case "protected":
			return required(&f.Protected)
		case "encrypted_key":
			return required(&f.EncryptedKey)
		case "iv":
			return required(&f.IV)
		case "tag":
			return required(&f.Tag)
		case "aad":
			return optional(&f.AAD)
		case "ciphertext":
			return optional(&f.Ciphertext)
		}
		return fmt.Errorf("unknown member %q", clean(name, 40))
	})
	if err != nil {
		return nil, err
	}
	if r.End() != nil {
		return nil, errors.New("trailing data after the JSON object")
	}
	return &f, nil
}

// jweHeader is what DecryptResource reads of a protected header. alg,
// enc, apu and apv count only as strings; zip and crit count by being
// there at all.
type jweHeader struct {
	alg, enc string
	apu, apv *string
	zip      []byte // the raw value, when present
	crit     bool
	epk      []byte // the raw value, when present
}

func parseJWEHeader(b []byte) (*jweHeader, error) {
	var h jweHeader
	r := jsonx.NewReader(b)
	str := func() (string, bool, error) {
		if r.Peek() != '"' {
			return "", false, r.Skip()
		}
		s, err := r.String()
		return s, true, err
	}
	err := r.Object(func(name string) error {
		var err error
		switch name {
		case "alg":
			h.alg, _, err = str()
		case "enc":
			h.enc, _, err = str()
		case "apu", "apv":
			s, ok, e := str()
			err = e
			p := &h.apu
			if name == "apv" {
				p = &h.apv
			}
			*p = nil
			if ok {
				*p = &s
			} else if err == nil {
				// Present but not a string: not base64url either.
				bad := "\x00"
				*p = &bad
			}
		case "zip":
			h.zip, err = r.Raw()
		case "crit":
			h.crit = true
			err = r.Skip()
		case "epk":
			h.epk, err = r.Raw()
		default:
			err = r.Skip()
		}
		return err
	})
	if err == nil {
		err = r.End()
	}
	if err != nil {
		return nil, err
	}
	return &h, nil
}

// epkJWK is what unwrapECDH reads of the ephemeral public key.
type epkJWK struct{ kty, crv, x, y string }

func parseEPK(b []byte) (*epkJWK, error) {
	var k epkJWK
	r := jsonx.NewReader(b)
	err := r.Object(func(name string) error {
		var dst *string
		switch name {
		case "kty":
			dst = &k.kty
		case "crv":
			dst = &k.crv
		case "x":
			dst = &k.x
		case "y":
			dst = &k.y
		default:
			return r.Skip()
		}
		if r.Peek() != '"' {
			*dst = ""
			return r.Skip()
		}
		s, err := r.String()
		*dst = s
		return err
	})
	if err != nil {
		return nil, err
	}
	return &k, nil
}

// ecdhKey is priv as a crypto/ecdh key: the one made with the TeeKey
// when it is still priv, else converted now (which costs a scalar
// multiplication, hence the copy kept).
func (k *TeeKey) ecdhKey(priv *ecdsa.PrivateKey) (*ecdh.PrivateKey, error) {
	if k.ecdh != nil && k.ecdhOf == priv {
		return k.ecdh, nil
	}
	ek, err := priv.ECDH()
	if err != nil {
		return nil, fmt.Errorf("TEE key: %w", err)
	}
	return ek, nil
}

// ecPoint decodes base64url coordinates into a public key on c; crypto/ecdh
// checks that the point is on the curve and not the point at infinity.
func ecPoint(c ecdh.Curve, x64, y64 string) (*ecdh.PublicKey, error) {
	_, size, err := curveName(c)
	if err != nil {
		return nil, err
	}
	b64 := base64.RawURLEncoding
	if b64.DecodedLen(len(x64)) != size || b64.DecodedLen(len(y64)) != size {
		return nil, fmt.Errorf("coordinates are not %d bytes", size)
	}
	pt := make([]byte, 1, 1+2*size)
	pt[0] = 4
	pt, err = b64.AppendDecode(pt, []byte(x64))
	if err != nil {
		return nil, errors.New("x is not base64url")
	}
	pt, err = b64.AppendDecode(pt, []byte(y64))
	if err != nil {
		return nil, errors.New("y is not base64url")
	}
	if len(pt) != 1+2*size {
		return nil, fmt.Errorf("coordinates are not %d bytes", size)
	}
	return c.NewPublicKey(pt)
}
