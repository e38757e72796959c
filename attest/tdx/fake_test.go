package tdx

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/google/go-tdx-guest/abi"
	"github.com/google/go-tdx-guest/pcs"
	pb "github.com/google/go-tdx-guest/proto/tdx"
	"google.golang.org/protobuf/proto"
)

// go-tdx-guest ships no fake quote signer, so the tests make one: a
// fake Intel hierarchy (root → PCK platform CA → PCK certificate, named
// as Intel names them, the PCK carrying the real fixture's SGX
// extension) signing quotes built on the real v4 fixture's layout. The
// verifier is told to trust the fake root through Options.Roots.

var (
	fakeEpoch = time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	fakeNow   = func() time.Time { return fakeEpoch.Add(time.Hour) }
)

type fakeIntel struct {
	root     *x509.Certificate
	pckKey   *ecdsa.PrivateKey
	attKey   *ecdsa.PrivateKey
	chainPEM []byte
	template *pb.QuoteV4
}

var (
	fakeOnce sync.Once
	fake     *fakeIntel
	fakeErr  error
)

func readTestdata(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile("testdata/" + name)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// newFakeIntel returns the (shared) fake hierarchy.
func newFakeIntel(t testing.TB) *fakeIntel {
	t.Helper()
	fakeOnce.Do(func() { fake, fakeErr = makeFakeIntel(readTestdata(t, "tdx_quote_4.dat")) })
	if fakeErr != nil {
		t.Fatal(fakeErr)
	}
	return fake
}

func intelName(cn string) pkix.Name {
	return pkix.Name{CommonName: cn, Organization: []string{"Intel Corporation"}, Locality: []string{"Santa Clara"},
		Province: []string{"CA"}, Country: []string{"US"}}
}

func makeFakeIntel(fixture []byte) (*fakeIntel, error) {
	q, err := abi.QuoteToProto(fixture)
	if err != nil {
		return nil, err
	}
	template := q.(*pb.QuoteV4)
	// The real PCK certificate's SGX extension (FMSPC, TCB, PCE ID...)
	// goes into the fake one, so that go-tdx-guest reads it as real.
	block, _ := pem.Decode(template.GetSignedData().GetCertificationData().GetQeReportCertificationData().GetPckCertificateChainData().GetPckCertChain())
	realPCK, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, err
	}
	var sgx pkix.Extension
	for _, e := range realPCK.Extensions {
		if e.Id.Equal(pcs.OidSgxExtension) {
			sgx = e
		}
	}

	keys := make([]*ecdsa.PrivateKey, 4)
	for i := range keys {
		if keys[i], err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err != nil {
			return nil, err
		}
	}
	rootKey, interKey, pckKey, attKey := keys[0], keys[1], keys[2], keys[3]
	validity := func(c *x509.Certificate, serial int64) *x509.Certificate {
		c.SerialNumber = big.NewInt(serial)
		c.NotBefore = fakeEpoch.Add(-time.Hour)
		c.NotAfter = fakeEpoch.AddDate(10, 0, 0)
		return c
	}
	rootTmpl := validity(&x509.Certificate{Subject: intelName("Intel SGX Root CA"), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign}, 1)
	rootDER, err := x509.CreateCertificate(rand.Reader, rootTmpl, rootTmpl, &rootKey.PublicKey, rootKey)
	if err != nil {
		return nil, err
	}
	root, _ := x509.ParseCertificate(rootDER)
	interTmpl := validity(&x509.Certificate{Subject: intelName("Intel SGX PCK Platform CA"), IsCA: true, BasicConstraintsValid: true,
		MaxPathLenZero: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign}, 2)
	interDER, err := x509.CreateCertificate(rand.Reader, interTmpl, root, &interKey.PublicKey, rootKey)
	if err != nil {
		return nil, err
	}
	inter, _ := x509.ParseCertificate(interDER)
	// go-tdx-guest wants exactly Intel's six PCK extensions: authority
	// and subject key IDs, CRL distribution point, key usage, basic
	// constraints, SGX.
	pckTmpl := validity(&x509.Certificate{Subject: intelName("Intel SGX PCK Certificate"), BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageContentCommitment, SubjectKeyId: []byte{1, 2, 3, 4},
		CRLDistributionPoints: []string{"https://example.invalid/pckcrl"}, ExtraExtensions: []pkix.Extension{sgx}}, 3)
	pckDER, err := x509.CreateCertificate(rand.Reader, pckTmpl, inter, &pckKey.PublicKey, interKey)
	if err != nil {
		return nil, err
	}
	var chain []byte
	for _, der := range [][]byte{pckDER, interDER, rootDER} {
		chain = append(chain, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	}
	return &fakeIntel{root: root, pckKey: pckKey, attKey: attKey, chainPEM: chain, template: template}, nil
}

func (f *fakeIntel) roots() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(f.root)
	return p
}

// signRS signs digest and returns r||s, 32 bytes each.
func signRS(t testing.TB, key *ecdsa.PrivateKey, digest []byte) []byte {
	t.Helper()
	r, s, err := ecdsa.Sign(rand.Reader, key, digest)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]byte, 64)
	r.FillBytes(out[:32])
	s.FillBytes(out[32:])
	return out
}

// quote makes a signed v4 quote binding reportData: a non-debug TD
// whose RTMRs are what the OVMF event log fixture replays to. edit may
// change the body before it is signed.
func (f *fakeIntel) quote(t testing.TB, reportData []byte, edit func(*pb.TDQuoteBody)) []byte {
	t.Helper()
	q := proto.Clone(f.template).(*pb.QuoteV4)
	q.ExtraBytes = nil
	body := q.TdQuoteBody
	body.ReportData = append([]byte(nil), reportData...)
	body.TdAttributes = []byte{0, 0, 0, 0x10, 0, 0, 0, 0} // SEPT_VE_DISABLE, not DEBUG
	for i, h := range ovmfRTMRs {
		body.Rtmrs[i], _ = hex.DecodeString(h)
	}
	if edit != nil {
		edit(body)
	}
	header, err := abi.HeaderToAbiBytes(q.Header)
	if err != nil {
		t.Fatal(err)
	}
	bodyRaw, err := abi.TdQuoteBodyToAbiBytes(body)
	if err != nil {
		t.Fatal(err)
	}
	signed := sha256.Sum256(append(header, bodyRaw...))
	sd := q.SignedData
	sd.Signature = signRS(t, f.attKey, signed[:])
	sd.EcdsaAttestationKey = make([]byte, 64)
	f.attKey.PublicKey.X.FillBytes(sd.EcdsaAttestationKey[:32])
	f.attKey.PublicKey.Y.FillBytes(sd.EcdsaAttestationKey[32:])

	// The QE report binds the attestation key; the PCK key signs it.
	qe := sd.CertificationData.QeReportCertificationData
	binding := sha256.Sum256(append(append([]byte(nil), sd.EcdsaAttestationKey...), qe.QeAuthData.Data...))
	qe.QeReport.ReportData = append(binding[:], make([]byte, 32)...)
	qeRaw, err := abi.EnclaveReportToAbiBytes(qe.QeReport)
	if err != nil {
		t.Fatal(err)
	}
	qeDigest := sha256.Sum256(qeRaw)
	qe.QeReportSignature = signRS(t, f.pckKey, qeDigest[:])
	qe.PckCertificateChainData.PckCertChain = f.chainPEM
	qe.PckCertificateChainData.Size = uint32(len(f.chainPEM))
	sd.CertificationData.Size = uint32(len(qeRaw) + 64 + 2 + len(qe.QeAuthData.Data) + 6 + len(f.chainPEM))
	q.SignedDataSize = 128 + 6 + sd.CertificationData.Size
	raw, err := abi.QuoteToAbiBytes(q)
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

// evidenceJSON wraps a quote and an optional event log in Trustee's JSON.
func evidenceJSON(t testing.TB, quote, eventLog []byte) json.RawMessage {
	t.Helper()
	ev := evidence{Quote: base64.StdEncoding.EncodeToString(quote)}
	if eventLog != nil {
		s := base64.StdEncoding.EncodeToString(eventLog)
		ev.CCEventLog = &s
	}
	b, err := json.Marshal(ev)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func reportData(b byte) []byte {
	rd := make([]byte, 64)
	for i := range rd {
		rd[i] = b ^ byte(i)
	}
	return rd
}
