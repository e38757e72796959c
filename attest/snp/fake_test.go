package snp

import (
	"encoding/binary"
	"encoding/json"
	"testing"
	"time"

	"github.com/google/go-sev-guest/abi"
	"github.com/google/go-sev-guest/kds"
	sevtest "github.com/google/go-sev-guest/testing"
	"github.com/google/go-sev-guest/verify/trust"
)

// This file builds fake-signed evidence with go-sev-guest's test-only
// AMD key chain (ARK → ASK/ASVK → VCEK/VLEK), which the verifier is
// told to trust through Options.Roots.

// fakeEpoch is when the fake chain was made; fakeNow lies inside every
// fake certificate's validity.
var (
	fakeEpoch = time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	fakeNow   = func() time.Time { return fakeEpoch.Add(time.Hour) }
)

// fakeChip and fakeTCB are what the KDS-shaped fake signer's VCEK
// certifies; the default signer's VCEK certifies zeros.
var (
	fakeChip = func() [abi.ChipIDSize]byte {
		var c [abi.ChipIDSize]byte
		for i := range c {
			c[i] = byte(0xA0 + i)
		}
		return c
	}()
	fakeTCB = kds.TCBParts{BlSpl: 3, TeeSpl: 0, SnpSpl: 8, UcodeSpl: 115}
)

// newSigner returns go-sev-guest's fake AMD signer. With chip set, its
// VCEK is bound to fakeChip and fakeTCB, as a key server would serve it.
func newSigner(t testing.TB, chip bool) *sevtest.AmdSigner {
	t.Helper()
	b := &sevtest.AmdSignerBuilder{
		Keys:             sevtest.DefaultAmdKeys(),
		ProductName:      "Milan-B1",
		CSPID:            "cwrun-test",
		ArkCreationTime:  fakeEpoch,
		AskCreationTime:  fakeEpoch,
		AsvkCreationTime: fakeEpoch,
		VcekCreationTime: fakeEpoch,
		VlekCreationTime: fakeEpoch,
	}
	if chip {
		tcb, err := kds.ComposeTCBParts(fakeTCB)
		if err != nil {
			t.Fatal(err)
		}
		b.HWID = fakeChip
		b.TCB = tcb
		b.VcekCustom.Extensions = sevtest.CustomExtensions(fakeTCB, fakeChip[:], "", "Milan-B1")
	}
	s, err := b.TestOnlyCertChain()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// fakeRoots are the fake signer's roots, in Options.Roots' shape.
func fakeRoots(s *sevtest.AmdSigner) map[string][]*trust.AMDRootCerts {
	return map[string][]*trust.AMDRootCerts{"Milan": {{
		ProductLine:  "Milan",
		ProductCerts: &trust.ProductCerts{Ark: s.Ark, Ask: s.Ask, Asvk: s.Asvk},
	}}}
}

// fakeReport makes a version 3 Milan report binding reportData, lets
// edit change it, and signs it with s.
func fakeReport(t testing.TB, s *sevtest.AmdSigner, reportData []byte, edit func(raw []byte)) []byte {
	t.Helper()
	raw := make([]byte, abi.ReportSize)
	le := binary.LittleEndian
	le.PutUint32(raw[offVersion:], 3)
	le.PutUint32(raw[offGuestSVN:], 7)
	le.PutUint64(raw[offPolicy:], abi.SnpPolicyToBytes(abi.SnpPolicy{ABIMajor: 1, ABIMinor: 51, SMT: true}))
	le.PutUint32(raw[offSigAlgo:], abi.SignEcdsaP384Sha384)
	raw[offCPUIDFam], raw[offCPUIDMod], raw[offCPUIDStep] = 0x19, 0x01, 0x01
	copy(raw[offReportData:], reportData)
	for i := 0; i < abi.MeasurementSize; i++ {
		raw[offMeasurement+i] = byte(i)
	}
	copy(raw[offHostData:], "cwrun host data")
	if edit != nil {
		edit(raw)
	}
	sign(t, s, raw)
	return raw
}

// sign (re)signs raw with the signer's key its key_info names.
func sign(t testing.TB, s *sevtest.AmdSigner, raw []byte) {
	t.Helper()
	r, sig, err := s.Sign(raw[:offSignature])
	if err != nil {
		t.Fatal(err)
	}
	if err := abi.SetSignature(r, sig, raw); err != nil {
		t.Fatal(err)
	}
}

// withChip puts fakeChip and fakeTCB in a report.
func withChip(raw []byte) {
	copy(raw[offChipID:], fakeChip[:])
	tcb, _ := kds.ComposeTCBParts(fakeTCB)
	binary.LittleEndian.PutUint64(raw[offReportedTCB:], uint64(tcb))
}

// evidenceJSON wraps a binary report and certificates (type, DER pairs)
// in Trustee's JSON.
func evidenceJSON(t testing.TB, raw []byte, certs ...any) json.RawMessage {
	t.Helper()
	rep, err := reportFromBinary(raw)
	if err != nil {
		t.Fatal(err)
	}
	ev := evidence{Report: rep}
	for i := 0; i+1 < len(certs); i += 2 {
		ev.CertChain = append(ev.CertChain, certEntry{Type: certType{Name: certs[i].(string)}, Data: certs[i+1].([]byte)})
	}
	out, err := json.Marshal(ev)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func reportData(b byte) []byte {
	rd := make([]byte, 64)
	for i := range rd {
		rd[i] = b + byte(i)
	}
	return rd
}

func mustFakeKDS(t testing.TB, s *sevtest.AmdSigner) *sevtest.FakeKDS {
	t.Helper()
	k, err := sevtest.FakeKDSFromSigner(s)
	if err != nil {
		t.Fatal(err)
	}
	return k
}
