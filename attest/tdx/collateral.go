package tdx

import (
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/cwrun/cwrun/attest/internal/atomicfile"
	"github.com/google/go-tdx-guest/pcs"
	"github.com/google/go-tdx-guest/verify/trust"
)

// Collateral is Intel PCS's TCB info (per FMSPC) and TDX QE identity,
// both signed by Intel's TCB signing key. go-tdx-guest fetches and
// checks them through an HTTPS getter; collateralSource is that getter,
// answering from a folder, a memory cache, and only then from PCS.
//
// The folder holds the responses' bodies as PCS sends them and the
// issuer chain PCS sends in a header:
//
//	tcbinfo-<fmspc>.json  body of /tdx/certification/v4/tcb?fmspc=<fmspc>
//	qeidentity.json       body of /tdx/certification/v4/qe/identity
//	tcb-signing-chain.pem the Tcb-Info-Issuer-Chain header, URL-decoded:
//	                      Intel SGX TCB Signing, then Intel SGX Root CA

const (
	qeIdentityFile = "qeidentity.json"
	signingChain   = "tcb-signing-chain.pem"
	tcbInfoHeader  = "Tcb-Info-Issuer-Chain"
	qeIDHeader     = "Sgx-Enclave-Identity-Issuer-Chain"
)

type collateralSource struct {
	dir    string
	getter trust.HTTPSGetter // PCS; nil: never asked
	now    func() time.Time
	log    *slog.Logger

	mu    sync.Mutex
	cache map[string]cachedResponse
}

type cachedResponse struct {
	header     map[string][]string
	body       []byte
	nextUpdate time.Time
}

// files names what url is kept as, and which header carries its chain.
func (c *collateralSource) files(u string) (name, header string, err error) {
	if u == pcs.QeIdentityURL() {
		return qeIdentityFile, qeIDHeader, nil
	}
	if prefix := pcs.TcbInfoURL(""); strings.HasPrefix(u, prefix) {
		fmspc := strings.ToLower(strings.TrimPrefix(u, prefix))
		if len(fmspc) != 12 || strings.Trim(fmspc, "0123456789abcdef") != "" {
			return "", "", fmt.Errorf("FMSPC %q is not 6 bytes of hex", fmspc)
		}
		return "tcbinfo-" + fmspc + ".json", tcbInfoHeader, nil
	}
	return "", "", fmt.Errorf("collateral %s is not served (revocation lists are not checked)", u)
}

// Get answers go-tdx-guest's collateral requests.
func (c *collateralSource) Get(u string) (map[string][]string, []byte, error) {
	name, header, err := c.files(u)
	if err != nil {
		return nil, nil, err
	}
	now := c.now()
	c.mu.Lock()
	defer c.mu.Unlock()
	if r, ok := c.cache[u]; ok && now.Before(r.nextUpdate) {
		return r.header, r.body, nil
	}
	var stale error
	if c.dir != "" {
		r, err := c.readDir(name, header)
		switch {
		case err == nil && now.Before(r.nextUpdate):
			c.cache[u] = r
			return r.header, r.body, nil
		case err == nil:
			stale = fmt.Errorf("%s is out of date (next update was due %s)", filepath.Join(c.dir, name), r.nextUpdate.Format(time.RFC3339))
		case !errors.Is(err, os.ErrNotExist):
			return nil, nil, err
		}
	}
	if c.getter == nil {
		if stale != nil {
			return nil, nil, fmt.Errorf("%v, and Intel PCS is not configured: fetch a current copy or let the broker ask PCS", stale)
		}
		where := "no collateral folder"
		if c.dir != "" {
			where = "no " + filepath.Join(c.dir, name)
		}
		return nil, nil, fmt.Errorf("%s and Intel PCS is not configured: put the PCS response for %s there (and %s) or let the broker ask PCS", where, u, signingChain)
	}
	h, body, err := c.getter.Get(u)
	if err != nil {
		return nil, nil, fmt.Errorf("Intel PCS: %s: %w", u, err)
	}
	r, err := response(header, h, body)
	if err != nil {
		return nil, nil, fmt.Errorf("Intel PCS: %s: %w", u, err)
	}
	c.cache[u] = r
	if c.dir != "" {
		chain, _ := url.QueryUnescape(r.header[header][0])
		for file, data := range map[string][]byte{name: body, signingChain: []byte(chain)} {
			if err := atomicfile.Write(filepath.Join(c.dir, file), data, 0o644); err != nil {
				c.log.Warn("could not keep TDX collateral in its folder; PCS will be asked again", "file", file, "err", err)
			}
		}
	}
	return r.header, r.body, nil
}

func (c *collateralSource) readDir(name, header string) (cachedResponse, error) {
	body, err := os.ReadFile(filepath.Join(c.dir, name))
	if err != nil {
		return cachedResponse{}, err
	}
	chain, err := os.ReadFile(filepath.Join(c.dir, signingChain))
	if err != nil {
		return cachedResponse{}, fmt.Errorf("%s is there but not its issuer chain: %w", name, err)
	}
	if block, _ := pem.Decode(chain); block == nil {
		return cachedResponse{}, fmt.Errorf("%s holds no PEM certificate", filepath.Join(c.dir, signingChain))
	}
	return response(header, map[string][]string{header: {url.QueryEscape(string(chain))}}, body)
}

// response keeps what go-tdx-guest reads of a PCS response, learning
// when it expires.
func response(header string, h map[string][]string, body []byte) (cachedResponse, error) {
	if len(h[header]) != 1 {
		return cachedResponse{}, fmt.Errorf("the response has no %s header", header)
	}
	var doc map[string]json.RawMessage
	if err := json.Unmarshal(body, &doc); err != nil {
		return cachedResponse{}, fmt.Errorf("not a PCS collateral document: %w", err)
	}
	var next time.Time
	for _, key := range []string{"tcbInfo", "enclaveIdentity"} {
		var v struct {
			NextUpdate time.Time `json:"nextUpdate"`
		}
		if raw, ok := doc[key]; ok && json.Unmarshal(raw, &v) == nil {
			next = v.NextUpdate
		}
	}
	if next.IsZero() {
		return cachedResponse{}, errors.New("not a PCS collateral document: no tcbInfo or enclaveIdentity with a nextUpdate")
	}
	return cachedResponse{header: map[string][]string{header: h[header]}, body: body, nextUpdate: next}, nil
}
