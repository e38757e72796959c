package kbs

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"net/http"
	"time"
)

// CookieName is the session cookie Trustee's clients expect.
const CookieName = "kbs-session-id"

// session is what the sealed cookie carries between /auth, /attest and
// /resource. The broker keeps nothing: whoever holds the cookie key can
// open it, so every replica can.
type session struct {
	// Epoch is the store's nonce epoch when /auth made the session (0:
	// the store records nonces durably); see store.NonceEpocher.
	Epoch   uint64
	Tee     string
	Nonce   string
	Expires time.Time
	// Token is set once /attest succeeded: the cookie then works for
	// /resource like the bearer token does.
	Token string
}

// Sealed form: base64url(nonce[12] || AES-256-GCM(plaintext, aad)), with
//
//	plaintext = version(1)=2 || epoch (8, big endian) ||
//	            expires unix seconds (8, big endian) ||
//	            len(tee)(1) || tee || len(nonce)(1) || nonce ||
//	            len(token)(2) || token
//
// Version 1, sealed by brokers before the epoch, lacks the epoch field;
// it still opens, as epoch 0. A binary layout keeps the cookie small
// (the upgraded one carries a whole token) and its parser trivial.
const (
	sessionVersion   = 2
	sessionVersionV1 = 1
	sessionAAD       = "cwrun-kbs session v1"
	// maxCookie bounds what is decoded at all: a token is a few KiB.
	maxCookie = 16 << 10
)

func (s *Server) sealSession(ss session) (string, error) {
	if len(ss.Tee) > 255 || len(ss.Nonce) > 255 || len(ss.Token) > 0xffff {
		return "", errors.New("session field too long to seal")
	}
	pt := make([]byte, 0, 1+8+8+1+len(ss.Tee)+1+len(ss.Nonce)+2+len(ss.Token))
	pt = append(pt, sessionVersion)
	pt = binary.BigEndian.AppendUint64(pt, ss.Epoch)
	pt = binary.BigEndian.AppendUint64(pt, uint64(ss.Expires.Unix()))
	pt = append(pt, byte(len(ss.Tee)))
	pt = append(pt, ss.Tee...)
	pt = append(pt, byte(len(ss.Nonce)))
	pt = append(pt, ss.Nonce...)
	pt = binary.BigEndian.AppendUint16(pt, uint16(len(ss.Token)))
	pt = append(pt, ss.Token...)

	ns := s.cookie.NonceSize()
	out := make([]byte, ns, ns+len(pt)+s.cookie.Overhead())
	if _, err := rand.Read(out); err != nil {
		return "", err
	}
	out = s.cookie.Seal(out, out[:ns], pt, []byte(sessionAAD))
	return base64.RawURLEncoding.EncodeToString(out), nil
}

// openSession authenticates and parses a cookie value. It does not check
// expiry; callers do, against the broker's clock.
func (s *Server) openSession(v string) (session, error) {
	if len(v) > maxCookie {
		return session{}, errors.New("session cookie too long")
	}
	raw, err := base64.RawURLEncoding.DecodeString(v)
	if err != nil {
		return session{}, errors.New("session cookie is not base64url")
	}
	ns := s.cookie.NonceSize()
	if len(raw) < ns+s.cookie.Overhead() {
		return session{}, errors.New("session cookie too short")
	}
	pt, err := s.cookie.Open(nil, raw[:ns], raw[ns:], []byte(sessionAAD))
	for _, old := range s.cookieOld {
		if err == nil {
			break
		}
		// A session begun on a replica not yet given the new secrets.
		pt, err = old.Open(nil, raw[:ns], raw[ns:], []byte(sessionAAD))
	}
	if err != nil {
		return session{}, errors.New("session cookie was not sealed by this broker's cookie key")
	}
	return parseSession(pt)
}

// parseSession reads the plaintext layout. It only ever sees bytes this
// broker sealed, but parses defensively all the same (and is fuzzed).
func parseSession(pt []byte) (session, error) {
	bad := func(what string) (session, error) {
		return session{}, fmt.Errorf("session cookie malformed: %s", what)
	}
	if len(pt) < 1 || pt[0] != sessionVersion && pt[0] != sessionVersionV1 {
		return bad("version")
	}
	var ss session
	p := pt[1:]
	if pt[0] == sessionVersion {
		if len(p) < 8 {
			return bad("epoch")
		}
		ss.Epoch, p = binary.BigEndian.Uint64(p), p[8:]
	}
	if len(p) < 8+1 {
		return bad("expiry")
	}
	ss.Expires = time.Unix(int64(binary.BigEndian.Uint64(p)), 0)
	p = p[8:]
	n := int(p[0])
	p = p[1:]
	if len(p) < n+1 {
		return bad("tee")
	}
	ss.Tee, p = string(p[:n]), p[n:]
	n = int(p[0])
	p = p[1:]
	if len(p) < n+2 {
		return bad("nonce")
	}
	ss.Nonce, p = string(p[:n]), p[n:]
	n = int(binary.BigEndian.Uint16(p))
	p = p[2:]
	if len(p) != n {
		return bad("token")
	}
	ss.Token = string(p)
	return ss, nil
}

// sessionFrom finds and opens the request's session cookie.
func (s *Server) sessionFrom(r *http.Request) (session, error) {
	c, err := r.Cookie(CookieName)
	if err != nil {
		return session{}, startAgain("no %s cookie: start the handshake at /kbs/v0/auth", CookieName)
	}
	ss, err := s.openSession(c.Value)
	if err != nil {
		return session{}, startAgain("%v: start the handshake again at /kbs/v0/auth", err)
	}
	return ss, nil
}

func (s *Server) setSessionCookie(w http.ResponseWriter, ss session) error {
	v, err := s.sealSession(ss)
	if err != nil {
		return err
	}
	w.Header().Add("Set-Cookie", sessionCookieHeader(v, ss.Expires))
	return nil
}

// sessionCookieHeader writes the Set-Cookie value that http.SetCookie
// would write for the session cookie (name, value, Path=/kbs, Expires,
// HttpOnly, SameSite=Strict), without its per-byte sanitising of a
// value that is base64url by construction: for a cookie that carries a
// token, kilobytes on every /attest.
func sessionCookieHeader(value string, expires time.Time) string {
	b := make([]byte, 0, len(CookieName)+len(value)+96)
	b = append(b, CookieName...)
	b = append(b, '=')
	b = append(b, value...)
	b = append(b, "; Path=/kbs; Expires="...)
	b = expires.UTC().AppendFormat(b, http.TimeFormat)
	b = append(b, "; HttpOnly; SameSite=Strict"...)
	return string(b)
}
