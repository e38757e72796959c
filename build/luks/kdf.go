package luks

import (
	"crypto/hmac"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/binary"
	"fmt"
	"hash"
	"io"
)

// hashFunc maps a LUKS hash name to its constructor. cwrun writes sha256;
// the others are read because cryptsetup's other defaults use them and
// they cost nothing to support.
func hashFunc(name string) (func() hash.Hash, bool) {
	switch name {
	case "sha1":
		return sha1.New, true
	case "sha256":
		return sha256.New, true
	case "sha384":
		return sha512.New384, true
	case "sha512":
		return sha512.New, true
	}
	return nil, false
}

// pbkdf2Key is PBKDF2-HMAC (RFC 8018). It is here instead of crypto/pbkdf2
// because that takes the password as a string, and the "password" is a
// volume key when computing the digest: a string copy could never be wiped.
func pbkdf2Key(h func() hash.Hash, password, salt []byte, iter, keyLen int) []byte {
	prf := hmac.New(h, password)
	hashLen := prf.Size()
	out := make([]byte, 0, (keyLen+hashLen-1)/hashLen*hashLen)
	var ctr [4]byte
	u := make([]byte, hashLen)
	t := make([]byte, hashLen)
	for block := uint32(1); len(out) < keyLen; block++ {
		binary.BigEndian.PutUint32(ctr[:], block)
		prf.Reset()
		prf.Write(salt)
		prf.Write(ctr[:])
		u = prf.Sum(u[:0])
		copy(t, u)
		for n := 1; n < iter; n++ {
			prf.Reset()
			prf.Write(u)
			u = prf.Sum(u[:0])
			for i := range t {
				t[i] ^= u[i]
			}
		}
		out = append(out, t...)
	}
	clear(u)
	clear(t)
	clear(out[keyLen:cap(out)])
	return out[:keyLen]
}

// diffuse is the AF splitter's diffusion: the buffer is hashed in
// digest-sized pieces, each prefixed by its big-endian index (cryptsetup's
// lib/luks1/af.c, LUKS1 spec section "AF-Splitter").
func diffuse(h hash.Hash, buf []byte) {
	ds := h.Size()
	var idx [4]byte
	var sum []byte
	for i := 0; i*ds < len(buf); i++ {
		end := min((i+1)*ds, len(buf))
		binary.BigEndian.PutUint32(idx[:], uint32(i))
		h.Reset()
		h.Write(idx[:])
		h.Write(buf[i*ds : end])
		sum = h.Sum(sum[:0])
		copy(buf[i*ds:end], sum)
	}
	clear(sum)
}

// afSplit spreads key over stripes blocks so that destroying any one block
// destroys the key. The result is len(key)*stripes bytes.
func afSplit(rnd io.Reader, key []byte, stripes int, h func() hash.Hash) ([]byte, error) {
	n := len(key)
	out := make([]byte, n*stripes)
	if _, err := io.ReadFull(rnd, out[:n*(stripes-1)]); err != nil {
		return nil, fmt.Errorf("luks: new volume: reading random AF stripes: %w", err)
	}
	hh := h()
	acc := make([]byte, n)
	for i := 0; i < stripes-1; i++ {
		for j := range acc {
			acc[j] ^= out[i*n+j]
		}
		diffuse(hh, acc)
	}
	last := out[(stripes-1)*n:]
	for j := range acc {
		last[j] = acc[j] ^ key[j]
	}
	clear(acc)
	return out, nil
}

// afMerge inverts afSplit: material is keyLen*stripes bytes.
func afMerge(material []byte, keyLen, stripes int, h func() hash.Hash) []byte {
	hh := h()
	acc := make([]byte, keyLen)
	for i := 0; i < stripes-1; i++ {
		for j := range acc {
			acc[j] ^= material[i*keyLen+j]
		}
		diffuse(hh, acc)
	}
	last := material[(stripes-1)*keyLen:]
	for j := range acc {
		acc[j] ^= last[j]
	}
	return acc
}
