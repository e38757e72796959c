package attest

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"strings"
	"sync"
	"testing"
)

var (
	rsaOnce sync.Once
	rsaKey  *rsa.PrivateKey
)

// testRSAKey shares one RSA-2048 key across tests: generating it takes
// a noticeable fraction of a second.
func testRSAKey(t testing.TB) *TeeKey {
	t.Helper()
	rsaOnce.Do(func() {
		var err error
		if rsaKey, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
			panic(err)
		}
	})
	k, err := TeeKeyFrom(rsaKey)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func ecKey(t testing.TB, c elliptic.Curve) *TeeKey {
	t.Helper()
	priv, err := ecdsa.GenerateKey(c, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	k, err := TeeKeyFrom(priv)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestNewTeeKeyJWK(t *testing.T) {
	k, err := NewTeeKey()
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(k.JWK, &m); err != nil {
		t.Fatal(err)
	}
	if len(m) != 5 || m["kty"] != "EC" || m["crv"] != "P-256" || m["alg"] != "ECDH-ES+A256KW" {
		t.Errorf("JWK = %s; want exactly kty EC, crv P-256, alg ECDH-ES+A256KW, x, y", k.JWK)
	}
	pub, err := ParseTeePubKey(k.JWK)
	if err != nil {
		t.Fatal(err)
	}
	if !pub.(*ecdsa.PublicKey).Equal(&k.Private.(*ecdsa.PrivateKey).PublicKey) {
		t.Error("the JWK does not hold the key's public half")
	}
	k2, _ := NewTeeKey()
	if bytes.Equal(k.JWK, k2.JWK) {
		t.Error("two NewTeeKey calls made the same key")
	}
}

func TestRoundTrip(t *testing.T) {
	keys := map[string]*TeeKey{
		"P-256":    ecKey(t, elliptic.P256()),
		"P-384":    ecKey(t, elliptic.P384()),
		"P-521":    ecKey(t, elliptic.P521()),
		"RSA-2048": testRSAKey(t),
	}
	for name, k := range keys {
		for _, size := range []int{0, 1, 32, 4096} {
			plain := make([]byte, size)
			rand.Read(plain)
			jwe, err := EncryptResource(k.JWK, plain)
			if err != nil {
				t.Fatalf("%s: EncryptResource: %v", name, err)
			}
			if bytes.Contains(jwe, plain) && size >= 32 {
				t.Fatalf("%s: plaintext visible in the JWE", name)
			}
			got, err := DecryptResource(k, jwe)
			if err != nil {
				t.Fatalf("%s: DecryptResource: %v", name, err)
			}
			if !bytes.Equal(got, plain) {
				t.Fatalf("%s: round trip of %d bytes gave %d different bytes", name, size, len(got))
			}
		}
	}
}

func TestJWEShape(t *testing.T) {
	for name, k := range map[string]*TeeKey{"EC": ecKey(t, elliptic.P256()), "RSA": testRSAKey(t)} {
		jwe, err := EncryptResource(k.JWK, []byte("secret"))
		if err != nil {
			t.Fatal(err)
		}
		var m map[string]json.RawMessage
		if err := json.Unmarshal(jwe, &m); err != nil {
			t.Fatal(err)
		}
		for _, member := range []string{"protected", "encrypted_key", "iv", "ciphertext", "tag"} {
			if _, ok := m[member]; !ok {
				t.Errorf("%s: JWE lacks %q: %s", name, member, jwe)
			}
		}
		if len(m) != 5 {
			t.Errorf("%s: JWE has members beyond the flattened five: %s", name, jwe)
		}
		var p64 string
		json.Unmarshal(m["protected"], &p64)
		hdr, _ := base64.RawURLEncoding.DecodeString(p64)
		var h map[string]json.RawMessage
		if err := json.Unmarshal(hdr, &h); err != nil {
			t.Fatal(err)
		}
		wantAlg := `"ECDH-ES+A256KW"`
		if name == "RSA" {
			wantAlg = `"RSA-OAEP-256"`
		}
		if string(h["alg"]) != wantAlg || string(h["enc"]) != `"A256GCM"` {
			t.Errorf("%s: protected header %s", name, hdr)
		}
		if _, ok := h["epk"]; ok != (name == "EC") {
			t.Errorf("%s: epk presence %v in %s", name, ok, hdr)
		}
	}
}

// TestEncryptInteropECDH opens EncryptResource's output with an
// independent ECDH-ES+A256KW implementation written from RFC 7518 the
// way Trustee's guest does it (Concat KDF with empty PartyUInfo and
// PartyVInfo, AES key wrap, AES-GCM over the protected header).
func TestEncryptInteropECDH(t *testing.T) {
	k := ecKey(t, elliptic.P256())
	jwe, err := EncryptResource(k.JWK, []byte("disk passphrase"))
	if err != nil {
		t.Fatal(err)
	}
	var f flatJWE
	if err := json.Unmarshal(jwe, &f); err != nil {
		t.Fatal(err)
	}
	hdrJSON, _ := base64.RawURLEncoding.DecodeString(f.Protected)
	var hdr struct {
		Epk struct{ X, Y string }
	}
	json.Unmarshal(hdrJSON, &hdr)
	x, _ := base64.RawURLEncoding.DecodeString(hdr.Epk.X)
	y, _ := base64.RawURLEncoding.DecodeString(hdr.Epk.Y)
	epk, err := ecdh.P256().NewPublicKey(append(append([]byte{4}, x...), y...))
	if err != nil {
		t.Fatal(err)
	}
	priv, _ := k.Private.(*ecdsa.PrivateKey).ECDH()
	z, err := priv.ECDH(epk)
	if err != nil {
		t.Fatal(err)
	}
	kek := concatKDF(z, AlgECDH, 32)
	wrapped, _ := base64.RawURLEncoding.DecodeString(f.EncryptedKey)
	cek := aesUnwrap(t, kek, wrapped)
	plain := gcmOpen(t, cek, f)
	if string(plain) != "disk passphrase" {
		t.Errorf("independent decryption gave %q", plain)
	}
}

// TestDecryptTrusteeStyle opens a JWE sealed the way Trustee's KBS
// seals it (kbs/src/jwe: epk of only crv, kty, x, y in the protected
// header; no aad), built here without go-jose.
func TestDecryptTrusteeStyle(t *testing.T) {
	k := ecKey(t, elliptic.P256())
	jwe := trusteeSeal(t, k, []byte("from a Trustee KBS"))
	got, err := DecryptResource(k, jwe)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != "from a Trustee KBS" {
		t.Errorf("got %q", got)
	}
}

func trusteeSeal(t testing.TB, k *TeeKey, plain []byte) []byte {
	t.Helper()
	pub, _ := k.Private.(*ecdsa.PrivateKey).PublicKey.ECDH()
	eph, _ := ecdh.P256().GenerateKey(rand.Reader)
	z, _ := eph.ECDH(pub)
	kek := concatKDF(z, AlgECDH, 32)
	cek := make([]byte, 32)
	rand.Read(cek)
	pt := eph.PublicKey().Bytes()
	hdr, _ := json.Marshal(map[string]any{
		"alg": AlgECDH, "enc": EncGCM,
		"epk": map[string]string{"crv": "P-256", "kty": "EC", "x": b64url(pt[1:33]), "y": b64url(pt[33:])},
	})
	prot := b64url(hdr)
	block, _ := aes.NewCipher(cek)
	gcm, _ := cipher.NewGCM(block)
	iv := make([]byte, 12)
	rand.Read(iv)
	sealed := gcm.Seal(nil, iv, plain, []byte(prot))
	ct, tag := sealed[:len(plain)], sealed[len(plain):]
	out, _ := json.Marshal(map[string]any{
		"protected": prot, "encrypted_key": b64url(aesWrap(t, kek, cek)),
		"iv": b64url(iv), "ciphertext": b64url(ct), "tag": b64url(tag), "aad": nil,
	})
	return out
}

// concatKDF is RFC 7518 4.6.2 with SHA-256 and empty PartyU/VInfo.
func concatKDF(z []byte, alg string, keyLen int) []byte {
	var buf []byte
	buf = binary.BigEndian.AppendUint32(buf, 1)
	buf = append(buf, z...)
	buf = binary.BigEndian.AppendUint32(buf, uint32(len(alg)))
	buf = append(buf, alg...)
	buf = binary.BigEndian.AppendUint32(buf, 0)
	buf = binary.BigEndian.AppendUint32(buf, 0)
	buf = binary.BigEndian.AppendUint32(buf, uint32(keyLen*8))
	sum := sha256.Sum256(buf)
	return sum[:keyLen]
}

var kwIV = []byte{0xa6, 0xa6, 0xa6, 0xa6, 0xa6, 0xa6, 0xa6, 0xa6}

// aesWrap and aesUnwrap are RFC 3394 key wrap, written out.
func aesWrap(t testing.TB, kek, key []byte) []byte {
	block, err := aes.NewCipher(kek)
	if err != nil {
		t.Fatal(err)
	}
	n := len(key) / 8
	a := bytes.Clone(kwIV)
	r := make([][]byte, n)
	for i := range r {
		r[i] = bytes.Clone(key[i*8 : i*8+8])
	}
	b := make([]byte, 16)
	for j := 0; j < 6; j++ {
		for i := 0; i < n; i++ {
			copy(b, a)
			copy(b[8:], r[i])
			block.Encrypt(b, b)
			tt := uint64(n*j + i + 1)
			binary.BigEndian.PutUint64(a, binary.BigEndian.Uint64(b[:8])^tt)
			copy(r[i], b[8:])
		}
	}
	out := bytes.Clone(a)
	for _, ri := range r {
		out = append(out, ri...)
	}
	return out
}

func aesUnwrap(t testing.TB, kek, wrapped []byte) []byte {
	block, err := aes.NewCipher(kek)
	if err != nil {
		t.Fatal(err)
	}
	n := len(wrapped)/8 - 1
	a := bytes.Clone(wrapped[:8])
	r := make([][]byte, n)
	for i := range r {
		r[i] = bytes.Clone(wrapped[8+i*8 : 16+i*8])
	}
	b := make([]byte, 16)
	for j := 5; j >= 0; j-- {
		for i := n - 1; i >= 0; i-- {
			tt := uint64(n*j + i + 1)
			binary.BigEndian.PutUint64(b, binary.BigEndian.Uint64(a)^tt)
			copy(b[8:], r[i])
			block.Decrypt(b, b)
			copy(a, b[:8])
			copy(r[i], b[8:])
		}
	}
	if !bytes.Equal(a, kwIV) {
		t.Fatal("AES key unwrap: integrity check failed (KDF or wrap differs)")
	}
	var out []byte
	for _, ri := range r {
		out = append(out, ri...)
	}
	return out
}

func gcmOpen(t testing.TB, cek []byte, f flatJWE) []byte {
	block, _ := aes.NewCipher(cek)
	gcm, _ := cipher.NewGCM(block)
	iv, _ := base64.RawURLEncoding.DecodeString(f.IV)
	ct, _ := base64.RawURLEncoding.DecodeString(*f.Ciphertext)
	tag, _ := base64.RawURLEncoding.DecodeString(f.Tag)
	plain, err := gcm.Open(nil, iv, append(ct, tag...), []byte(f.Protected))
	if err != nil {
		t.Fatalf("AES-GCM open: %v", err)
	}
	return plain
}

// mutateJWE decodes a JWE, lets f change it, and re-encodes it.
func mutateJWE(t *testing.T, jwe []byte, f func(m map[string]any)) []byte {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(jwe, &m); err != nil {
		t.Fatal(err)
	}
	f(m)
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func withHeader(t *testing.T, jwe []byte, f func(h map[string]any)) []byte {
	return mutateJWE(t, jwe, func(m map[string]any) {
		raw, _ := base64.RawURLEncoding.DecodeString(m["protected"].(string))
		var h map[string]any
		json.Unmarshal(raw, &h)
		f(h)
		b, _ := json.Marshal(h)
		m["protected"] = b64url(b)
	})
}

func flipB64(s string) string {
	b, _ := base64.RawURLEncoding.DecodeString(s)
	b[len(b)/2] ^= 1
	return b64url(b)
}

func TestDecryptRejects(t *testing.T) {
	k := ecKey(t, elliptic.P256())
	other := ecKey(t, elliptic.P256())
	good, err := EncryptResource(k.JWK, []byte("secret"))
	if err != nil {
		t.Fatal(err)
	}
	rsaJWE, err := EncryptResource(testRSAKey(t).JWK, []byte("secret"))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		key  *TeeKey
		jwe  []byte
		want string
	}{
		{"other key", other, good, "not sealed to this handshake's key"},
		{"RSA JWE to EC key", k, rsaJWE, `alg "RSA-OAEP-256"`},
		{"EC JWE to RSA key", testRSAKey(t), good, `alg "ECDH-ES+A256KW"`},
		{"alg dir", k, withHeader(t, good, func(h map[string]any) { h["alg"] = "dir" }), `alg "dir"`},
		{"enc A128GCM", k, withHeader(t, good, func(h map[string]any) { h["enc"] = "A128GCM" }), `enc "A128GCM"`},
		{"enc CBC", k, withHeader(t, good, func(h map[string]any) { h["enc"] = "A256CBC-HS512" }), `enc "A256CBC-HS512"`},
		{"zip", k, withHeader(t, good, func(h map[string]any) { h["zip"] = "DEF" }), "compressed"},
		{"crit", k, withHeader(t, good, func(h map[string]any) { h["crit"] = []string{"exp"} }), "critical"},
		{"header changed", k, withHeader(t, good, func(h map[string]any) { h["kid"] = "x" }), "not sealed"},
		{"ciphertext flipped", k, mutateJWE(t, good, func(m map[string]any) { m["ciphertext"] = flipB64(m["ciphertext"].(string) + "AAAA") }), "not sealed"},
		{"tag flipped", k, mutateJWE(t, good, func(m map[string]any) { m["tag"] = flipB64(m["tag"].(string)) }), "not sealed"},
		{"key flipped", k, mutateJWE(t, good, func(m map[string]any) { m["encrypted_key"] = flipB64(m["encrypted_key"].(string)) }), "not sealed"},
		{"aad added", k, mutateJWE(t, good, func(m map[string]any) { m["aad"] = "AAAA" }), "not sealed"},
		{"unprotected header", k, mutateJWE(t, good, func(m map[string]any) { m["header"] = map[string]string{"alg": "dir"} }), `unknown member "header"`},
		{"general form", k, mutateJWE(t, good, func(m map[string]any) { m["recipients"] = []any{} }), `unknown member "recipients"`},
		{"tag missing", k, mutateJWE(t, good, func(m map[string]any) { delete(m, "tag") }), `"tag" missing`},
		{"protected not b64", k, mutateJWE(t, good, func(m map[string]any) { m["protected"] = "!!" }), "not base64url"},
		{"compact", k, []byte("eyJhbGciOiJkaXIifQ..AAAA.AAAA.AAAA"), "not a flattened JSON JWE"},
		{"trailing", k, append(bytes.Clone(good), "{}"...), "trailing"},
		{"empty", k, nil, "not a flattened"},
		{"null", k, []byte("null"), "not a flattened"},
		{"case-folded member", k, mutateJWE(t, good, func(m map[string]any) { m["Protected"] = m["protected"] }), `unknown member "Protected"`},
		{"too big", k, make([]byte, MaxResourceJWE+1), "more than"},
		{"no key", nil, good, "no TEE key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := DecryptResource(tc.key, tc.jwe)
			if err == nil {
				t.Fatalf("DecryptResource succeeded with %q", got)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("DecryptResource = %v; want it to mention %q", err, tc.want)
			}
		})
	}
}

func TestParseTeePubKeyRejects(t *testing.T) {
	k := ecKey(t, elliptic.P256())
	var ec map[string]string
	json.Unmarshal(k.JWK, &ec)
	mod := func(f func(m map[string]string)) json.RawMessage {
		m := map[string]string{}
		for a, b := range ec {
			m[a] = b
		}
		f(m)
		b, _ := json.Marshal(m)
		return b
	}
	smallRSA, _ := rsa.GenerateKey(rand.Reader, 1024)
	for _, tc := range []struct {
		name string
		jwk  json.RawMessage
		want string
	}{
		{"RSA1_5", json.RawMessage(`{"kty":"RSA","alg":"RSA1_5","n":"AQAB","e":"AQAB"}`), "RSA1_5"},
		{"EC alg ECDH-ES", mod(func(m map[string]string) { m["alg"] = "ECDH-ES" }), `alg "ECDH-ES"`},
		{"secp256k1", mod(func(m map[string]string) { m["crv"] = "secp256k1" }), "crv"},
		{"short x", mod(func(m map[string]string) { m["x"] = m["x"][:20] }), `"x" is`},
		{"x not b64url", mod(func(m map[string]string) { m["x"] = "+/+/" }), "base64url"},
		{"off curve", mod(func(m map[string]string) { m["y"] = flipB64(m["y"]) }), "not a point"},
		{"P-384 coords on P-256", mod(func(m map[string]string) { m["crv"] = "P-384" }), `"x" is 32 bytes`},
		{"AKP", json.RawMessage(`{"kty":"AKP","alg":"ML-KEM-768","pub":"AAAA"}`), "cannot receive"},
		{"RSA-1024", json.RawMessage(`{"kty":"RSA","alg":"RSA-OAEP-256","n":"` + b64url(smallRSA.N.Bytes()) + `","e":"AQAB"}`), "RSA-1024"},
		{"RSA e=1", json.RawMessage(`{"kty":"RSA","alg":"RSA-OAEP-256","n":"` + b64url(rsaKey.N.Bytes()) + `","e":"AQ"}`), "exponent"},
		{"RSA huge e", json.RawMessage(`{"kty":"RSA","alg":"RSA-OAEP-256","n":"` + b64url(rsaKey.N.Bytes()) + `","e":"AQABAQAB"}`), "exponent"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := EncryptResource(tc.jwk, []byte("x")); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("EncryptResource = %v; want an error mentioning %q", err, tc.want)
			}
		})
	}
	if _, err := EncryptResource(k.JWK, make([]byte, MaxResourceJWE)); err == nil {
		t.Error("EncryptResource sealed a resource too large for DecryptResource to accept")
	}
}

func FuzzDecryptResource(f *testing.F) {
	k := ecKey(f, elliptic.P256())
	good, err := EncryptResource(k.JWK, []byte("seed"))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add(trusteeSeal(f, k, []byte("trustee")))
	f.Add([]byte(`{"protected":"eyJhbGciOiJFQ0RILUVTK0EyNTZLVyIsImVuYyI6IkEyNTZHQ00ifQ","encrypted_key":"AA","iv":"AA","ciphertext":"AA","tag":"AA"}`))
	f.Add([]byte(`{"protected":"e30","encrypted_key":"","iv":"","ciphertext":"","tag":""}`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, jwe []byte) {
		plain, err := DecryptResource(k, jwe)
		if err != nil {
			return
		}
		// Only an authentic JWE for k opens, and it opens to its
		// plaintext: the seeds' plaintexts are the only ones reachable.
		if s := string(plain); s != "seed" && s != "trustee" {
			t.Fatalf("DecryptResource opened a forged JWE to %q", plain)
		}
	})
}
