// Package tdx verifies Intel TDX evidence in the broker and produces it
// in the guest.
//
// Evidence is Trustee's `tdx` JSON: a base64 TD quote (version 4) and,
// optionally, the base64 CC event log. The verifier checks the quote's
// PCK chain up to Intel's SGX root and its signatures (go-tdx-guest),
// Intel's TCB collateral when it has some, that the event log replays
// to the quote's RTMRs, the report data binding, and that the TD is not
// a debug TD. It never compares measurements with reference values:
// that is appraisal's job.
package tdx

import (
	"bytes"
	"context"
	"crypto/x509"
	_ "embed"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"time"

	"github.com/cwrun/cwrun/attest"
	"github.com/google/go-tdx-guest/abi"
	pb "github.com/google/go-tdx-guest/proto/tdx"
	"github.com/google/go-tdx-guest/verify"
	"github.com/google/go-tdx-guest/verify/trust"
)

// Options configures NewVerifier. The zero value checks quotes up to
// Intel's root, without TCB collateral.
type Options struct {
	// Now is the time at which certificates and collateral must be
	// valid. nil: time.Now.
	Now func() time.Time
	// Roots replaces Intel's SGX Root CA as the trust anchor of PCK
	// chains and collateral; tests pass their own. nil: Intel's
	// (embedded).
	Roots *x509.CertPool
	// CacheDir is a folder of Intel PCS collateral: tcbinfo-<fmspc>.json
	// and qeidentity.json (the PCS responses' bodies) and
	// tcb-signing-chain.pem (their issuer chain, from the
	// Tcb-Info-Issuer-Chain header). What Getter fetches is kept there.
	// With CacheDir or Getter set, every quote's TCB status and QE
	// identity are checked against the collateral and a quote whose
	// collateral cannot be had is refused. "": none.
	CacheDir string
	// Getter fetches collateral from Intel PCS when CacheDir lacks it;
	// go-tdx-guest's trust.DefaultHTTPSGetter() does so over HTTPS.
	// nil: PCS is never asked.
	Getter trust.HTTPSGetter
	// Logger receives collateral cache write failures. nil: nothing is
	// logged.
	Logger *slog.Logger
}

//go:embed roots/intel_sgx_root_ca.pem
var intelRootPEM []byte

type verifier struct {
	now        func() time.Time
	roots      *x509.CertPool
	collateral *collateralSource // nil: collateral not checked
}

// NewVerifier returns the TDX verifier.
func NewVerifier(opts Options) (attest.Verifier, error) {
	v := &verifier{now: opts.Now, roots: opts.Roots}
	if v.now == nil {
		v.now = time.Now
	}
	if v.roots == nil {
		v.roots = x509.NewCertPool()
		if !v.roots.AppendCertsFromPEM(intelRootPEM) {
			return nil, errors.New("tdx: the embedded Intel SGX Root CA does not parse")
		}
	}
	if opts.CacheDir != "" {
		if fi, err := os.Stat(opts.CacheDir); err != nil || !fi.IsDir() {
			return nil, fmt.Errorf("tdx collateral folder %s is not a folder: create it or leave it unset", opts.CacheDir)
		}
	}
	if opts.CacheDir != "" || opts.Getter != nil {
		log := opts.Logger
		if log == nil {
			log = slog.New(slog.NewTextHandler(io.Discard, nil))
		}
		v.collateral = &collateralSource{dir: opts.CacheDir, getter: opts.Getter, now: v.now, log: log, cache: map[string]cachedResponse{}}
	}
	return v, nil
}

func (v *verifier) Tee() string { return attest.TeeTDX }

// evidence is Trustee's `tdx` primary evidence.
type evidence struct {
	CCEventLog *string `json:"cc_eventlog"`
	Quote      string  `json:"quote"`
}

// maxEvidence bounds what is parsed: a quote is about 5 KiB, a CC event
// log area 64 KiB, both base64.
const maxEvidence = 1 << 20

// parseEvidence reads Trustee's JSON into the quote and event log bytes
// (nil when the evidence has none).
func parseEvidence(data []byte) (quote, eventLog []byte, err error) {
	if len(data) > maxEvidence {
		return nil, nil, fmt.Errorf("evidence is %d bytes, more than %d", len(data), maxEvidence)
	}
	var ev evidence
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&ev); err != nil {
		return nil, nil, fmt.Errorf("not Trustee tdx evidence: %w", err)
	}
	if dec.More() {
		return nil, nil, errors.New("not Trustee tdx evidence: trailing data after the JSON object")
	}
	if ev.Quote == "" {
		return nil, nil, errors.New("not Trustee tdx evidence: no quote")
	}
	if quote, err = base64.StdEncoding.DecodeString(ev.Quote); err != nil {
		return nil, nil, fmt.Errorf("the quote is not standard base64: %w", err)
	}
	if ev.CCEventLog != nil {
		if eventLog, err = base64.StdEncoding.DecodeString(*ev.CCEventLog); err != nil {
			return nil, nil, fmt.Errorf("cc_eventlog is not standard base64: %w", err)
		}
	}
	return quote, eventLog, nil
}

// parseQuote reads a version 4 TD quote.
func parseQuote(raw []byte) (*pb.QuoteV4, error) {
	if len(raw) < 8 {
		return nil, fmt.Errorf("a %d-byte quote has no header", len(raw))
	}
	version := binary.LittleEndian.Uint16(raw)
	if tee := binary.LittleEndian.Uint32(raw[4:]); tee != abi.TeeTDX {
		return nil, fmt.Errorf("the quote is for TEE type %#x, not TDX (%#x)", tee, abi.TeeTDX)
	}
	switch version {
	case 4:
	case 5:
		return nil, errors.New("TDX quote version 5 is not supported yet (go-tdx-guest v0.3.1 reads version 4): have the guest's quote generation produce version 4 quotes")
	default:
		return nil, fmt.Errorf("TDX quote version %d is not supported (version 4 is)", version)
	}
	q, err := abi.QuoteToProto(raw)
	if err != nil {
		return nil, err
	}
	quote, ok := q.(*pb.QuoteV4)
	if !ok {
		return nil, fmt.Errorf("quote parsed as %T, not a version 4 quote", q)
	}
	return quote, nil
}

// deny makes a verification failure naming the failed check.
func deny(check, format string, args ...any) error {
	return fmt.Errorf("%w: tdx %s: %s", attest.ErrEvidence, check, fmt.Sprintf(format, args...))
}

// Check names, as denials and the broker's log show them.
const (
	checkFormat     = "evidence format"
	checkSignature  = "quote signature"
	checkCollateral = "TCB collateral"
	checkLog        = "event log"
	checkReportData = "report data"
	checkAttributes = "TD attributes"
)

// tdDebug is TDATTRIBUTES' DEBUG bit: the host can read and change the
// TD's state.
const tdDebug = 1 << 0

func (v *verifier) Verify(ctx context.Context, ev json.RawMessage, reportData []byte) (*attest.Claims, error) {
	raw, eventLog, err := parseEvidence(ev)
	if err != nil {
		return nil, deny(checkFormat, "%v", err)
	}
	quote, tcbStatus, err := v.verifyQuote(raw)
	if err != nil {
		return nil, err
	}
	body := quote.GetTdQuoteBody()
	if eventLog != nil {
		if err := checkEventLog(eventLog, body.GetRtmrs()); err != nil {
			return nil, err
		}
	}
	if len(reportData) != abi.ReportDataSize {
		return nil, deny(checkReportData, "the expected report data is %d bytes, not %d", len(reportData), abi.ReportDataSize)
	}
	if !bytes.Equal(body.GetReportData(), reportData) {
		return nil, deny(checkReportData, "the quote binds %s…, this handshake wants %s… (a replayed or foreign quote)",
			hex.EncodeToString(body.GetReportData()[:8]), hex.EncodeToString(reportData[:8]))
	}
	attributes := binary.LittleEndian.Uint64(body.GetTdAttributes())
	if attributes&tdDebug != 0 {
		return nil, deny(checkAttributes, "the TD is a debug TD (td_attributes %s): the host can read and change its memory",
			hex.EncodeToString(body.GetTdAttributes()))
	}
	return &attest.Claims{Tee: attest.TeeTDX, Values: claims(body, tcbStatus, eventLog != nil)}, nil
}

// verifyQuote checks the quote's signatures up to the roots and, when
// the verifier has collateral, Intel's TCB status; it returns the
// parsed quote and the TCB status ("UpToDate", or "unchecked").
func (v *verifier) verifyQuote(raw []byte) (*pb.QuoteV4, string, error) {
	quote, err := parseQuote(raw)
	if err != nil {
		return nil, "", deny(checkFormat, "%v", err)
	}
	now := v.now()
	// go-tdx-guest keeps per-call state in its Options: one per call.
	if err := verify.TdxQuote(quote, &verify.Options{Now: now, TrustedRoots: v.roots}); err != nil {
		return nil, "", deny(checkSignature, "%v", err)
	}
	if v.collateral == nil {
		return quote, "unchecked", nil
	}
	// The signature checks run again here; separate calls let a denial
	// say whether the quote or Intel's collateral failed.
	opts := &verify.Options{Now: now, TrustedRoots: v.roots, GetCollateral: true, Getter: v.collateral}
	if err := verify.TdxQuote(quote, opts); err != nil {
		return nil, "", deny(checkCollateral, "%v", err)
	}
	return quote, "UpToDate", nil
}

// checkEventLog replays the CC event log and compares it with the
// quote's RTMRs. RTMR3 is compared only when the log extends it: it is
// the one extended at run time, by events a CCEL does not carry.
func checkEventLog(data []byte, rtmrs [][]byte) error {
	log, err := replayEventLog(data)
	if err != nil {
		return deny(checkLog, "the CC event log does not parse: %v", err)
	}
	for i := 0; i < rtmrCount; i++ {
		if i == 3 && !log.Extended[i] {
			continue
		}
		if !bytes.Equal(log.RTMR[i][:], rtmrs[i]) {
			return deny(checkLog, "the CC event log replays RTMR%d to %s, the quote holds %s: the log does not describe this boot",
				i, hex.EncodeToString(log.RTMR[i][:]), hex.EncodeToString(rtmrs[i]))
		}
	}
	return nil
}

func claims(body *pb.TDQuoteBody, tcbStatus string, eventLog bool) map[string]string {
	attributes := binary.LittleEndian.Uint64(body.GetTdAttributes())
	values := map[string]string{
		"mr_td":               hex.EncodeToString(body.GetMrTd()),
		"mr_config_id":        hex.EncodeToString(body.GetMrConfigId()),
		"mr_owner":            hex.EncodeToString(body.GetMrOwner()),
		"mr_owner_config":     hex.EncodeToString(body.GetMrOwnerConfig()),
		"mr_seam":             hex.EncodeToString(body.GetMrSeam()),
		"xfam":                hex.EncodeToString(body.GetXfam()),
		"td_attributes":       hex.EncodeToString(body.GetTdAttributes()),
		"td_attributes_debug": strconv.FormatBool(attributes&tdDebug != 0),
		"tee_tcb_svn":         hex.EncodeToString(body.GetTeeTcbSvn()),
		"report_data":         hex.EncodeToString(body.GetReportData()),
		"tcb_status":          tcbStatus,
		"event_log_verified":  strconv.FormatBool(eventLog),
	}
	for i, r := range body.GetRtmrs() {
		values["rtmr"+strconv.Itoa(i)] = hex.EncodeToString(r)
	}
	return values
}
