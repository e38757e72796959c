package kbs

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/cwrun/cwrun/attest"
	"github.com/cwrun/cwrun/attest/kbs/store"
)

// The guest side of Trustee's KBS protocol 0.4.0: /auth hands out a
// nonce in a sealed session cookie, /attest checks evidence bound to that
// nonce and the guest's TEE key and answers a token, /resource appraises
// the token against the resource's rules and answers the resource
// encrypted to the TEE key.

func (s *Server) handleAuth(w http.ResponseWriter, r *http.Request, _ []string) (err error) {
	body, err := readBody(w, r, maxAuthBody, "auth request")
	if err != nil {
		return err
	}
	req, err := decodeAuthRequest(body)
	if err != nil {
		s.metrics.handshake("", "bad_request")
		return err
	}
	if req.Version != attest.ProtocolVersion {
		s.metrics.handshake(req.Tee, "bad_request")
		return badRequest("protocol version %q not served: this broker speaks KBS protocol %s (krun's legacy 0.0.0 flow is not served; see /kbs/v0/key)",
			truncate(req.Version, 16), attest.ProtocolVersion)
	}
	if _, ok := s.verifiers[req.Tee]; !ok {
		s.metrics.handshake(req.Tee, "bad_request")
		return badRequest("tee %q is not served by this broker; it verifies: %s", truncate(req.Tee, 32), strings.Join(s.tees(), ", "))
	}
	// Wait for a turn (admission) before the session exists, so that its
	// lifetime starts when its handshake can.
	var ss session
	if s.admit != nil {
		sl, err := s.admit.enter(r.Context(), source(r))
		if err != nil {
			s.metrics.handshake(req.Tee, "busy")
			return s.busy(err)
		}
		defer func() {
			if err != nil {
				s.admit.abandon(sl)
			} else {
				s.admit.begun(sl, ss.Nonce)
			}
		}()
	}
	var n [32]byte
	if _, err := rand.Read(n[:]); err != nil {
		return err
	}
	ss = session{Epoch: s.epoch, Tee: req.Tee, Nonce: base64.StdEncoding.EncodeToString(n[:]), Expires: s.now().Add(s.sessionTTL)}
	var extra json.RawMessage
	if c, ok := s.verifiers[req.Tee].(challenger); ok {
		if extra, err = c.Challenge(r.Context(), ss.Nonce, req.ExtraParams); err != nil {
			s.metrics.handshake(req.Tee, "rejected")
			s.deny(r.Context(), r, "evidence", err.Error(), "", req.Tee, false)
			return errorf(http.StatusUnauthorized, "%s auth parameters rejected: %v", req.Tee, err)
		}
	}
	if err := s.setSessionCookie(w, ss); err != nil {
		return err
	}
	s.metrics.handshake(req.Tee, "challenged")
	writeRawJSON(w, appendChallengeExtra(make([]byte, 0, 96+len(extra)), ss.Nonce, extra))
	return nil
}

func (s *Server) tees() []string {
	t := make([]string, 0, len(s.verifiers))
	for k := range s.verifiers {
		t = append(t, k)
	}
	slices.Sort(t)
	return t
}

func (s *Server) handleAttest(w http.ResponseWriter, r *http.Request, _ []string) (err error) {
	ctx := r.Context()
	ss, err := s.sessionFrom(r)
	if err != nil {
		s.metrics.handshake("", "no_session")
		return err
	}
	now := s.now()
	if !now.Before(ss.Expires) {
		s.metrics.handshake(ss.Tee, "expired")
		s.deny(ctx, r, "session", "session expired", "", ss.Tee, false)
		return startAgain("session expired at %s: start again at /kbs/v0/auth", ss.Expires.UTC().Format("15:04:05Z"))
	}
	if ss.Epoch != s.epoch && s.epoch != 0 {
		// The store keeps spent nonces in memory, and this session's
		// nonce was handed out before they were last forgotten: whether
		// it was answered since is unknown, so it never is again.
		s.metrics.handshake(ss.Tee, "restarted")
		s.deny(ctx, r, "session", "session began before the broker restarted", "", ss.Tee, false)
		return startAgain("session began before this broker restarted (it keeps spent nonces in memory, so it answers no earlier session): start again at /kbs/v0/auth")
	}
	if s.admit != nil {
		// A refused handshake is over.
		defer func() {
			if err != nil {
				s.admit.done(ss.Nonce, false)
			}
		}()
	}
	body, err := readBody(w, r, maxEvidenceBody, "attestation")
	if err != nil {
		s.metrics.handshake(ss.Tee, "bad_request")
		return err
	}
	at, err := decodeAttestation(body)
	if err != nil {
		s.metrics.handshake(ss.Tee, "bad_request")
		return err
	}
	if subtle.ConstantTimeCompare([]byte(at.RuntimeData.Nonce), []byte(ss.Nonce)) != 1 {
		s.metrics.handshake(ss.Tee, "bad_request")
		s.deny(ctx, r, "nonce", "runtime-data nonce is not the session's", "", ss.Tee, false)
		return errorf(http.StatusUnauthorized, "runtime-data nonce is not the nonce this session was given at /auth")
	}
	if err := checkTeePubKey(at.RuntimeData.TeePubKey); err != nil {
		s.metrics.handshake(ss.Tee, "bad_request")
		return badRequest("%v", err)
	}
	if len(at.TeeEvidence.Primary) == 0 || string(at.TeeEvidence.Primary) == "null" {
		s.metrics.handshake(ss.Tee, "bad_request")
		return badRequest("tee-evidence has no primary_evidence")
	}
	v, ok := s.verifiers[ss.Tee]
	if !ok {
		// The session was made by a broker with another configuration.
		s.metrics.handshake(ss.Tee, "bad_request")
		return badRequest("tee %q of this session is not served by this broker", truncate(ss.Tee, 32))
	}
	expected, err := attest.ReportData(ss.Nonce, at.RuntimeData.TeePubKey, at.TeeEvidence.Additional)
	if err != nil {
		s.metrics.handshake(ss.Tee, "bad_request")
		return badRequest("computing the report data this handshake must carry: %v", err)
	}
	// The nonce is spent before the (costly) evidence check: a replayed
	// body stops here on any broker sharing the store, and a failed
	// attempt cannot be retried on the same challenge.
	if err := s.store.UseNonce(ctx, ss.Nonce, ss.Expires); err != nil {
		if errors.Is(err, store.ErrReplay) {
			s.metrics.handshake(ss.Tee, "replay")
			s.deny(ctx, r, "replay", "nonce already used", "", ss.Tee, false)
			return startAgain("nonce already used: this challenge was answered before; start again at /kbs/v0/auth")
		}
		return storeErr("use nonce", err)
	}
	claims, err := verify(ctx, v, at.TeeEvidence.Primary, expected, ss.Nonce)
	if err != nil {
		if ctx.Err() != nil {
			return errorf(http.StatusServiceUnavailable, "evidence check interrupted: %v", ctx.Err())
		}
		s.metrics.handshake(ss.Tee, "rejected")
		s.deny(ctx, r, "evidence", err.Error(), "", ss.Tee, ss.Tee == attest.TeeSample)
		if !errors.Is(err, attest.ErrEvidence) {
			s.log.LogAttrs(ctx, slog.LevelError, "verifier error does not wrap attest.ErrEvidence",
				slog.String("tee", ss.Tee), slog.String("error", err.Error()))
		}
		return errorf(http.StatusUnauthorized, "%s evidence rejected: %v", ss.Tee, err)
	}
	if claims == nil || claims.Tee != ss.Tee {
		s.metrics.handshake(ss.Tee, "rejected")
		return errorf(http.StatusUnauthorized, "the %s verifier answered claims for another TEE", ss.Tee)
	}
	tok, exp, err := s.mintToken(claims, at.RuntimeData.TeePubKey)
	if err != nil {
		return err
	}
	if err := s.setSessionCookie(w, session{Epoch: ss.Epoch, Tee: ss.Tee, Nonce: ss.Nonce, Expires: exp, Token: tok}); err != nil {
		return err
	}
	s.metrics.handshake(ss.Tee, "ok")
	lvl, msg := slog.LevelInfo, "attested"
	if claims.Insecure {
		lvl, msg = slog.LevelWarn, "attested with insecure evidence (it proves nothing about the guest)"
	}
	s.log.LogAttrs(ctx, lvl, msg, slog.String("tee", ss.Tee), slog.Bool("insecure", claims.Insecure),
		slog.String("remote", r.RemoteAddr))
	writeRawJSON(w, appendAttestResponse(make([]byte, 0, len(tok)+16), tok))
	return nil
}

// mintToken issues the attestation token for verified claims.
func (s *Server) mintToken(c *attest.Claims, teePubKey json.RawMessage) (string, time.Time, error) {
	now := s.now()
	exp := now.Add(s.tokenTTL)
	values := c.Values
	if values == nil {
		values = map[string]string{}
	}
	teeClaims := appendStringMap(nil, values)
	rd := append(append([]byte(`{"tee-pubkey":`), teePubKey...), '}')
	status := earStatusAffirm
	if c.Insecure {
		status = earStatusWarning
	}
	tc := &tokenClaims{
		Profile:    earProfile,
		IssuedAt:   now.Unix(),
		NotBefore:  now.Unix(),
		Expires:    exp.Unix(),
		VerifierID: earVerifierID{Developer: "https://github.com/cwrun/cwrun", Build: "cwrun-kbs"},
		Submods: map[string]earSubmodT{earSubmod: {
			Status:   status,
			Evidence: map[string]json.RawMessage{c.Tee: teeClaims, runtimeDataKey: rd},
		}},
		Cwrun: cwrunClaims{Tee: c.Tee, Insecure: c.Insecure, Values: values},
	}
	tok, err := s.token.sign(tc)
	return tok, exp, err
}

// tokenFrom finds the request's attestation token: the bearer header
// (Trustee's clients) or the attested session cookie, whose nonce it
// also answers ("" for a bearer token).
func (s *Server) tokenFrom(r *http.Request) (c *tokenView, payload []byte, nonce string, err error) {
	tok, ok := bearer(r)
	sealed := false
	if !ok {
		ss, err := s.sessionFrom(r)
		if err != nil {
			return nil, nil, "", errorf(http.StatusUnauthorized, "no attestation token: send Authorization: Bearer <token> or the session cookie from /kbs/v0/attest")
		}
		if ss.Token == "" {
			return nil, nil, "", startAgain("session has not attested yet: POST /kbs/v0/attest first")
		}
		tok, sealed, nonce = ss.Token, true, ss.Nonce
	}
	// A token that arrived inside the session cookie was sealed by a
	// broker holding the cookie key right after that broker signed it:
	// the cookie's AEAD already proves its origin, so the ES256 check
	// (the costliest step of a fetch) is skipped for it.
	c, payload, err = s.token.check(tok, s.now(), !sealed)
	if err != nil {
		s.deny(r.Context(), r, "token", err.Error(), "", "", false)
		return nil, nil, nonce, startAgain("attestation token refused: %v", err)
	}
	return c, payload, nonce, nil
}

// handshakeOver tells admission that the handshake of a session's
// nonce ended, with a resource sent or refused.
func (s *Server) handshakeOver(nonce string, err error) {
	if s.admit != nil && nonce != "" {
		s.admit.done(nonce, err == nil)
	}
}

// handleResource serves GET (a guest fetching) and POST (an admin
// setting, Trustee's admin call).
func (s *Server) handleResource(w http.ResponseWriter, r *http.Request, p []string) (err error) {
	if r.Method == http.MethodPost {
		return s.adminOnly(s.handleSetResource)(w, r, p)
	}
	if err := checkResourcePath(p); err != nil {
		return err
	}
	c, payload, nonce, err := s.tokenFrom(r)
	defer func() { s.handshakeOver(nonce, err) }()
	if err != nil {
		return err
	}
	rp := strings.Join(p, "/")
	var plaintext []byte
	if p[0] == passphraseRepo && p[2] == passphraseTag {
		plaintext, err = s.releasePassphrase(r, c, payload, p[1], rp)
	} else {
		plaintext, err = s.releaseResource(r, c, payload, rp)
	}
	if err != nil {
		return err
	}
	return s.writeSealed(w, c, plaintext)
}

// handleKey is krun's key fetch: GET|POST /kbs/v0/key/<workload id>.
// krun's own attestation flow (a pre-0.4.0 protocol with an RSA key
// whose digest the SNP report carries) is not served; the key goes to a
// guest that did Trustee's handshake, under the same appraisal as
// /resource/cwrun/<id>/passphrase, encrypted to its TEE key as a JWE.
func (s *Server) handleKey(w http.ResponseWriter, r *http.Request, p []string) (err error) {
	id := p[0]
	if err := checkWorkloadID(id); err != nil {
		return err
	}
	c, payload, nonce, err := s.tokenFrom(r)
	defer func() { s.handshakeOver(nonce, err) }()
	if err != nil {
		return err
	}
	plaintext, err := s.releasePassphrase(r, c, payload, id, PassphrasePath(id))
	if err != nil {
		return err
	}
	return s.writeSealed(w, c, plaintext)
}

// writeSealed answers plaintext encrypted to the token's TEE key.
func (s *Server) writeSealed(w http.ResponseWriter, c *tokenView, plaintext []byte) error {
	defer clear(plaintext)
	pub, err := c.teePubKey()
	if err != nil {
		return errorf(http.StatusUnauthorized, "attestation token refused: %v", err)
	}
	jwe, err := attest.EncryptResource(pub, plaintext)
	if err != nil {
		// The key passed checkTeePubKey at /attest; a refusal here means
		// the two disagree, and the guest should hear why.
		return badRequest("encrypting to the token's tee-pubkey: %v", err)
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(jwe)
	return nil
}

// The passphrase of workload W is the resource cwrun/W/passphrase.
const (
	passphraseRepo = "cwrun"
	passphraseTag  = "passphrase"
)

func (s *Server) releasePassphrase(r *http.Request, c *tokenView, payload []byte, id, rp string) ([]byte, error) {
	ctx := r.Context()
	wl, err := s.workload(ctx, id)
	if errors.Is(err, store.ErrNotFound) {
		s.deny(ctx, r, "workload", "no workload "+id+" registered", id, c.Cwrun.Tee, c.Cwrun.Insecure)
		return nil, errorf(http.StatusNotFound, "no workload %s registered", id)
	}
	if err != nil {
		return nil, storeErr("read workload", err)
	}
	if err := s.appraiseWorkload(ctx, &wl, c, payload, rp, r.URL.Query()); err != nil {
		s.denyErr(ctx, r, err, id, c)
		return nil, err
	}
	if len(wl.SealedPassphrase) == 0 {
		return nil, errorf(http.StatusNotFound, "workload %s has no passphrase registered", id)
	}
	pt, err := s.openAtRest(passphraseAAD(id), wl.SealedPassphrase)
	if err != nil {
		return nil, err
	}
	s.log.LogAttrs(ctx, slog.LevelInfo, "released", slog.String("workload", id), slog.String("resource", rp),
		slog.String("tee", c.Cwrun.Tee), slog.Bool("insecure", c.Cwrun.Insecure), slog.String("remote", r.RemoteAddr))
	return pt, nil
}

func (s *Server) releaseResource(r *http.Request, c *tokenView, payload []byte, rp string) ([]byte, error) {
	ctx := r.Context()
	// Appraise before looking the resource up, so that a guest the rules
	// refuse cannot learn which resources exist.
	if err := s.appraiseGeneric(ctx, c, payload, rp, r.URL.Query()); err != nil {
		s.denyErr(ctx, r, err, "", c)
		return nil, err
	}
	sealed, err := s.store.Resource(ctx, rp)
	if errors.Is(err, store.ErrNotFound) {
		return nil, errorf(http.StatusNotFound, "no resource %s", rp)
	}
	if err != nil {
		return nil, storeErr("read resource", err)
	}
	pt, err := s.openAtRest(resourceAAD(rp), sealed)
	if err != nil {
		return nil, err
	}
	s.log.LogAttrs(ctx, slog.LevelInfo, "released", slog.String("resource", rp),
		slog.String("tee", c.Cwrun.Tee), slog.Bool("insecure", c.Cwrun.Insecure), slog.String("remote", r.RemoteAddr))
	return pt, nil
}

// deny logs one refusal and counts it by check. It never logs evidence
// values beyond what the denial message says, and never a secret.
func (s *Server) deny(ctx context.Context, r *http.Request, check, reason, workload, tee string, insecure bool) {
	s.metrics.denials.WithLabelValues(check).Inc()
	attrs := []slog.Attr{
		slog.String("check", check),
		slog.String("reason", reason),
		slog.String("tee", tee),
		slog.String("remote", r.RemoteAddr),
	}
	if workload != "" {
		attrs = append(attrs, slog.String("workload", workload))
	}
	if insecure {
		attrs = append(attrs, slog.Bool("insecure", true))
	}
	s.log.LogAttrs(ctx, slog.LevelWarn, "denied", attrs...)
}

func (s *Server) denyErr(ctx context.Context, r *http.Request, err error, workload string, c *tokenView) {
	var ae *apiError
	if !errors.As(err, &ae) || ae.check == "" {
		return
	}
	s.metrics.denials.WithLabelValues(ae.check).Inc()
	attrs := []slog.Attr{
		slog.String("check", ae.check),
		slog.String("reason", ae.msg),
		slog.String("tee", c.Cwrun.Tee),
		slog.String("remote", r.RemoteAddr),
	}
	if workload != "" {
		attrs = append(attrs, slog.String("workload", workload))
	}
	if c.Cwrun.Insecure {
		attrs = append(attrs, slog.Bool("insecure", true))
	}
	s.log.LogAttrs(ctx, slog.LevelWarn, "denied", attrs...)
}

// checkResourcePath validates repo/type/tag segments: plain names only,
// so that a path can never climb out of its place in a store or a log.
func checkResourcePath(p []string) error {
	if len(p) != 3 {
		return badRequest("resource path must be repo/type/tag")
	}
	for _, seg := range p {
		if err := checkName(seg); err != nil {
			return badRequest("resource path segment %q: %v", truncate(seg, 32), err)
		}
	}
	return nil
}

func checkName(seg string) error {
	if seg == "" || len(seg) > 128 {
		return errors.New("must be 1 to 128 characters")
	}
	if seg == "." || seg == ".." {
		return errors.New("must not be . or ..")
	}
	for i := 0; i < len(seg); i++ {
		c := seg[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return fmt.Errorf("character %q not allowed (use letters, digits, . _ -)", c)
		}
	}
	return nil
}

// checkWorkloadID enforces [A-Za-z0-9][A-Za-z0-9._-]{0,127}.
func checkWorkloadID(id string) error {
	if err := checkName(id); err != nil {
		return badRequest("workload id %q: %v", truncate(id, 32), err)
	}
	c := id[0]
	if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9') {
		return badRequest("workload id %q must start with a letter or digit", truncate(id, 32))
	}
	return nil
}
