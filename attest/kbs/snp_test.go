package kbs

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"testing"
	"time"

	"github.com/cwrun/cwrun/attest"
	"github.com/cwrun/cwrun/attest/snp"
	"github.com/google/go-sev-guest/abi"
	labi "github.com/google/go-sev-guest/client/linuxabi"
	spb "github.com/google/go-sev-guest/proto/sevsnp"
	sevtest "github.com/google/go-sev-guest/testing"
	"github.com/google/go-sev-guest/verify/trust"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// The broker with the real SEV-SNP verifier, fed by go-sev-guest's fake
// AMD signer and fake guest device: real report signatures and
// certificate chains, only the keys are test keys.

var snpEpoch = time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)

// SEV-SNP report layout (AMD SEV-SNP ABI, ATTESTATION_REPORT).
const (
	snpOffVersion     = 0x000
	snpOffGuestSVN    = 0x004
	snpOffPolicy      = 0x008
	snpOffSigAlgo     = 0x034
	snpOffReportData  = 0x050
	snpOffMeasurement = 0x090
	snpOffHostData    = 0x0C0
	snpOffCPUIDFam    = 0x188
	snpOffSignature   = 0x2A0
)

type snpFixture struct {
	signer   *sevtest.AmdSigner
	verifier attest.Verifier
}

func newSNPFixture(t testing.TB) *snpFixture {
	t.Helper()
	b := &sevtest.AmdSignerBuilder{
		Keys:             sevtest.DefaultAmdKeys(),
		ProductName:      "Milan-B1",
		CSPID:            "cwrun-kbs-test",
		ArkCreationTime:  snpEpoch,
		AskCreationTime:  snpEpoch,
		AsvkCreationTime: snpEpoch,
		VcekCreationTime: snpEpoch,
		VlekCreationTime: snpEpoch,
	}
	s, err := b.TestOnlyCertChain()
	if err != nil {
		t.Fatal(err)
	}
	v, err := snp.NewVerifier(snp.Options{
		Now: func() time.Time { return snpEpoch.Add(time.Hour) },
		Roots: map[string][]*trust.AMDRootCerts{"Milan": {{
			ProductLine:  "Milan",
			ProductCerts: &trust.ProductCerts{Ark: s.Ark, Ask: s.Ask, Asvk: s.Asvk},
		}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	return &snpFixture{signer: s, verifier: v}
}

// snpMeasurement is what the fake reports carry: bytes 0, 1, ... 47.
func snpMeasurement() string {
	m := make([]byte, abi.MeasurementSize)
	for i := range m {
		m[i] = byte(i)
	}
	return hex.EncodeToString(m)
}

// attester returns the real SNP attester over a fake device whose
// reports edit may change before the device signs them.
func (f *snpFixture) attester(t testing.TB, edit func(raw []byte)) attest.Attester {
	t.Helper()
	qp, err := sevtest.TcQuoteProvider(nil, &sevtest.DeviceOptions{
		Signer:  f.signer,
		Now:     snpEpoch,
		Product: &spb.SevProduct{Name: spb.SevProduct_SEV_PRODUCT_MILAN, MachineStepping: wrapperspb.UInt32(1)},
	})
	if err != nil {
		t.Fatal(err)
	}
	a, err := snp.NewAttester(snp.AttesterOptions{QuoteProvider: &snpDevice{QuoteProvider: qp, edit: edit}})
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// snpDevice teaches go-sev-guest's fake device to answer any report
// data: the fake only answers report data registered in advance.
type snpDevice struct {
	*sevtest.QuoteProvider
	edit func([]byte)
}

func (d *snpDevice) GetRawQuote(rd [64]byte) ([]byte, error) {
	raw := make([]byte, abi.ReportSize)
	le := binary.LittleEndian
	le.PutUint32(raw[snpOffVersion:], 3)
	le.PutUint32(raw[snpOffGuestSVN:], 7)
	le.PutUint64(raw[snpOffPolicy:], abi.SnpPolicyToBytes(abi.SnpPolicy{ABIMajor: 1, ABIMinor: 51, SMT: true}))
	le.PutUint32(raw[snpOffSigAlgo:], abi.SignEcdsaP384Sha384)
	raw[snpOffCPUIDFam], raw[snpOffCPUIDFam+1], raw[snpOffCPUIDFam+2] = 0x19, 0x01, 0x01
	copy(raw[snpOffReportData:], rd[:])
	for i := 0; i < abi.MeasurementSize; i++ {
		raw[snpOffMeasurement+i] = byte(i)
	}
	copy(raw[snpOffHostData:], "cwrun host data")
	if d.edit != nil {
		d.edit(raw)
	}
	var resp labi.SnpReportRespABI
	copy(resp.Data[:], raw) // unsigned: the fake device signs it
	key := hex.EncodeToString(rd[:])
	d.Device.ReportDataRsp[key] = &sevtest.GetReportResponse{Resp: resp}
	// One answer per report data: drop it once signed, or a guest that
	// runs many handshakes keeps every report it ever made.
	defer delete(d.Device.ReportDataRsp, key)
	return d.QuoteProvider.GetRawQuote(rd)
}

// tamperingAttester changes one byte of the signed report's
// measurement in the evidence JSON, as a host rewriting it would.
type tamperingAttester struct{ attest.Attester }

func (a tamperingAttester) Evidence(ctx context.Context, rd []byte) (json.RawMessage, error) {
	ev, err := a.Attester.Evidence(ctx, rd)
	if err != nil {
		return nil, err
	}
	var doc map[string]json.RawMessage
	if err := json.Unmarshal(ev, &doc); err != nil {
		return nil, err
	}
	var rep map[string]json.RawMessage
	if err := json.Unmarshal(doc["attestation_report"], &rep); err != nil {
		return nil, err
	}
	var m []int
	if err := json.Unmarshal(rep["measurement"], &m); err != nil {
		return nil, err
	}
	m[0] ^= 0xff
	rep["measurement"], _ = json.Marshal(m)
	doc["attestation_report"], _ = json.Marshal(rep)
	return json.Marshal(doc)
}

func TestSNPEndToEnd(t *testing.T) {
	f := newSNPFixture(t)
	b := newBroker(t, func(o *Options) { o.Verifiers = []attest.Verifier{f.verifier} })
	meas := snpMeasurement()
	b.addWorkload(WorkloadSpec{ID: "snp-app", Tee: attest.TeeSNP, Passphrase: passphrase,
		References: map[string][]string{"measurement": {meas}}})
	b.addWorkload(WorkloadSpec{ID: "snp-other", Tee: attest.TeeSNP, Passphrase: "other",
		References: map[string][]string{"measurement": {hexOf('a', 96), hexOf('b', 96)}}})
	ctx := context.Background()

	t.Run("released through the real client", func(t *testing.T) {
		c := &attest.Client{BaseURL: b.ts.URL, HTTP: b.ts.Client(), Attester: f.attester(t, nil)}
		got, err := c.Resource(ctx, PassphrasePath("snp-app"))
		if err != nil || string(got) != passphrase {
			t.Fatalf("%q %v", got, err)
		}
	})
	t.Run("wrong measurement", func(t *testing.T) {
		g := b.guest(f.attester(t, nil))
		g.handshake()
		st, out := g.fetch(PassphrasePath("snp-other"))
		wantError(t, st, out, http.StatusForbidden, "measurement 00010203… not among the 2 registered for workload snp-other")
	})
	t.Run("tampered report", func(t *testing.T) {
		g := b.guest(tamperingAttester{f.attester(t, nil)})
		nonce := g.auth()
		st, out := g.do(http.MethodPost, "/kbs/v0/attest", g.attestBody(nonce, g.key.JWK, g.key.JWK))
		wantError(t, st, out, http.StatusUnauthorized, "report signature")
	})
	t.Run("debug policy bit", func(t *testing.T) {
		g := b.guest(f.attester(t, func(raw []byte) { raw[snpOffPolicy+2] |= 1 << 3 })) // bit 19: DEBUG
		nonce := g.auth()
		st, out := g.do(http.MethodPost, "/kbs/v0/attest", g.attestBody(nonce, g.key.JWK, g.key.JWK))
		wantError(t, st, out, http.StatusUnauthorized, "allows debugging")
	})
	t.Run("evidence bound to another TEE key", func(t *testing.T) {
		g := b.guest(f.attester(t, nil))
		nonce := g.auth()
		other, _ := attest.NewTeeKey()
		st, out := g.do(http.MethodPost, "/kbs/v0/attest", g.attestBody(nonce, other.JWK, g.key.JWK))
		wantError(t, st, out, http.StatusUnauthorized, "report data")
	})
	t.Run("sample refused by a broker without the sample verifier", func(t *testing.T) {
		st, out := doReq(t, b.ts.Client(), http.MethodPost, b.ts.URL+"/kbs/v0/auth", []byte(`{"version":"0.4.0","tee":"sample","extra-params":{}}`))
		wantError(t, st, out, http.StatusBadRequest, `tee "sample" is not served by this broker; it verifies: snp`)
	})
}
