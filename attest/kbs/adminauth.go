package kbs

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/asn1"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net/http"
	"strings"
	"time"
)

// Admin calls carry Authorization: Bearer <JWT>, signed by a key the
// broker was given (Options.AdminKeys): EdDSA over Ed25519 or ES256 over
// P-256. The token must be short-lived: exp is required and at most
// MaxAdminTokenTTL after iat, so a leaked token is worth little.

// MaxAdminTokenTTL is the longest lifetime an admin token may claim.
const MaxAdminTokenTTL = time.Hour

type adminClaims struct {
	IssuedAt  *int64 `json:"iat"`
	NotBefore *int64 `json:"nbf,omitempty"`
	Expires   *int64 `json:"exp"`
	ID        string `json:"jti,omitempty"`
}

type adminVerifier struct {
	ed []ed25519.PublicKey
	ec []*ecdsa.PublicKey
}

func newAdminVerifier(keys []crypto.PublicKey) (*adminVerifier, error) {
	av := &adminVerifier{}
	for i, k := range keys {
		switch k := k.(type) {
		case ed25519.PublicKey:
			if len(k) != ed25519.PublicKeySize {
				return nil, fmt.Errorf("kbs: AdminKeys[%d]: Ed25519 key of %d bytes", i, len(k))
			}
			av.ed = append(av.ed, k)
		case *ecdsa.PublicKey:
			if k == nil || k.Curve != elliptic.P256() {
				return nil, fmt.Errorf("kbs: AdminKeys[%d]: ECDSA admin keys must be P-256 (ES256)", i)
			}
			av.ec = append(av.ec, k)
		default:
			return nil, fmt.Errorf("kbs: AdminKeys[%d]: %T is not an Ed25519 or ECDSA P-256 public key", i, k)
		}
	}
	return av, nil
}

func (av *adminVerifier) empty() bool { return len(av.ed) == 0 && len(av.ec) == 0 }

// verify checks an admin token's signature against every configured key
// of its algorithm, then its times.
func (av *adminVerifier) verify(tok string, now time.Time) error {
	hb, payload, sig, si, err := jwsParts(tok)
	if err != nil {
		return err
	}
	h, err := parseHeader(hb)
	if err != nil {
		return err
	}
	ok := false
	switch h.Alg {
	case "EdDSA":
		for _, k := range av.ed {
			if ed25519.Verify(k, []byte(si), sig) {
				ok = true
				break
			}
		}
	case "ES256":
		for _, k := range av.ec {
			if verifyES256(k, si, sig) {
				ok = true
				break
			}
		}
	default:
		return fmt.Errorf("admin token algorithm %q refused: use EdDSA (Ed25519) or ES256", truncate(h.Alg, 16))
	}
	if !ok {
		return errors.New("admin token is not signed by any of the broker's admin keys")
	}
	var c adminClaims
	if err := json.Unmarshal(payload, &c); err != nil {
		return errors.New("admin token claims are not a JSON object with numeric iat/exp")
	}
	if c.Expires == nil || c.IssuedAt == nil {
		return errors.New("admin token must carry iat and exp")
	}
	iat, exp := time.Unix(*c.IssuedAt, 0), time.Unix(*c.Expires, 0)
	switch {
	case !exp.After(iat):
		return errors.New("admin token expires before it was issued")
	case exp.Sub(iat) > MaxAdminTokenTTL:
		return fmt.Errorf("admin token lives %s; at most %s is accepted: mint a shorter one", exp.Sub(iat), MaxAdminTokenTTL)
	case iat.After(now.Add(clockSkew)):
		return errors.New("admin token issued in the future: check the clocks of this host and the admin's")
	case !now.Before(exp.Add(clockSkew)):
		return errors.New("admin token expired: mint a new one")
	case c.NotBefore != nil && time.Unix(*c.NotBefore, 0).After(now.Add(clockSkew)):
		return errors.New("admin token not valid yet (nbf)")
	}
	return nil
}

// adminOnly wraps an admin handler with token checking.
func (s *Server) adminOnly(h handler) handler {
	return func(w http.ResponseWriter, r *http.Request, p []string) error {
		if s.admin.empty() {
			return errorf(http.StatusForbidden, "the admin API is off: the broker has no admin keys configured")
		}
		tok, ok := bearer(r)
		if !ok {
			return errorf(http.StatusUnauthorized, "admin call without Authorization: Bearer <admin JWT>")
		}
		if err := s.admin.verify(tok, s.now()); err != nil {
			s.log.LogAttrs(r.Context(), slog.LevelWarn, "admin call refused",
				slog.String("reason", err.Error()), slog.String("remote", r.RemoteAddr), slog.String("path", truncate(r.URL.Path, 128)))
			return errorf(http.StatusUnauthorized, "%v", err)
		}
		return h(w, r, p)
	}
}

// bearer returns the token of an Authorization: Bearer header.
func bearer(r *http.Request) (string, bool) {
	a := r.Header.Get("Authorization")
	if len(a) < 7 || !strings.EqualFold(a[:7], "bearer ") {
		return "", false
	}
	t := strings.TrimSpace(a[7:])
	return t, t != ""
}

// MintAdminToken makes an admin JWT signed by key (an Ed25519 or ECDSA
// P-256 signer, which may live in an HSM), valid from now for ttl
// (at most MaxAdminTokenTTL). AdminClient calls it for every request.
func MintAdminToken(key crypto.Signer, ttl time.Duration) (string, error) {
	return mintAdminToken(key, ttl, time.Now())
}

func mintAdminToken(key crypto.Signer, ttl time.Duration, now time.Time) (string, error) {
	if key == nil {
		return "", errors.New("kbs: no admin key to sign with")
	}
	if ttl <= 0 || ttl > MaxAdminTokenTTL {
		return "", fmt.Errorf("kbs: admin token lifetime %s out of range (0, %s]", ttl, MaxAdminTokenTTL)
	}
	var alg string
	switch pub := key.Public().(type) {
	case ed25519.PublicKey:
		alg = "EdDSA"
	case *ecdsa.PublicKey:
		if pub.Curve != elliptic.P256() {
			return "", errors.New("kbs: ECDSA admin keys must be P-256")
		}
		alg = "ES256"
	default:
		return "", fmt.Errorf("kbs: admin key %T is neither Ed25519 nor ECDSA P-256", pub)
	}
	var jti [12]byte
	if _, err := rand.Read(jti[:]); err != nil {
		return "", err
	}
	iat, exp := now.Unix(), now.Add(ttl).Unix()
	payload, err := json.Marshal(adminClaims{IssuedAt: &iat, Expires: &exp, ID: base64.RawURLEncoding.EncodeToString(jti[:])})
	if err != nil {
		return "", err
	}
	hdr, _ := json.Marshal(joseHeader{Alg: alg, Typ: "JWT"})
	si := base64.RawURLEncoding.EncodeToString(hdr) + "." + base64.RawURLEncoding.EncodeToString(payload)
	var sig []byte
	if alg == "EdDSA" {
		sig, err = key.Sign(rand.Reader, []byte(si), crypto.Hash(0))
		if err != nil {
			return "", fmt.Errorf("kbs: signing admin token: %w", err)
		}
	} else {
		d := sha256.Sum256([]byte(si))
		der, err := key.Sign(rand.Reader, d[:], crypto.SHA256)
		if err != nil {
			return "", fmt.Errorf("kbs: signing admin token: %w", err)
		}
		// crypto.Signer answers ASN.1; JWS wants r||s.
		var rs struct{ R, S *big.Int }
		if _, err := asn1.Unmarshal(der, &rs); err != nil {
			return "", fmt.Errorf("kbs: admin key's signature is not ASN.1 ECDSA: %w", err)
		}
		sig = make([]byte, 64)
		rs.R.FillBytes(sig[:32])
		rs.S.FillBytes(sig[32:])
	}
	return si + "." + base64.RawURLEncoding.EncodeToString(sig), nil
}
