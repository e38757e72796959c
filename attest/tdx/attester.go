package tdx

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/cwrun/cwrun/attest"
	"github.com/google/go-configfs-tsm/configfs/linuxtsm"
	"github.com/google/go-configfs-tsm/report"
	"github.com/google/go-tdx-guest/abi"
	"github.com/google/go-tdx-guest/client"
)

// DefaultEventLog is where Linux shows the ACPI CCEL table's data: the
// CC event log of the firmware and boot loader.
const DefaultEventLog = "/sys/firmware/acpi/tables/data/CCEL"

const tdxGuestDevice = "/dev/tdx_guest"

// AttesterOptions configures NewAttester.
type AttesterOptions struct {
	// QuoteProvider replaces the guest's TDX device; tests pass fakes.
	// nil: configfs-tsm (/sys/kernel/config/tsm/report) when its
	// provider is tdx_guest, else /dev/tdx_guest.
	QuoteProvider client.QuoteProvider
	// EventLog is the file holding the CC event log sent with each
	// quote. "": DefaultEventLog. A missing file sends no event log.
	EventLog string
}

// ErrNoDevice says the machine is no TDX guest.
var ErrNoDevice = errors.New("no TDX guest device (/dev/tdx_guest, configfs-tsm): this is not a TDX guest")

type attester struct {
	qp       client.QuoteProvider
	eventLog string
}

// NewAttester returns the guest's TDX attester, or ErrNoDevice on a
// machine that is not a TDX guest.
func NewAttester(opts AttesterOptions) (attest.Attester, error) {
	qp := opts.QuoteProvider
	if qp == nil {
		qp = defaultProvider()
	}
	if qp == nil {
		return nil, ErrNoDevice
	}
	path := opts.EventLog
	if path == "" {
		path = DefaultEventLog
	}
	return &attester{qp: qp, eventLog: path}, nil
}

// defaultProvider finds the guest's quote source: configfs-tsm is what
// current kernels offer; its provider must be TDX's (an SEV-SNP guest
// has configfs-tsm too).
func defaultProvider() client.QuoteProvider {
	if c, err := linuxtsm.MakeClient(); err == nil {
		if r, err := report.Create(c, &report.Request{}); err == nil {
			provider, err := r.ReadOption("provider")
			_ = r.Destroy()
			if err == nil && strings.TrimSpace(string(provider)) == "tdx_guest" {
				return &client.LinuxConfigFsQuoteProvider{}
			}
		}
	}
	if _, err := os.Stat(tdxGuestDevice); err == nil {
		return deviceProvider{}
	}
	return nil
}

// deviceProvider gets quotes through /dev/tdx_guest's ioctls, for
// kernels without configfs-tsm.
type deviceProvider struct{}

func (deviceProvider) IsSupported() error { return nil }

func (deviceProvider) GetRawQuote(rd [64]byte) ([]byte, error) {
	d, err := client.OpenDevice()
	if err != nil {
		return nil, err
	}
	defer d.Close()
	return client.GetRawQuote(d, rd)
}

func (a *attester) Tee() string { return attest.TeeTDX }

// Evidence asks the TDX module for a quote carrying reportData and
// returns it in Trustee's shape, with the CC event log when the guest
// has one.
func (a *attester) Evidence(ctx context.Context, reportData []byte) (json.RawMessage, error) {
	if len(reportData) > abi.ReportDataSize {
		return nil, fmt.Errorf("tdx: report data is %d bytes, a quote carries %d", len(reportData), abi.ReportDataSize)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var rd [abi.ReportDataSize]byte
	copy(rd[:], reportData)
	quote, err := a.qp.GetRawQuote(rd)
	if err != nil {
		return nil, fmt.Errorf("tdx: no quote: %w", err)
	}
	if len(quote) == 0 {
		return nil, errors.New("tdx: the quote provider returned an empty quote")
	}
	ev := evidence{Quote: base64.StdEncoding.EncodeToString(quote)}
	switch log, err := os.ReadFile(a.eventLog); {
	case err == nil:
		s := base64.StdEncoding.EncodeToString(log)
		ev.CCEventLog = &s
	case !errors.Is(err, os.ErrNotExist):
		return nil, fmt.Errorf("tdx: reading the CC event log: %w", err)
	}
	return json.Marshal(ev)
}
