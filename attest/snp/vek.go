package snp

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"encoding/asn1"
	"fmt"
	"strings"

	"github.com/google/go-sev-guest/abi"
)

// vekExtensions are the AMD KDS extensions of a VCEK or VLEK certificate
// (AMD publication 57230). go-sev-guest v0.15 reads them too, but refuses
// a Turin VCEK (an 8-byte HWID, an FMC SPL); this reader takes both.
type vekExtensions struct {
	ProductName string
	TCB         TCB
	HasFMC      bool
	HWID        []byte // VCEK only: 64 bytes, or 8 on Turin
	CSPID       string // VLEK only
}

var amdOID = asn1.ObjectIdentifier{1, 3, 6, 1, 4, 1, 3704, 1}

func parseVEKExtensions(cert *x509.Certificate) (*vekExtensions, error) {
	var ext vekExtensions
	seen := map[string]bool{}
	for _, e := range cert.Extensions {
		if len(e.Id) <= len(amdOID) || !e.Id[:len(amdOID)].Equal(amdOID) {
			continue
		}
		id := e.Id[len(amdOID):].String()
		if seen[id] {
			return nil, fmt.Errorf("the certificate repeats AMD extension %s", e.Id)
		}
		seen[id] = true
		spl := func(dst *uint8) error {
			var v int
			if rest, err := asn1.Unmarshal(e.Value, &v); err != nil || len(rest) != 0 || v < 0 || v > 255 {
				return fmt.Errorf("AMD extension %s is not a security patch level 0-255", e.Id)
			}
			*dst = uint8(v)
			return nil
		}
		var err error
		switch id {
		case "2":
			_, err = asn1.UnmarshalWithParams(e.Value, &ext.ProductName, "ia5")
		case "3.1":
			err = spl(&ext.TCB.Bootloader)
		case "3.2":
			err = spl(&ext.TCB.TEE)
		case "3.3":
			err = spl(&ext.TCB.SNP)
		case "3.8":
			err = spl(&ext.TCB.Microcode)
		case "3.9":
			err = spl(&ext.TCB.FMC)
			ext.HasFMC = true
		case "4":
			// AMD's key server writes the HWID's bytes without an
			// OCTET STRING header; accept the header too.
			if n := len(e.Value); n == 64 || n == 8 {
				ext.HWID = e.Value
			} else {
				var rest []byte
				rest, err = asn1.Unmarshal(e.Value, &ext.HWID)
				if err == nil && len(rest) != 0 {
					err = fmt.Errorf("trailing bytes")
				}
			}
		case "5":
			_, err = asn1.UnmarshalWithParams(e.Value, &ext.CSPID, "ia5")
		}
		if err != nil {
			return nil, fmt.Errorf("AMD extension %s: %w", e.Id, err)
		}
	}
	for _, need := range []string{"2", "3.1", "3.2", "3.3", "3.8"} {
		if !seen[need] {
			return nil, fmt.Errorf("the certificate lacks AMD extension %s.%s", amdOID, need)
		}
	}
	return &ext, nil
}

// checkVEKCert checks what AMD's KDS specification says of every VCEK
// and VLEK, before any chain is built: the algorithms and the subject.
func checkVEKCert(cert *x509.Certificate, key abi.ReportSigner) (*vekExtensions, error) {
	if cert.SignatureAlgorithm != x509.SHA384WithRSAPSS {
		return nil, fmt.Errorf("%v certificate is signed with %v, not RSASSA-PSS with SHA-384", key, cert.SignatureAlgorithm)
	}
	pub, ok := cert.PublicKey.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P384() {
		return nil, fmt.Errorf("%v certificate does not hold an ECDSA P-384 key", key)
	}
	if want := "SEV-" + key.String(); cert.Subject.CommonName != want {
		return nil, fmt.Errorf("%v certificate subject is %q, not %q", key, cert.Subject.CommonName, want)
	}
	ext, err := parseVEKExtensions(cert)
	if err != nil {
		return nil, fmt.Errorf("%v certificate: %w", key, err)
	}
	switch key {
	case abi.VcekReportSigner:
		if len(ext.HWID) != 64 && len(ext.HWID) != 8 {
			return nil, fmt.Errorf("VCEK certificate has a %d-byte hardware ID, want 64 (8 on Turin)", len(ext.HWID))
		}
	case abi.VlekReportSigner:
		if ext.CSPID == "" || ext.HWID != nil {
			return nil, fmt.Errorf("VLEK certificate must name its cloud provider and no hardware ID")
		}
	}
	return ext, nil
}

// productLineOfName turns a KDS product name ("Milan-B0", "Genoa") into
// its product line.
func productLineOfName(name string) string {
	line, _, _ := strings.Cut(name, "-")
	return line
}
