package kbs

import (
	"bytes"
	"context"
	"crypto"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/cwrun/cwrun/attest/kbs/store"
)

// Errors an AdminClient call may wrap, by the broker's status code.
var (
	ErrNotFound     = store.ErrNotFound            // 404
	ErrExists       = store.ErrExists              // 409
	ErrUnauthorized = errors.New("not authorized") // 401, 403
)

// APIError is a broker's refusal: its status and its {"error": ...}.
type APIError struct {
	Status  int
	Message string
}

func (e *APIError) Error() string {
	return fmt.Sprintf("kbs: %d %s: %s", e.Status, http.StatusText(e.Status), e.Message)
}

// Unwrap lets errors.Is match ErrNotFound, ErrExists and
// ErrUnauthorized.
func (e *APIError) Unwrap() error {
	switch e.Status {
	case http.StatusNotFound:
		return ErrNotFound
	case http.StatusConflict:
		return ErrExists
	case http.StatusUnauthorized, http.StatusForbidden:
		return ErrUnauthorized
	}
	return nil
}

// AdminClient calls a broker's admin API. Each call carries a fresh
// admin token signed by Key and valid for TokenTTL.
type AdminClient struct {
	BaseURL string        // the broker's root, e.g. "https://kbs:8443"
	HTTP    *http.Client  // nil: http.DefaultClient
	Key     crypto.Signer // Ed25519 or ECDSA P-256; its public key is in the broker's AdminKeys
	// TokenTTL is each token's lifetime; default one minute.
	TokenTTL time.Duration
}

// AddWorkload registers a new workload; ErrExists if its id is taken.
func (c *AdminClient) AddWorkload(ctx context.Context, spec WorkloadSpec) (WorkloadInfo, error) {
	var info WorkloadInfo
	err := c.doJSON(ctx, http.MethodPost, "/kbs/v0/admin/workloads", spec, &info)
	return info, err
}

// ReplaceWorkload replaces workload spec.ID, keeping its creation time
// and, when spec.Passphrase is empty, its passphrase.
func (c *AdminClient) ReplaceWorkload(ctx context.Context, spec WorkloadSpec) (WorkloadInfo, error) {
	var info WorkloadInfo
	if err := checkClientID(spec.ID); err != nil {
		return info, err
	}
	err := c.doJSON(ctx, http.MethodPut, "/kbs/v0/admin/workloads/"+spec.ID, spec, &info)
	return info, err
}

// Workloads lists the registered workloads.
func (c *AdminClient) Workloads(ctx context.Context) ([]WorkloadInfo, error) {
	var out []WorkloadInfo
	err := c.doJSON(ctx, http.MethodGet, "/kbs/v0/admin/workloads", nil, &out)
	return out, err
}

// Workload reads one workload; ErrNotFound if none.
func (c *AdminClient) Workload(ctx context.Context, id string) (WorkloadInfo, error) {
	var info WorkloadInfo
	if err := checkClientID(id); err != nil {
		return info, err
	}
	err := c.doJSON(ctx, http.MethodGet, "/kbs/v0/admin/workloads/"+id, nil, &info)
	return info, err
}

// DeleteWorkload removes a workload and its passphrase.
func (c *AdminClient) DeleteWorkload(ctx context.Context, id string) error {
	if err := checkClientID(id); err != nil {
		return err
	}
	return c.doJSON(ctx, http.MethodDelete, "/kbs/v0/admin/workloads/"+id, nil, nil)
}

// SetResource stores data at path "repo/type/tag".
func (c *AdminClient) SetResource(ctx context.Context, path string, data []byte) error {
	p, err := clientResourcePath(path)
	if err != nil {
		return err
	}
	_, err = c.do(ctx, http.MethodPost, "/kbs/v0/resource/"+p, "application/octet-stream", data)
	return err
}

// Resource reads the resource at path "repo/type/tag".
func (c *AdminClient) Resource(ctx context.Context, path string) ([]byte, error) {
	p, err := clientResourcePath(path)
	if err != nil {
		return nil, err
	}
	return c.do(ctx, http.MethodGet, "/kbs/v0/admin/resource/"+p, "", nil)
}

// ResourcePaths lists the stored resources' paths, sorted.
func (c *AdminClient) ResourcePaths(ctx context.Context) ([]string, error) {
	var out []string
	err := c.doJSON(ctx, http.MethodGet, "/kbs/v0/admin/resources", nil, &out)
	return out, err
}

// DeleteResource removes the resource at path "repo/type/tag".
func (c *AdminClient) DeleteResource(ctx context.Context, path string) error {
	p, err := clientResourcePath(path)
	if err != nil {
		return err
	}
	_, err = c.do(ctx, http.MethodDelete, "/kbs/v0/admin/resource/"+p, "", nil)
	return err
}

// SetResourcePolicy sets the broker-wide Rego resource policy; "" clears
// it (the default then applies: secure TEEs only).
func (c *AdminClient) SetResourcePolicy(ctx context.Context, rego string) error {
	return c.doJSON(ctx, http.MethodPost, "/kbs/v0/resource-policy",
		policyBody{Policy: base64.RawURLEncoding.EncodeToString([]byte(rego))}, nil)
}

// ResourcePolicy reads the broker-wide resource policy; "" when none is
// set.
func (c *AdminClient) ResourcePolicy(ctx context.Context) (string, error) {
	var pb policyBody
	if err := c.doJSON(ctx, http.MethodGet, "/kbs/v0/resource-policy", nil, &pb); err != nil {
		return "", err
	}
	text, err := decodeB64URL(pb.Policy)
	if err != nil {
		return "", fmt.Errorf("kbs: broker answered a resource policy that is not base64url: %w", err)
	}
	return text, nil
}

func checkClientID(id string) error {
	if err := checkWorkloadID(id); err != nil {
		return fmt.Errorf("kbs: %w", err)
	}
	return nil
}

func clientResourcePath(path string) (string, error) {
	segs := strings.Split(strings.Trim(path, "/"), "/")
	if err := checkResourcePath(segs); err != nil {
		return "", fmt.Errorf("kbs: resource %q: %w", path, err)
	}
	return strings.Join(segs, "/"), nil
}

// Reseal has the broker re-seal every stored passphrase and resource
// under its current at-rest key (after a secrets key rotation).
func (c *AdminClient) Reseal(ctx context.Context) (ResealReport, error) {
	var rep ResealReport
	err := c.doJSON(ctx, http.MethodPost, "/kbs/v0/admin/reseal", nil, &rep)
	return rep, err
}

func (c *AdminClient) doJSON(ctx context.Context, method, path string, in, out any) error {
	var body []byte
	ct := ""
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body, ct = b, "application/json"
	}
	resp, err := c.do(ctx, method, path, ct, body)
	if err != nil {
		return err
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(resp, out); err != nil {
		return fmt.Errorf("kbs: %s %s: answer is not the expected JSON: %w", method, path, err)
	}
	return nil
}

// maxAdminAnswer bounds what the client reads back.
const maxAdminAnswer = 16 << 20

func (c *AdminClient) do(ctx context.Context, method, path, ct string, body []byte) ([]byte, error) {
	if c.Key == nil {
		return nil, errors.New("kbs: AdminClient has no Key to sign admin tokens with")
	}
	base, err := url.Parse(strings.TrimRight(c.BaseURL, "/"))
	if err != nil || base.Scheme == "" || base.Host == "" {
		return nil, fmt.Errorf("kbs: broker URL %q is not an absolute http(s) URL", c.BaseURL)
	}
	ttl := c.TokenTTL
	if ttl <= 0 {
		ttl = time.Minute
	}
	tok, err := MintAdminToken(c.Key, ttl)
	if err != nil {
		return nil, err
	}
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, base.String()+path, rd)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+tok)
	if ct != "" {
		req.Header.Set("Content-Type", ct)
	}
	hc := c.HTTP
	if hc == nil {
		hc = http.DefaultClient
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("kbs: %s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxAdminAnswer))
	if err != nil {
		return nil, fmt.Errorf("kbs: %s %s: reading the answer: %w", method, path, err)
	}
	if resp.StatusCode/100 != 2 {
		var eb errorBody
		msg := strings.TrimSpace(string(b))
		if json.Unmarshal(b, &eb) == nil && eb.Error != "" {
			msg = eb.Error
		}
		return nil, &APIError{Status: resp.StatusCode, Message: truncate(msg, 1024)}
	}
	return b, nil
}
