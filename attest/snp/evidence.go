package snp

import (
	"encoding/json"
	"errors"
	"fmt"

	"github.com/cwrun/cwrun/attest/internal/jsonx"
	"github.com/google/go-sev-guest/abi"
	"github.com/google/uuid"
)

// evidence is Trustee's `snp` primary evidence.
type evidence struct {
	Report    *reportJSON `json:"attestation_report"`
	CertChain []certEntry `json:"cert_chain"` // null when the host gave none
}

// certEntry is the sev crate's CertTableEntry. Its cert_type is serde's
// form of the CertType enum: a string for the named kinds ("VCEK",
// "VLEK", "ASK", "ARK", "ASVK", "CRL", "Empty") and {"OTHER":"<uuid>"}
// for the rest.
type certEntry struct {
	Type certType  `json:"cert_type"`
	Data byteArray `json:"data"`
}

type certType struct {
	Name  string // "VCEK", ...; "OTHER" with GUID set
	Other string
}

func (c certType) MarshalJSON() ([]byte, error) {
	if c.Name == "OTHER" {
		return json.Marshal(map[string]string{"OTHER": c.Other})
	}
	return json.Marshal(c.Name)
}

func (c *certType) UnmarshalJSON(data []byte) error {
	if len(data) > 0 && data[0] == '"' {
		return json.Unmarshal(data, &c.Name)
	}
	var other struct {
		Other *string `json:"OTHER"`
	}
	if err := json.Unmarshal(data, &other); err != nil || other.Other == nil {
		return errors.New(`cert_type is neither a name ("VCEK") nor {"OTHER":"<uuid>"}`)
	}
	c.Name, c.Other = "OTHER", *other.Other
	return nil
}

// maxEvidence bounds what is parsed: a report and a handful of
// certificates fit in well under 100 KiB even as JSON integer arrays.
const maxEvidence = 1 << 20

// parseEvidence reads Trustee's JSON and returns it with the binary
// report it stands for.
func parseEvidence(data []byte) (*evidence, []byte, error) {
	if len(data) > maxEvidence {
		return nil, nil, fmt.Errorf("evidence is %d bytes, more than %d", len(data), maxEvidence)
	}
	var ev evidence
	// A field cwrun does not know might be one the signature covers:
	// refuse it by name rather than fail later with a bad signature.
	if err := ev.read(jsonx.NewReader(data)); err != nil {
		return nil, nil, fmt.Errorf("not Trustee snp evidence: %w", err)
	}
	if ev.Report == nil {
		return nil, nil, errors.New("not Trustee snp evidence: no attestation_report")
	}
	raw, err := ev.Report.binary()
	if err != nil {
		return nil, nil, err
	}
	return &ev, raw, nil
}

// cert returns the DER of the first certificate of the given type.
func (ev *evidence) cert(name string) []byte {
	for _, c := range ev.CertChain {
		if c.Type.Name == name {
			return c.Data
		}
	}
	return nil
}

// guidNames maps the GHCB certificate table's GUIDs to the sev crate's
// names. ASVK has no assigned GUID (go-sev-guest's placeholder is the
// zero GUID, which ends a table), so it never comes from a device.
var guidNames = map[string]string{
	abi.VcekGUID: "VCEK",
	abi.VlekGUID: "VLEK",
	abi.AskGUID:  "ASK",
	abi.ArkGUID:  "ARK",
}

// evidenceFromQuote makes Trustee evidence from what a go-sev-guest
// QuoteProvider returns: the report followed by the host's certificate
// table, if any.
func evidenceFromQuote(quote []byte) ([]byte, error) {
	if len(quote) < abi.ReportSize {
		return nil, fmt.Errorf("the SEV-SNP device returned %d bytes, less than a report (%d)", len(quote), abi.ReportSize)
	}
	report, err := reportFromBinary(quote[:abi.ReportSize])
	if err != nil {
		return nil, err
	}
	ev := evidence{Report: report}
	if table := quote[abi.ReportSize:]; len(table) > 0 {
		var certs abi.CertTable
		if err := certs.Unmarshal(table); err != nil {
			return nil, fmt.Errorf("the host's certificate table: %w", err)
		}
		for _, e := range certs.Entries {
			// go-sev-guest appends its own platform-info entry; it is
			// no certificate and Trustee does not know it. A zero GUID
			// ends a GHCB table (go-sev-guest's fakes file the ASVK
			// under it); the verifier trusts no ASVK from evidence.
			if e.GUID == uuid.MustParse(abi.ExtraPlatformInfoGUID) || e.GUID == (uuid.UUID{}) {
				continue
			}
			t := certType{Name: guidNames[e.GUID.String()]}
			if t.Name == "" {
				t = certType{Name: "OTHER", Other: e.GUID.String()}
			}
			ev.CertChain = append(ev.CertChain, certEntry{Type: t, Data: e.RawCert})
		}
	}
	return ev.appendJSON(make([]byte, 0, 4*(abi.ReportSize+len(quote)))), nil
}
