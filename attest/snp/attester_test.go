package snp

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"testing"

	"github.com/google/go-sev-guest/abi"
	labi "github.com/google/go-sev-guest/client/linuxabi"
	spb "github.com/google/go-sev-guest/proto/sevsnp"
	sevtest "github.com/google/go-sev-guest/testing"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// fakeDevice is go-sev-guest's fake configfs-tsm quote provider, taught
// on the fly to answer any report data: the fake only answers report
// data registered in advance, and a handshake's is random.
type fakeDevice struct {
	*sevtest.QuoteProvider
	t    testing.TB
	edit func([]byte)
}

func newFakeDevice(t testing.TB, s *sevtest.AmdSigner, edit func([]byte)) *fakeDevice {
	t.Helper()
	qp, err := sevtest.TcQuoteProvider(nil, &sevtest.DeviceOptions{
		Signer:  s,
		Now:     fakeEpoch,
		Product: &spb.SevProduct{Name: spb.SevProduct_SEV_PRODUCT_MILAN, MachineStepping: wrapperspb.UInt32(1)},
	})
	if err != nil {
		t.Fatal(err)
	}
	return &fakeDevice{QuoteProvider: qp, t: t, edit: edit}
}

func (d *fakeDevice) GetRawQuote(rd [64]byte) ([]byte, error) {
	// The fake device signs what it is given; give it an unsigned
	// report carrying rd.
	raw := fakeReport(d.t, d.Device.Signer, rd[:], d.edit)
	clear(raw[offSignature:])
	var resp labi.SnpReportRespABI
	copy(resp.Data[:], raw)
	d.Device.ReportDataRsp[hex.EncodeToString(rd[:])] = &sevtest.GetReportResponse{Resp: resp}
	return d.QuoteProvider.GetRawQuote(rd)
}

func TestAttesterWithFakeDevice(t *testing.T) {
	s := newSigner(t, false)
	a, err := NewAttester(AttesterOptions{QuoteProvider: newFakeDevice(t, s, nil)})
	if err != nil {
		t.Fatal(err)
	}
	if a.Tee() != "snp" {
		t.Fatalf("Tee() = %q", a.Tee())
	}
	rd := reportData(7)
	ev, err := a.Evidence(context.Background(), rd)
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Report    map[string]json.RawMessage `json:"attestation_report"`
		CertChain []struct {
			Type json.RawMessage `json:"cert_type"`
			Data []int           `json:"data"`
		} `json:"cert_chain"`
	}
	if err := json.Unmarshal(ev, &doc); err != nil {
		t.Fatal(err)
	}
	if len(doc.Report["measurement"]) == 0 || doc.Report["measurement"][0] != '[' {
		t.Fatalf("measurement is not a JSON integer array: %s", doc.Report["measurement"])
	}
	var types []string
	for _, c := range doc.CertChain {
		types = append(types, string(c.Type))
	}
	wantTypes := map[string]bool{`"ARK"`: true, `"ASK"`: true, `"VCEK"`: true, `"VLEK"`: true}
	if len(types) != len(wantTypes) {
		t.Fatalf("cert_chain types %v, want ARK, ASK, VCEK, VLEK (the platform info entry left out)", types)
	}
	for _, ty := range types {
		if !wantTypes[ty] {
			t.Fatalf("unexpected cert_type %s", ty)
		}
	}

	v := mustVerifier(t, Options{Now: fakeNow, Roots: fakeRoots(s)})
	claims, err := v.Verify(context.Background(), ev, rd)
	if err != nil {
		t.Fatal(err)
	}
	if claims.Values["report_data"] != hex.EncodeToString(rd) {
		t.Fatalf("report_data claim %s", claims.Values["report_data"])
	}

	if _, err := a.Evidence(context.Background(), make([]byte, 65)); err == nil {
		t.Fatal("65 bytes of report data were accepted")
	}
}

func TestEvidenceWithoutCertificates(t *testing.T) {
	s := newSigner(t, false)
	raw := fakeReport(t, s, reportData(1), nil)
	ev, err := evidenceFromQuote(raw)
	if err != nil {
		t.Fatal(err)
	}
	var doc map[string]json.RawMessage
	if err := json.Unmarshal(ev, &doc); err != nil {
		t.Fatal(err)
	}
	if string(doc["cert_chain"]) != "null" {
		t.Fatalf("cert_chain = %s, want null", doc["cert_chain"])
	}
	if _, err := evidenceFromQuote(raw[:100]); err == nil {
		t.Fatal("a short quote was accepted")
	}
}

func TestAttesterWithoutDevice(t *testing.T) {
	for _, p := range []string{"/dev/sev-guest", "/sys/kernel/config/tsm/report"} {
		if _, err := os.Stat(p); err == nil {
			t.Skipf("%s exists: this may be a confidential guest", p)
		}
	}
	_, err := NewAttester(AttesterOptions{})
	if !errors.Is(err, ErrNoDevice) {
		t.Fatalf("NewAttester() = %v, want %v", err, ErrNoDevice)
	}
	if want := "no SEV-SNP guest device (/dev/sev-guest, configfs-tsm): this is not an SNP guest"; err.Error() != want {
		t.Fatalf("error %q, want %q", err, want)
	}
}

// TestTurinLayout: a Turin report's TCB versions put FMC first; the
// JSON carries it and the binary comes back the same.
func TestTurinLayout(t *testing.T) {
	s := newSigner(t, false)
	raw := fakeReport(t, s, reportData(4), func(raw []byte) {
		raw[offCPUIDFam], raw[offCPUIDMod] = 0x1A, 0x02
		// fmc, bootloader, tee, snp, -, -, -, microcode
		copy(raw[offReportedTCB:], []byte{1, 2, 3, 4, 0, 0, 0, 5})
		copy(raw[offChipID:], []byte{9, 9, 9, 9, 9, 9, 9, 9})
	})
	rep, err := reportFromBinary(raw)
	if err != nil {
		t.Fatal(err)
	}
	tcb := rep.ReportedTCB
	if tcb.FMC == nil || *tcb.FMC != 1 || tcb.Bootloader != 2 || tcb.TEE != 3 || tcb.SNP != 4 || tcb.Microcode != 5 {
		t.Fatalf("Turin reported_tcb decoded as %+v", tcb)
	}
	if rep.CurrentTCB.FMC == nil {
		t.Fatal("Turin current_tcb has no fmc")
	}
	back, err := rep.binary()
	if err != nil {
		t.Fatal(err)
	}
	if string(back) != string(raw) {
		t.Fatal("Turin report does not round-trip")
	}
	// A pre-Turin report with an FMC part cannot be written.
	milan := fakeReport(t, s, reportData(4), nil)
	rep, err = reportFromBinary(milan)
	if err != nil {
		t.Fatal(err)
	}
	fmc := uint8(1)
	rep.ReportedTCB.FMC = &fmc
	if _, err := rep.binary(); err == nil {
		t.Fatal("an FMC part on a Milan report was written")
	}
}

func TestReservedBytesRefused(t *testing.T) {
	s := newSigner(t, false)
	raw := fakeReport(t, s, reportData(1), nil)
	raw[offReportedTCB+3] = 1 // reserved in the Milan layout
	if _, err := reportFromBinary(raw); err == nil {
		t.Fatal("a report with a set reserved TCB byte was mapped to JSON")
	}
	raw = fakeReport(t, s, reportData(1), nil)
	raw[abi.ReportSize-1] = 1
	if _, err := reportFromBinary(raw); err == nil {
		t.Fatal("a report with a set reserved signature byte was mapped to JSON")
	}
}
