package attest

import (
	"bytes"
	"crypto/sha512"
	"encoding/json"
	"fmt"
	"unicode/utf8"

	"github.com/cwrun/cwrun/attest/internal/jsonx"
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

// runtimeDataJCS returns the canonical JSON that ReportData hashes,
// written directly: every key is fixed and ASCII, so RFC 8785's order
// is the order below, and only the string values need JCS's escaping.
// (A general canonicaliser parsed and re-serialised the document on
// every handshake, on both sides.)
func runtimeDataJCS(nonce string, teePubKey json.RawMessage, additional string) ([]byte, error) {
	key, err := normalJWK(teePubKey)
	if err != nil {
		return nil, err
	}
	out := make([]byte, 0, 96+len(nonce)+len(additional)+len(teePubKey))
	out = append(out, `{"additional-evidence":`...)
	out = appendJCSString(out, additional)
	out = append(out, `,"nonce":`...)
	out = appendJCSString(out, nonce)
	out = append(out, `,"tee-pubkey":{`...)
	// The members in RFC 8785 order: sorted by UTF-16 code units, which
	// for these ASCII names is byte order.
	for i, m := range jwkSorted[key.kty] {
		if i > 0 {
			out = append(out, ',')
		}
		out = append(out, '"')
		out = append(out, m...)
		out = append(out, '"', ':')
		out = appendJCSString(out, key.get(m))
	}
	return append(out, '}', '}'), nil
}

// appendJCSString writes s as RFC 8785 §3.2.2.2 serialises a string
// (ECMAScript's JSON.stringify): only '"', '\\' and control characters
// are escaped, the usual ones by their short forms and the others as
// \u00xx in lower-case hex. Bytes that are not UTF-8 become U+FFFD, as
// JSON encoding them first would have made them.
func appendJCSString(dst []byte, s string) []byte {
	dst = append(dst, '"')
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			switch {
			case c == '"' || c == '\\':
				dst = append(dst, '\\', c)
			case c >= 0x20:
				dst = append(dst, c)
			case c == '\b':
				dst = append(dst, '\\', 'b')
			case c == '\t':
				dst = append(dst, '\\', 't')
			case c == '\n':
				dst = append(dst, '\\', 'n')
			case c == '\f':
				dst = append(dst, '\\', 'f')
			case c == '\r':
				dst = append(dst, '\\', 'r')
			default:
				dst = append(dst, '\\', 'u', '0', '0', "0123456789abcdef"[c>>4], "0123456789abcdef"[c&0xF])
			}
			i++
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			dst = utf8.AppendRune(dst, utf8.RuneError)
		} else {
			dst = append(dst, s[i:i+size]...)
		}
		i += size
	}
	return append(dst, '"')
}

// jwkSorted lists, per kty, the members of Trustee's TeePubKey (kty
// included) in canonical order.
var jwkSorted = map[string][]string{
	"EC":  {"alg", "crv", "kty", "x", "y"},
	"RSA": {"alg", "e", "kty", "n"},
	"AKP": {"alg", "kty", "pub"},
}

// teeJWK is a TEE public key JWK reduced to the members Trustee's
// TeePubKey keeps, all strings.
type teeJWK struct {
	kty, crv, alg, x, y, n, e, pub string
}

func (k *teeJWK) get(member string) string {
	switch member {
	case "kty":
		return k.kty
	case "crv":
		return k.crv
	case "alg":
		return k.alg
	case "x":
		return k.x
	case "y":
		return k.y
	case "n":
		return k.n
	case "e":
		return k.e
	case "pub":
		return k.pub
	}
	return ""
}

func (k *teeJWK) field(member string) *string {
	switch member {
	case "kty":
		return &k.kty
	case "crv":
		return &k.crv
	case "alg":
		return &k.alg
	case "x":
		return &k.x
	case "y":
		return &k.y
	case "n":
		return &k.n
	case "e":
		return &k.e
	case "pub":
		return &k.pub
	}
	return nil
}

// normalJWK parses a TEE public key JWK into the members Trustee's
// TeePubKey keeps. Every kept member must be a string; other members
// are dropped as serde drops them (but the whole document must be
// valid JSON). As with a JSON object decoded into a map, names match
// exactly and the last of duplicate members counts.
func normalJWK(raw json.RawMessage) (*teeJWK, error) {
	if len(raw) > maxJWKSize {
		return nil, fmt.Errorf("tee-pubkey: %d bytes, more than the %d a JWK needs", len(raw), maxJWKSize)
	}
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || raw[0] != '{' {
		return nil, fmt.Errorf("tee-pubkey: want a JWK object, got %s", preview(raw))
	}
	var (
		k teeJWK
		// seen and notString record, per kept member, that it was
		// present and, for the last occurrence, what it was if not a
		// string.
		seen      = map[string]bool{}
		notString map[string][]byte
	)
	r := jsonx.NewReader(raw)
	err := r.Object(func(name string) error {
		dst := k.field(name)
		if dst == nil {
			return r.Skip()
		}
		seen[name] = true
		if r.Peek() != '"' {
			v, err := r.Raw()
			if err != nil {
				return err
			}
			if notString == nil {
				notString = map[string][]byte{}
			}
			notString[name] = v
			return nil
		}
		s, err := r.String()
		if err != nil {
			return err
		}
		*dst = s
		delete(notString, name)
		return nil
	})
	if err == nil {
		err = r.End()
	}
	if err != nil {
		return nil, fmt.Errorf("tee-pubkey: not a JSON object: %w", err)
	}
	check := func(name string) error {
		if !seen[name] {
			return fmt.Errorf("tee-pubkey: member %q missing", name)
		}
		if v, bad := notString[name]; bad {
			return fmt.Errorf("tee-pubkey: member %q is not a string: %s", name, preview(v))
		}
		return nil
	}
	if err := check("kty"); err != nil {
		return nil, err
	}
	if _, ok := jwkSorted[k.kty]; !ok {
		return nil, fmt.Errorf("tee-pubkey: kty %q unsupported (want EC, RSA or AKP)", k.kty)
	}
	// In Trustee's order, so that the first missing member named is
	// the one it would name.
	for _, m := range jwkMembers[k.kty] {
		if err := check(m); err != nil {
			return nil, err
		}
	}
	return &k, nil
}

// jwkMembers lists, per kty, the members of Trustee's TeePubKey.
var jwkMembers = map[string][]string{
	"EC":  {"crv", "alg", "x", "y"},
	"RSA": {"alg", "n", "e"},
	"AKP": {"alg", "pub"},
}

// preview quotes at most 40 bytes of untrusted input for an error.
func preview(b []byte) string {
	const n = 40
	if len(b) > n {
		return fmt.Sprintf("%q…", b[:n])
	}
	return fmt.Sprintf("%q", b)
}
