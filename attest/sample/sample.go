// Package sample is the TEE that proves nothing: its "evidence" is the
// report data in plain JSON, as Trustee's sample attester and verifier
// have it. It lets the whole key-release path run on any machine for
// development and tests. Claims from it are marked Insecure, and it
// must never be the reason a production secret is released.
//
// The package stays small and free of cgo so the static guest can
// carry it: never import policy engines, metrics or databases here.
package sample

import (
	"bytes"
	"context"
	"crypto/sha512"
	"encoding/base64"
	"encoding/json"
	"fmt"

	"github.com/cwrun/cwrun/attest"
)

// SVN is the security version the sample attester reports, as
// Trustee's does.
const SVN = "1"

// carried is how many bytes of report data sample evidence carries:
// Trustee's guest hands its sample attester the bare SHA-384 digest
// (48 bytes) and Trustee's sample verifier compares exactly that, so a
// cwrun guest sends the same to stay acceptable to a Trustee KBS.
const carried = sha512.Size384

// maxEvidence bounds what Verify parses; real sample evidence is about
// 100 bytes.
const maxEvidence = 4 << 10

// Evidence is the sample TEE's primary evidence.
type Evidence struct {
	SVN        string `json:"svn"`
	ReportData string `json:"report_data"` // base64 std
}

type attester struct{}

// NewAttester returns the sample Attester.
func NewAttester() attest.Attester { return attester{} }

func (attester) Tee() string { return attest.TeeSample }

// Evidence returns {"svn":"1","report_data":"<base64 of the first 48
// bytes of reportData>"}. Only the padding is dropped when reportData
// comes from attest.ReportData.
func (attester) Evidence(ctx context.Context, reportData []byte) (json.RawMessage, error) {
	if len(reportData) < carried {
		return nil, fmt.Errorf("sample attester: report data of %d bytes, want at least %d", len(reportData), carried)
	}
	b, err := json.Marshal(Evidence{SVN: SVN, ReportData: base64.StdEncoding.EncodeToString(reportData[:carried])})
	if err != nil {
		return nil, fmt.Errorf("sample attester: %w", err)
	}
	return b, nil
}

type verifier struct{}

// NewVerifier returns the sample Verifier. Its claims are always
// Insecure.
func NewVerifier() attest.Verifier { return verifier{} }

func (verifier) Tee() string { return attest.TeeSample }

// Verify parses the evidence strictly and checks that it carries
// reportData: all 64 bytes, or the 48-byte digest Trustee's sample
// attester sends, in which case reportData's remaining bytes must be
// the zero padding attest.ReportData puts there.
func (verifier) Verify(ctx context.Context, evidence json.RawMessage, reportData []byte) (*attest.Claims, error) {
	ev, err := Parse(evidence)
	if err != nil {
		return nil, err
	}
	if len(reportData) != attest.ReportDataSize {
		return nil, fmt.Errorf("%w: sample: expected report data is %d bytes, want %d", attest.ErrEvidence, len(reportData), attest.ReportDataSize)
	}
	got, err := base64.StdEncoding.Strict().DecodeString(ev.ReportData)
	if err != nil {
		return nil, fmt.Errorf("%w: sample: report_data is not base64: %v", attest.ErrEvidence, err)
	}
	switch len(got) {
	case attest.ReportDataSize:
		if !bytes.Equal(got, reportData) {
			return nil, fmt.Errorf("%w: sample: report_data %x… does not bind this handshake (want %x…)", attest.ErrEvidence, got[:8], reportData[:8])
		}
	case carried:
		if !bytes.Equal(got, reportData[:carried]) {
			return nil, fmt.Errorf("%w: sample: report_data %x… does not bind this handshake (want %x…)", attest.ErrEvidence, got[:8], reportData[:8])
		}
		if !allZero(reportData[carried:]) {
			return nil, fmt.Errorf("%w: sample: evidence carries %d bytes of report data but the expected binding has data beyond them", attest.ErrEvidence, carried)
		}
	default:
		return nil, fmt.Errorf("%w: sample: report_data is %d bytes, want %d or %d", attest.ErrEvidence, len(got), carried, attest.ReportDataSize)
	}
	return &attest.Claims{
		Tee:      attest.TeeSample,
		Insecure: true,
		Values:   map[string]string{"svn": ev.SVN},
	}, nil
}

// Parse decodes sample evidence strictly: one JSON object with exactly
// the string members svn and report_data. Every error wraps
// attest.ErrEvidence.
func Parse(evidence []byte) (*Evidence, error) {
	if len(evidence) > maxEvidence {
		return nil, fmt.Errorf("%w: sample: evidence of %d bytes, more than %d", attest.ErrEvidence, len(evidence), maxEvidence)
	}
	// A map, not a struct: encoding/json would match "SVN" to svn, and
	// Trustee's serde decoder does not.
	var obj map[string]json.RawMessage
	dec := json.NewDecoder(bytes.NewReader(evidence))
	if err := dec.Decode(&obj); err != nil || obj == nil {
		return nil, fmt.Errorf("%w: sample: evidence is not a JSON object {\"svn\",\"report_data\"}", attest.ErrEvidence)
	}
	if len(bytes.TrimSpace(evidence[dec.InputOffset():])) != 0 {
		return nil, fmt.Errorf("%w: sample: trailing data after the evidence", attest.ErrEvidence)
	}
	var raw struct{ SVN, ReportData *string }
	for k, v := range obj {
		var dst **string
		switch k {
		case "svn":
			dst = &raw.SVN
		case "report_data":
			dst = &raw.ReportData
		default:
			return nil, fmt.Errorf("%w: sample: unknown member %q in evidence", attest.ErrEvidence, trim(k))
		}
		var s string
		if v = bytes.TrimSpace(v); len(v) == 0 || v[0] != '"' || json.Unmarshal(v, &s) != nil {
			return nil, fmt.Errorf("%w: sample: %s is not a string", attest.ErrEvidence, k)
		}
		*dst = &s
	}
	switch {
	case raw.SVN == nil:
		return nil, fmt.Errorf("%w: sample: svn missing", attest.ErrEvidence)
	case raw.ReportData == nil:
		return nil, fmt.Errorf("%w: sample: report_data missing", attest.ErrEvidence)
	case *raw.SVN == "":
		return nil, fmt.Errorf("%w: sample: svn empty", attest.ErrEvidence)
	}
	return &Evidence{SVN: *raw.SVN, ReportData: *raw.ReportData}, nil
}

// trim cuts untrusted text for an error message.
func trim(s string) string {
	if len(s) > 40 {
		return s[:40] + "…"
	}
	return s
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
