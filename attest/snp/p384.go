package snp

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"errors"
	"math/big"

	"github.com/cloudflare/circl/ecc/p384"
)

// A report's ECDSA P-384 signature is the costliest check of an SNP
// handshake, and Go's crypto/ecdsa does P-384 in portable code (about
// 0.8 ms a verification on the 2-core machine the broker's benchmark
// runs on). circl's P-384 has assembly field arithmetic (amd64, arm64)
// and a double-scalar multiplication meant for signature checks, about
// 3.5 times faster. Verification handles only public values (the
// report, its signature, the VCEK), so circl's variable-time code
// leaks nothing. The equations are FIPS 186-5's, step by step, and
// TestVerifyP384MatchesCryptoECDSA and FuzzVerifyP384 hold the result
// to crypto/ecdsa's on valid, tampered and edge-case signatures.

// p384Key is a VCEK's or VLEK's public key ready for verifyP384.
type p384Key struct {
	pub  *ecdsa.PublicKey // the fallback's, and the reference for tests
	x, y *big.Int
}

var p384Order = elliptic.P384().Params().N

func newP384Key(pub *ecdsa.PublicKey) (*p384Key, error) {
	if pub == nil || pub.Curve != elliptic.P384() {
		return nil, errors.New("the endorsement key is not an ECDSA P-384 key")
	}
	// Bytes checks the point is on the curve and gives its uncompressed
	// encoding: 0x04 || X || Y.
	b, err := pub.Bytes()
	if err != nil || len(b) != 1+2*48 {
		return nil, errors.New("the endorsement key is not a valid P-384 point")
	}
	return &p384Key{pub: pub, x: new(big.Int).SetBytes(b[1:49]), y: new(big.Int).SetBytes(b[49:])}, nil
}

// verifyP384 reports whether (r, s) is k's ECDSA signature of digest
// (a SHA-384 hash, 48 bytes).
func verifyP384(k *p384Key, digest []byte, r, s *big.Int) bool {
	n := p384Order
	// 1. r and s in [1, n-1].
	if r.Sign() <= 0 || s.Sign() <= 0 || r.Cmp(n) >= 0 || s.Cmp(n) >= 0 {
		return false
	}
	// 2. e: the leftmost bitlen(n) = 384 bits of the hash.
	if len(digest) > 48 {
		digest = digest[:48]
	}
	e := new(big.Int).SetBytes(digest)
	// 3. w = s⁻¹, u1 = e·w, u2 = r·w (mod n).
	w := new(big.Int).ModInverse(s, n)
	if w == nil {
		return false
	}
	u1 := e.Mul(e, w)
	u1.Mod(u1, n)
	if u1.Sign() == 0 {
		// R = u2·Q alone: a digest equal to 0 mod n, which no honest
		// SHA-384 output is. Leave the corner to crypto/ecdsa.
		return ecdsa.Verify(k.pub, digest, r, s)
	}
	u2 := w.Mul(r, w)
	u2.Mod(u2, n)
	// 4. R = u1·G + u2·Q; the point at infinity comes back as (0, 0).
	x, y := p384.P384().CombinedMult(k.x, k.y, u1.Bytes(), u2.Bytes())
	if x.Sign() == 0 && y.Sign() == 0 {
		return false
	}
	// 5. valid when R.x mod n = r.
	return x.Mod(x, n).Cmp(r) == 0
}
