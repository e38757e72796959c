package snp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/cwrun/cwrun/attest"
	"github.com/google/go-sev-guest/abi"
	"github.com/google/go-sev-guest/client"
)

// AttesterOptions configures NewAttester.
type AttesterOptions struct {
	// QuoteProvider replaces the guest's SEV-SNP device; tests pass
	// go-sev-guest/testing's fakes. nil: configfs-tsm
	// (/sys/kernel/config/tsm/report), else /dev/sev-guest.
	QuoteProvider client.QuoteProvider
}

// ErrNoDevice says the machine is no SEV-SNP guest.
var ErrNoDevice = errors.New("no SEV-SNP guest device (/dev/sev-guest, configfs-tsm): this is not an SNP guest")

type attester struct {
	qp client.QuoteProvider
}

// NewAttester returns the guest's SEV-SNP attester, or ErrNoDevice on a
// machine that is not an SNP guest.
func NewAttester(opts AttesterOptions) (attest.Attester, error) {
	qp := opts.QuoteProvider
	if qp == nil {
		for _, p := range []client.QuoteProvider{&client.LinuxConfigFsQuoteProvider{}, &client.LinuxIoctlQuoteProvider{}} {
			if p.IsSupported() {
				qp = p
				break
			}
		}
	}
	if qp == nil {
		return nil, ErrNoDevice
	}
	return &attester{qp: qp}, nil
}

func (a *attester) Tee() string { return attest.TeeSNP }

// Evidence asks the secure processor for a report carrying reportData
// and returns it in Trustee's shape, with the certificates the host
// supplied (VCEK or VLEK, maybe ASK and ARK).
func (a *attester) Evidence(ctx context.Context, reportData []byte) (json.RawMessage, error) {
	if len(reportData) > abi.ReportDataSize {
		return nil, fmt.Errorf("snp: report data is %d bytes, a report carries %d", len(reportData), abi.ReportDataSize)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var rd [abi.ReportDataSize]byte
	copy(rd[:], reportData)
	quote, err := a.qp.GetRawQuote(rd)
	if err != nil {
		return nil, fmt.Errorf("snp: the secure processor gave no report: %w", err)
	}
	ev, err := evidenceFromQuote(quote)
	if err != nil {
		return nil, fmt.Errorf("snp: %w", err)
	}
	return ev, nil
}
