package snp

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha512"
	"math/big"
	mrand "math/rand/v2"
	"testing"
)

func testP384Key(t testing.TB) (*ecdsa.PrivateKey, *p384Key) {
	t.Helper()
	priv, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	k, err := newP384Key(&priv.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	return priv, k
}

// TestVerifyP384MatchesCryptoECDSA holds verifyP384 to crypto/ecdsa's
// answer on valid signatures, tampered ones, and the edge values of r
// and s.
func TestVerifyP384MatchesCryptoECDSA(t *testing.T) {
	priv, k := testP384Key(t)
	_, other := testP384Key(t)
	n := p384Order
	nMinus1 := new(big.Int).Sub(n, big.NewInt(1))
	rng := mrand.New(mrand.NewPCG(1, 2))
	check := func(name string, k *p384Key, digest []byte, r, s *big.Int) bool {
		t.Helper()
		got := verifyP384(k, digest, r, s)
		want := ecdsa.Verify(k.pub, digest, r, s)
		if got != want {
			t.Errorf("%s: verifyP384 = %v, crypto/ecdsa = %v (r=%x s=%x digest=%x)", name, got, want, r, s, digest)
		}
		return got
	}
	valid := 0
	for i := range 200 {
		msg := make([]byte, 1+rng.IntN(64))
		for j := range msg {
			msg[j] = byte(rng.Uint32())
		}
		d := sha512.Sum384(msg)
		r, s, err := ecdsa.Sign(rand.Reader, priv, d[:])
		if err != nil {
			t.Fatal(err)
		}
		if check("valid", k, d[:], r, s) {
			valid++
		}
		// s and n-s both verify (ECDSA's malleability): so says crypto/ecdsa.
		check("negated s", k, d[:], r, new(big.Int).Sub(n, s))
		check("other key", other, d[:], r, s)
		bad := d
		bad[i%len(bad)] ^= 1 << (i % 8)
		check("flipped digest bit", k, bad[:], r, s)
		check("r+1", k, d[:], new(big.Int).Add(r, big.NewInt(1)), s)
		check("s+1", k, d[:], r, new(big.Int).Add(s, big.NewInt(1)))
		check("r+n", k, d[:], new(big.Int).Add(r, n), s)
		check("s+n", k, d[:], r, new(big.Int).Add(s, n))
		check("swapped", k, d[:], s, r)
	}
	if valid != 200 {
		t.Fatalf("%d of 200 valid signatures verified", valid)
	}
	d := sha512.Sum384([]byte("edge"))
	for _, c := range []struct {
		name string
		r, s *big.Int
	}{
		{"r=0", big.NewInt(0), big.NewInt(1)},
		{"s=0", big.NewInt(1), big.NewInt(0)},
		{"r=n", n, big.NewInt(1)},
		{"s=n", big.NewInt(1), n},
		{"r=n-1 s=n-1", nMinus1, nMinus1},
		{"r=1 s=1", big.NewInt(1), big.NewInt(1)},
		{"negative r", big.NewInt(-1), big.NewInt(1)},
	} {
		check(c.name, k, d[:], c.r, c.s)
	}
	// Digests that are 0 mod n take the crypto/ecdsa path.
	check("zero digest", k, make([]byte, 48), big.NewInt(1), big.NewInt(1))
	check("digest n", k, n.FillBytes(make([]byte, 48)), big.NewInt(1), big.NewInt(1))
	// With Q = G (private key 1), R = u1·G + u2·G = (e + r)/s · G, the
	// point at infinity when r = -e mod n: it must not verify.
	one, err := newP384Key(&ecdsa.PublicKey{Curve: elliptic.P384(), X: elliptic.P384().Params().Gx, Y: elliptic.P384().Params().Gy})
	if err != nil {
		t.Fatal(err)
	}
	e := new(big.Int).SetBytes(d[:])
	r := new(big.Int).Sub(n, new(big.Int).Mod(e, n))
	if check("point at infinity", one, d[:], r, big.NewInt(12345)) {
		t.Error("a signature whose R is the point at infinity verified")
	}
}

func TestNewP384KeyRefusesOtherCurves(t *testing.T) {
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := newP384Key(&priv.PublicKey); err == nil {
		t.Fatal("a P-256 key was accepted as a P-384 endorsement key")
	}
	if _, err := newP384Key(nil); err == nil {
		t.Fatal("a nil key was accepted")
	}
}

// FuzzVerifyP384 throws arbitrary r, s and digests at verifyP384 and
// crypto/ecdsa, seeded with a valid signature: they must agree.
func FuzzVerifyP384(f *testing.F) {
	priv, k := testP384Key(f)
	d := sha512.Sum384([]byte("seed"))
	r, s, err := ecdsa.Sign(rand.Reader, priv, d[:])
	if err != nil {
		f.Fatal(err)
	}
	f.Add(d[:], r.Bytes(), s.Bytes())
	f.Add(d[:], r.Bytes(), new(big.Int).Sub(p384Order, s).Bytes())
	f.Add([]byte{}, []byte{1}, []byte{1})
	f.Fuzz(func(t *testing.T, digest, rb, sb []byte) {
		r, s := new(big.Int).SetBytes(rb), new(big.Int).SetBytes(sb)
		if got, want := verifyP384(k, digest, r, s), ecdsa.Verify(k.pub, digest, r, s); got != want {
			t.Fatalf("verifyP384 = %v, crypto/ecdsa = %v", got, want)
		}
	})
}

func BenchmarkVerifyP384(b *testing.B) {
	priv, k := testP384Key(b)
	d := sha512.Sum384([]byte("bench"))
	r, s, err := ecdsa.Sign(rand.Reader, priv, d[:])
	if err != nil {
		b.Fatal(err)
	}
	b.Run("circl", func(b *testing.B) {
		for b.Loop() {
			if !verifyP384(k, d[:], r, s) {
				b.Fatal("refused")
			}
		}
	})
	b.Run("crypto-ecdsa", func(b *testing.B) {
		for b.Loop() {
			if !ecdsa.Verify(k.pub, d[:], r, s) {
				b.Fatal("refused")
			}
		}
	})
}
