package attest

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"strings"
	"testing"

	"github.com/go-jose/go-jose/v4"
)

// TestEncryptOpensWithGoJose opens EncryptResource's JWEs with go-jose's
// decrypter, for every key kind the broker seals to: a second, widely
// used implementation must agree, or interop broke.
func TestEncryptOpensWithGoJose(t *testing.T) {
	keys := map[string]*TeeKey{
		"P-256":    ecKey(t, elliptic.P256()),
		"P-384":    ecKey(t, elliptic.P384()),
		"P-521":    ecKey(t, elliptic.P521()),
		"RSA-2048": testRSAKey(t),
	}
	for name, k := range keys {
		for _, size := range []int{0, 1, 33, 5000} {
			plain := make([]byte, size)
			rand.Read(plain)
			jwe, err := EncryptResource(k.JWK, plain)
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			obj, err := jose.ParseEncryptedJSON(string(jwe),
				[]jose.KeyAlgorithm{jose.ECDH_ES_A256KW, jose.RSA_OAEP_256}, []jose.ContentEncryption{jose.A256GCM})
			if err != nil {
				t.Fatalf("%s: go-jose cannot parse %s: %v", name, jwe, err)
			}
			got, err := obj.Decrypt(k.Private)
			if err != nil {
				t.Fatalf("%s, %d bytes: go-jose cannot decrypt: %v", name, size, err)
			}
			if !bytes.Equal(got, plain) {
				t.Fatalf("%s: go-jose decrypted %d bytes to something else", name, size)
			}
		}
	}
}

// TestDecryptGoJoseJWE opens what go-jose seals, as the old broker (and
// any go-jose based one) sent it.
func TestDecryptGoJoseJWE(t *testing.T) {
	for name, k := range map[string]*TeeKey{
		"P-256": ecKey(t, elliptic.P256()),
		"P-521": ecKey(t, elliptic.P521()),
		"RSA":   testRSAKey(t),
	} {
		pub, err := ParseTeePubKey(k.JWK)
		if err != nil {
			t.Fatal(err)
		}
		alg := jose.ECDH_ES_A256KW
		if name == "RSA" {
			alg = jose.RSA_OAEP_256
		}
		enc, err := jose.NewEncrypter(jose.A256GCM, jose.Recipient{Algorithm: alg, Key: pub}, nil)
		if err != nil {
			t.Fatal(err)
		}
		obj, err := enc.Encrypt([]byte("sealed by go-jose"))
		if err != nil {
			t.Fatal(err)
		}
		got, err := DecryptResource(k, []byte(obj.FullSerialize()))
		if err != nil || string(got) != "sealed by go-jose" {
			t.Errorf("%s: DecryptResource = %q, %v", name, got, err)
		}
	}
}

// TestConcatKDFVector is RFC 7518 Appendix C: ECDH-ES with A128GCM,
// PartyUInfo "Alice", PartyVInfo "Bob".
func TestConcatKDFVector(t *testing.T) {
	z := []byte{158, 86, 217, 29, 129, 113, 53, 211, 114, 131, 66, 131, 191, 132, 38, 156,
		251, 49, 110, 163, 218, 128, 106, 72, 246, 218, 167, 121, 140, 254, 144, 196}
	k := concatKDFSHA256(z, "A128GCM", []byte("Alice"), []byte("Bob"), 128)
	if got := b64url(k[:16]); got != "VqqN6vgjbSBcIijNcacQGg" {
		t.Errorf("Concat KDF = %s, want RFC 7518's VqqN6vgjbSBcIijNcacQGg", got)
	}
	// And the test's own writing of it agrees for ECDH-ES+A256KW.
	kek := concatKDFSHA256(z, AlgECDH, nil, nil, 256)
	if !bytes.Equal(kek[:], concatKDF(z, AlgECDH, 32)) {
		t.Error("concatKDFSHA256 and the test's Concat KDF differ")
	}
}

// TestKeyWrapVector is RFC 3394 §4.6: 256 bits of key data with a
// 256-bit KEK.
func TestKeyWrapVector(t *testing.T) {
	kek, _ := hex.DecodeString("000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F")
	key, _ := hex.DecodeString("00112233445566778899AABBCCDDEEFF000102030405060708090A0B0C0D0E0F")
	want, _ := hex.DecodeString("28C9F404C4B810F4CBCCB35CFB87F8263F5786E2D80ED326CBC7F0E71A99F43BFB988B9B7A02DD21")
	got, err := wrapKey(kek, key)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("wrapKey = %X, %v; want %X", got, err, want)
	}
	back, err := unwrapKey(kek, got)
	if err != nil || !bytes.Equal(back, key) {
		t.Fatalf("unwrapKey = %X, %v", back, err)
	}
	for i := range got {
		bad := bytes.Clone(got)
		bad[i] ^= 0x80
		if _, err := unwrapKey(kek, bad); err == nil {
			t.Fatalf("unwrapKey accepted a wrapped key with byte %d flipped", i)
		}
	}
	for _, n := range []int{0, 8, 16, 41} {
		if _, err := unwrapKey(kek, make([]byte, n)); err == nil {
			t.Errorf("unwrapKey accepted %d bytes", n)
		}
	}
}

// TestDecryptPartyInfo opens a JWE whose sender put apu and apv in the
// header (RFC 7518 §4.6.1.2-3): they enter the KDF, as go-jose had it.
func TestDecryptPartyInfo(t *testing.T) {
	k := ecKey(t, elliptic.P384())
	jwe := sealWith(t, k, []byte("with party info"), map[string]any{"apu": b64url([]byte("Alice")), "apv": b64url([]byte("Bob"))},
		[]byte("Alice"), []byte("Bob"))
	got, err := DecryptResource(k, jwe)
	if err != nil || string(got) != "with party info" {
		t.Fatalf("DecryptResource = %q, %v", got, err)
	}
	// The same JWE with the KDF run without them does not open.
	jwe = sealWith(t, k, []byte("x"), map[string]any{"apu": b64url([]byte("Alice"))}, nil, nil)
	if _, err := DecryptResource(k, jwe); err == nil || !strings.Contains(err.Error(), "not sealed") {
		t.Fatalf("DecryptResource of a JWE whose apu the KDF skipped = %v", err)
	}
}

// sealWith seals like Trustee (independent code) on k's curve, with
// extra protected header members and the given KDF party info.
func sealWith(t *testing.T, k *TeeKey, plain []byte, extra map[string]any, apu, apv []byte) []byte {
	t.Helper()
	pub, _ := k.Private.(*ecdsa.PrivateKey).PublicKey.ECDH()
	eph, _ := pub.Curve().GenerateKey(rand.Reader)
	z, _ := eph.ECDH(pub)
	crv, size, _ := curveName(pub.Curve())
	kek := concatKDFSHA256(z, AlgECDH, apu, apv, 256)
	cek := make([]byte, 32)
	rand.Read(cek)
	pt := eph.PublicKey().Bytes()
	h := map[string]any{
		"alg": AlgECDH, "enc": EncGCM,
		"epk": map[string]string{"crv": crv, "kty": "EC", "x": b64url(pt[1 : 1+size]), "y": b64url(pt[1+size:])},
	}
	for a, b := range extra {
		h[a] = b
	}
	hdr, _ := json.Marshal(h)
	prot := b64url(hdr)
	block, _ := aes.NewCipher(cek)
	gcm, _ := cipher.NewGCM(block)
	iv := make([]byte, 12)
	rand.Read(iv)
	sealed := gcm.Seal(nil, iv, plain, []byte(prot))
	out, _ := json.Marshal(map[string]any{
		"protected": prot, "encrypted_key": b64url(aesWrap(t, kek[:], cek)),
		"iv": b64url(iv), "ciphertext": b64url(sealed[:len(plain)]), "tag": b64url(sealed[len(plain):]),
	})
	return out
}

// TestDecryptRejectsEPK covers the ephemeral key's checks.
func TestDecryptRejectsEPK(t *testing.T) {
	k := ecKey(t, elliptic.P256())
	good, err := EncryptResource(k.JWK, []byte("secret"))
	if err != nil {
		t.Fatal(err)
	}
	p384 := ecKey(t, elliptic.P384())
	other, err := EncryptResource(p384.JWK, []byte("secret"))
	if err != nil {
		t.Fatal(err)
	}
	otherEPK := func(h map[string]any) {
		var oh map[string]any
		raw, _ := base64.RawURLEncoding.DecodeString(strings.Split(string(other), `"`)[3])
		json.Unmarshal(raw, &oh)
		h["epk"] = oh["epk"]
	}
	for _, tc := range []struct {
		name string
		jwe  []byte
		want string
	}{
		{"no epk", withHeader(t, good, func(h map[string]any) { delete(h, "epk") }), "no epk"},
		{"epk not an object", withHeader(t, good, func(h map[string]any) { h["epk"] = "x" }), "not a JSON object"},
		{"epk on P-384", withHeader(t, good, otherEPK), `crv "P-384"`},
		{"epk kty OKP", withHeader(t, good, func(h map[string]any) { h["epk"].(map[string]any)["kty"] = "OKP" }), `kty "OKP"`},
		{"epk off curve", withHeader(t, good, func(h map[string]any) {
			e := h["epk"].(map[string]any)
			e["y"] = flipB64(e["y"].(string))
		}), "epk"},
		{"epk short x", withHeader(t, good, func(h map[string]any) {
			e := h["epk"].(map[string]any)
			e["x"] = e["x"].(string)[:40]
		}), "not 32 bytes"},
		{"apu not base64url", withHeader(t, good, func(h map[string]any) { h["apu"] = "!!" }), "apu"},
		{"iv short", mutateJWE(t, good, func(m map[string]any) { m["iv"] = "AAAA" }), "iv is not 12 bytes"},
		{"tag short", mutateJWE(t, good, func(m map[string]any) { m["tag"] = "AAAA" }), "tag is not 16 bytes"},
		{"encrypted_key short", mutateJWE(t, good, func(m map[string]any) { m["encrypted_key"] = "AAAA" }), "not sealed"},
		{"ciphertext not base64url", mutateJWE(t, good, func(m map[string]any) { m["ciphertext"] = "*" }), "ciphertext is not base64url"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := DecryptResource(k, tc.jwe)
			if err == nil {
				t.Fatalf("DecryptResource succeeded with %q", got)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("DecryptResource = %v; want it to mention %q", err, tc.want)
			}
		})
	}
}

// TestTeeKeyECDHCache checks that the kept crypto/ecdh key is used only
// for the key it was made from.
func TestTeeKeyECDHCache(t *testing.T) {
	k, err := NewTeeKey()
	if err != nil {
		t.Fatal(err)
	}
	priv := k.Private.(*ecdsa.PrivateKey)
	ek, err := priv.ECDH()
	if err != nil {
		t.Fatal(err)
	}
	if !ek.Equal(k.ecdh) {
		t.Fatal("NewTeeKey's ecdsa and ecdh halves are different keys")
	}
	jwe, err := EncryptResource(k.JWK, []byte("x"))
	if err != nil {
		t.Fatal(err)
	}
	// Swapping Private for another key must not decrypt with the old one.
	k.Private = ecKey(t, elliptic.P256()).Private
	if _, err := DecryptResource(k, jwe); err == nil {
		t.Fatal("DecryptResource used the kept key after Private changed")
	}
	// A TeeKey made by hand, without the kept key, still works.
	bare := &TeeKey{Private: priv, JWK: k.JWK}
	if got, err := DecryptResource(bare, jwe); err != nil || string(got) != "x" {
		t.Fatalf("DecryptResource with a hand-made TeeKey = %q, %v", got, err)
	}
}

// BenchmarkJWE measures what a handshake spends on the resource's JWE:
// the broker's EncryptResource and the guest's DecryptResource, P-256.
func BenchmarkJWE(b *testing.B) {
	k, err := NewTeeKey()
	if err != nil {
		b.Fatal(err)
	}
	plain := []byte("a disk passphrase of some 40 characters..")
	b.Run("encrypt", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := EncryptResource(k.JWK, plain); err != nil {
				b.Fatal(err)
			}
		}
	})
	jwe, _ := EncryptResource(k.JWK, plain)
	b.Run("decrypt", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := DecryptResource(k, jwe); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("newkey", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := NewTeeKey(); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// TestDecryptFailuresLookAlike: a content key that does not open (RSA
// OAEP, AES key unwrap) and a ciphertext that does not authenticate
// give the same error, so a relaying host learns nothing from which.
func TestDecryptFailuresLookAlike(t *testing.T) {
	for name, k := range map[string]*TeeKey{"RSA": testRSAKey(t), "EC": ecKey(t, elliptic.P256())} {
		good, err := EncryptResource(k.JWK, []byte("secret"))
		if err != nil {
			t.Fatal(err)
		}
		var msgs []string
		for _, member := range []string{"encrypted_key", "tag"} {
			bad := mutateJWE(t, good, func(m map[string]any) { m[member] = flipB64(m[member].(string)) })
			_, err := DecryptResource(k, bad)
			if err == nil {
				t.Fatalf("%s: %s flipped, yet it opened", name, member)
			}
			msgs = append(msgs, err.Error())
		}
		if msgs[0] != msgs[1] {
			t.Errorf("%s: key failure %q differs from ciphertext failure %q", name, msgs[0], msgs[1])
		}
	}
}
