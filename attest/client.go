package attest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"unicode"

	"github.com/cwrun/cwrun/attest/internal/jsonx"
)

// SessionCookie is the cookie a KBS ties a handshake to.
const SessionCookie = "kbs-session-id"

// HashSHA384 is the one runtime-data hash this client binds with.
const HashSHA384 = "sha384"

// maxErrorBody bounds how much of a failed answer is read for its reason.
const maxErrorBody = 4 << 10

// Client runs the RCAR handshake against a KBS and fetches resources.
// It assumes nothing about the network: HTTP may dial a virtio-serial
// port relayed by an untrusted host, which is why everything it reads
// is bounded and what it fetches is sealed to a key of this handshake.
type Client struct {
	// BaseURL is the broker's root, e.g. "https://kbs:8443" (the client
	// adds /kbs/v0).
	BaseURL  string
	HTTP     *http.Client // nil: http.DefaultClient
	Attester Attester
}

// BrokerError is a refusal by the broker: an answer other than 200 at
// one step of the handshake.
type BrokerError struct {
	Step   string // "auth", "attest" or "resource"
	Path   string // the resource, for Step "resource"
	Status int    // the HTTP status
	// Reason is the broker's explanation: the "error" member of its JSON
	// answer (cwrun's broker), "detail" (Trustee's ErrorInformation), or
	// the start of the body, stripped of control characters.
	Reason string
	// StartAgain: the broker says a fresh handshake may succeed (its
	// session or token went stale: an expiry, a restart, a rotated
	// key). A denial never carries it.
	StartAgain bool
}

func (e *BrokerError) Error() string {
	var what string
	switch e.Step {
	case "auth":
		what = "broker refused the handshake"
	case "attest":
		what = "broker rejected the evidence"
	case "resource":
		what = fmt.Sprintf("broker denied resource %s", e.Path)
	default:
		what = "broker refused " + e.Step
	}
	if e.Status == http.StatusNotFound && e.Step == "resource" {
		what = fmt.Sprintf("broker has no resource %s", e.Path)
	}
	reason := e.Reason
	if reason == "" {
		reason = "no reason given"
	}
	return fmt.Sprintf("%s (%d): %s", what, e.Status, reason)
}

// Resource runs auth → attest → GET /resource/<path> and returns the
// decrypted resource. path is "repo/type/tag".
func (c *Client) Resource(ctx context.Context, path string) ([]byte, error) {
	if c.Attester == nil {
		return nil, errors.New("kbs client: no Attester")
	}
	resURL, err := c.resourceURL(path)
	if err != nil {
		return nil, err
	}
	s := &session{client: c.HTTP, cookies: map[string]*http.Cookie{}}
	if s.client == nil {
		s.client = http.DefaultClient
	}

	// 1. auth
	extra := map[string]json.RawMessage{"supported-hash-algorithms": json.RawMessage(`["` + HashSHA384 + `"]`)}
	if ap, ok := c.Attester.(AuthParamser); ok {
		more, err := ap.AuthParams(ctx)
		if err != nil {
			return nil, fmt.Errorf("%s auth parameters: %w", c.Attester.Tee(), err)
		}
		for k, v := range more {
			if _, taken := extra[k]; !taken {
				extra[k] = v
			}
		}
	}
	extraJSON, err := json.Marshal(extra)
	if err != nil {
		return nil, fmt.Errorf("%s auth parameters: %w", c.Attester.Tee(), err)
	}
	req, _ := json.Marshal(Request{
		Version:     ProtocolVersion,
		Tee:         c.Attester.Tee(),
		ExtraParams: extraJSON,
	})
	body, err := s.do(ctx, "auth", "", http.MethodPost, c.endpoint("auth"), req, MaxChallengeSize)
	if err != nil {
		return nil, err
	}
	if s.cookies[SessionCookie] == nil {
		return nil, fmt.Errorf("kbs auth at %s: the broker set no %s cookie", c.BaseURL, SessionCookie)
	}
	ch, err := ParseChallenge(body)
	if err != nil {
		return nil, fmt.Errorf("kbs auth at %s: %w", c.BaseURL, err)
	}
	if err := checkSelectedHash(ch.ExtraParams); err != nil {
		return nil, fmt.Errorf("kbs auth at %s: %w", c.BaseURL, err)
	}
	if ct, ok := c.Attester.(ChallengeTaker); ok {
		if err := ct.TakeChallenge(ctx, ch.ExtraParams); err != nil {
			return nil, fmt.Errorf("answering the broker's %s challenge: %w", c.Attester.Tee(), err)
		}
	}

	// 2. attest
	key, err := NewTeeKey()
	if err != nil {
		return nil, err
	}
	rd, err := ReportData(ch.Nonce, key.JWK, "")
	if err != nil {
		return nil, err
	}
	evidence, err := c.Attester.Evidence(ctx, rd)
	if err != nil {
		return nil, fmt.Errorf("getting %s evidence: %w", c.Attester.Tee(), err)
	}
	att, err := appendAttestation(nil, ch.Nonce, key.JWK, evidence)
	if err != nil {
		return nil, fmt.Errorf("encoding the attestation (is the %s evidence JSON?): %w", c.Attester.Tee(), err)
	}
	body, err = s.do(ctx, "attest", "", http.MethodPost, c.endpoint("attest"), att, MaxAttestResponse)
	if err != nil {
		return nil, err
	}
	ar, err := parseAttestResponse(body)
	if err != nil {
		return nil, fmt.Errorf("kbs attest at %s: %w", c.BaseURL, err)
	}
	if ar.Token == "" {
		return nil, fmt.Errorf("kbs attest at %s: the broker answered without a token", c.BaseURL)
	}

	// 3. resource
	jwe, err := s.do(ctx, "resource", path, http.MethodGet, resURL, nil, MaxResourceJWE)
	if err != nil {
		return nil, err
	}
	plain, err := DecryptResource(key, jwe)
	if err != nil {
		return nil, fmt.Errorf("resource %s: %w", path, err)
	}
	return plain, nil
}

// parseAttestResponse reads the answer to /attest: an object whose
// "token" (exact name) is a string; other members are ignored. The
// token is kilobytes of base64, which this reads without reflection.
func parseAttestResponse(b []byte) (AttestResponse, error) {
	var ar AttestResponse
	if len(b) > MaxAttestResponse {
		return ar, fmt.Errorf("attest response: %d bytes, more than %d", len(b), MaxAttestResponse)
	}
	r := jsonx.NewReader(b)
	err := r.Object(func(name string) error {
		if name != "token" {
			return r.Skip()
		}
		if r.Null() {
			ar.Token = ""
			return nil
		}
		tok, err := r.String()
		ar.Token = tok
		return err
	})
	if err == nil {
		err = r.End()
	}
	if err != nil {
		return ar, fmt.Errorf("attest response: %w", err)
	}
	return ar, nil
}

// appendAttestation writes the body of POST /attest, as
// json.Marshal(Attestation{...}) would but without re-encoding the
// evidence (tens of KiB for SNP): it is checked to be one JSON value
// and copied as it is.
func appendAttestation(dst []byte, nonce string, teePubKey, evidence json.RawMessage) ([]byte, error) {
	for _, v := range []struct {
		what string
		raw  json.RawMessage
	}{{"tee-pubkey", teePubKey}, {"evidence", evidence}} {
		if !jsonx.Valid(v.raw) {
			return nil, fmt.Errorf("%s is not one JSON value", v.what)
		}
	}
	dst = slices.Grow(dst, 96+len(nonce)+len(teePubKey)+len(evidence))
	dst = append(dst, `{"runtime-data":{"nonce":`...)
	dst = jsonx.AppendString(dst, nonce)
	dst = append(dst, `,"tee-pubkey":`...)
	dst = append(dst, bytes.TrimSpace(teePubKey)...)
	dst = append(dst, `},"tee-evidence":{"primary_evidence":`...)
	dst = append(dst, bytes.TrimSpace(evidence)...)
	return append(dst, `,"additional_evidence":""}}`...), nil
}

func (c *Client) endpoint(p string) string {
	return strings.TrimRight(c.BaseURL, "/") + "/kbs/v0/" + p
}

// resourceURL checks path is repo/type/tag and escapes each part, so a
// path can never reach another endpoint.
func (c *Client) resourceURL(path string) (string, error) {
	parts := strings.Split(path, "/")
	if len(parts) != 3 {
		return "", fmt.Errorf("resource path %q: want repo/type/tag", path)
	}
	for i, p := range parts {
		if p == "" || p == "." || p == ".." {
			return "", fmt.Errorf("resource path %q: part %d is %q; want repo/type/tag with non-empty names", path, i+1, p)
		}
		parts[i] = url.PathEscape(p)
	}
	if _, err := url.Parse(c.BaseURL); err != nil || c.BaseURL == "" {
		return "", fmt.Errorf("kbs client: base URL %q is not a URL", c.BaseURL)
	}
	return c.endpoint("resource/" + strings.Join(parts, "/")), nil
}

// checkSelectedHash refuses a challenge that asks for a hash other than
// SHA-384 (Trustee answers "" or an object with
// "selected-hash-algorithm").
func checkSelectedHash(extra json.RawMessage) error {
	var obj map[string]json.RawMessage
	if t := bytes.TrimSpace(extra); len(t) == 0 || t[0] != '{' {
		return nil
	}
	if err := json.Unmarshal(extra, &obj); err != nil {
		return fmt.Errorf("challenge extra-params: %w", err)
	}
	raw, ok := obj["selected-hash-algorithm"]
	if !ok {
		return nil
	}
	var alg string
	if err := json.Unmarshal(raw, &alg); err != nil {
		return fmt.Errorf("challenge extra-params: selected-hash-algorithm is not a string: %s", preview(raw))
	}
	if !strings.EqualFold(alg, HashSHA384) {
		return fmt.Errorf("the broker selected hash algorithm %q; this client binds report data with %s only", clean(alg, 40), HashSHA384)
	}
	return nil
}

// session is one handshake's HTTP state: the client and the cookies the
// broker set. Cookies live only as long as the handshake and go only to
// this broker, whatever their Domain or Secure attributes say: the
// session id is bound to the evidence, not to the transport.
type session struct {
	client  *http.Client
	cookies map[string]*http.Cookie
}

// do sends one request and returns the body of a 200 answer, read up to
// limit bytes; any other status becomes a *BrokerError.
func (s *session) do(ctx context.Context, step, path, method, u string, body []byte, limit int64) ([]byte, error) {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, u, rd)
	if err != nil {
		return nil, fmt.Errorf("kbs %s: %w", step, err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Accept", "application/json")
	for _, ck := range s.cookies {
		req.AddCookie(&http.Cookie{Name: ck.Name, Value: ck.Value})
	}
	resp, err := s.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("kbs %s: %w", step, err)
	}
	defer resp.Body.Close()
	for _, ck := range resp.Cookies() {
		if ck.MaxAge < 0 {
			delete(s.cookies, ck.Name)
		} else {
			s.cookies[ck.Name] = ck
		}
	}
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
		return nil, &BrokerError{Step: step, Path: path, Status: resp.StatusCode, Reason: reason(b), StartAgain: startAgain(b)}
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, limit+1))
	if err != nil {
		return nil, fmt.Errorf("kbs %s: reading the answer: %w", step, err)
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("kbs %s: the broker's answer exceeds %d bytes", step, limit)
	}
	return b, nil
}

// startAgain reads cwrun's broker's start_again flag from an error body.
func startAgain(b []byte) bool {
	var e struct {
		StartAgain bool `json:"start_again"`
	}
	return json.Unmarshal(b, &e) == nil && e.StartAgain
}

// reason extracts a broker's explanation from an error body.
func reason(b []byte) string {
	var e struct {
		Error  any    `json:"error"`
		Detail string `json:"detail"`
		Type   string `json:"type"`
	}
	if json.Unmarshal(b, &e) == nil {
		switch v := e.Error.(type) {
		case string:
			if v != "" {
				return clean(v, 512)
			}
		case nil:
		default:
			if j, err := json.Marshal(v); err == nil {
				return clean(string(j), 512)
			}
		}
		if e.Detail != "" {
			return clean(e.Detail, 512)
		}
		if e.Type != "" {
			return clean(e.Type, 512)
		}
	}
	return clean(string(b), 200)
}

// clean makes untrusted text safe for a console: control and format
// characters (escapes, bidi overrides) become spaces, and it is cut at
// max runes.
func clean(s string, max int) string {
	var b strings.Builder
	n := 0
	for _, r := range strings.TrimSpace(s) {
		if n == max {
			b.WriteString("…")
			break
		}
		if unicode.In(r, unicode.Cc, unicode.Cf) || r == unicode.ReplacementChar {
			r = ' '
		}
		b.WriteRune(r)
		n++
	}
	return b.String()
}
