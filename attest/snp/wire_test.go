package snp

import (
	"bytes"
	"encoding/json"
	"errors"
	"reflect"
	"testing"

	"github.com/cwrun/cwrun/attest/internal/jsonx"
)

// refParseEvidence is the encoding/json reading the hand-written reader
// replaced: the reference it is held to.
func refParseEvidence(data []byte) (*evidence, error) {
	var ev evidence
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&ev); err != nil {
		return nil, err
	}
	if dec.More() {
		return nil, errors.New("trailing data")
	}
	// Decoder.More accepts trailing non-JSON after whitespace; check
	// what is left, as json.Unmarshal would.
	rest := data[dec.InputOffset():]
	if len(bytes.TrimSpace(rest)) != 0 {
		return nil, errors.New("trailing data")
	}
	return &ev, nil
}

// FuzzEvidenceReader: what the reader accepts, encoding/json accepts
// too and reads the same way.
func FuzzEvidenceReader(f *testing.F) {
	f.Add(readFile(f, "snp-evidence.json"))
	s := newSigner(f, false)
	f.Add([]byte(evidenceJSON(f, fakeReport(f, s, reportData(1), nil), "VCEK", s.Vcek.Raw)))
	f.Add([]byte(`{"attestation_report":{"version":2},"cert_chain":null}`))
	f.Add([]byte(`{"attestation_report":{"version":2},"attestation_report":{"guest_svn":3},"cert_chain":[]}`))
	f.Add([]byte(`{"attestation_report":null,"cert_chain":[{"cert_type":{"OTHER":"x","y":1},"data":[1,2]},{"cert_type":"VCEK"}]}`))
	f.Add([]byte(`{"attestation_report":{"current_tcb":{"fmc":null,"bootloader":1},"cpuid_fam_id":25,"launch_mit_vector":18446744073709551615}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		var ev evidence
		if err := ev.read(jsonx.NewReader(data)); err != nil {
			return
		}
		ref, err := refParseEvidence(data)
		if err != nil {
			t.Fatalf("the reader accepts what encoding/json refuses (%v):\n%s", err, data)
		}
		if !reflect.DeepEqual(&ev, ref) {
			t.Fatalf("the reader and encoding/json disagree on\n%s\nreader: %+v\nencoding/json: %+v", data, ev, *ref)
		}
	})
}

// TestEvidenceReaderReadsRealEvidence: on the evidence a real Trustee
// guest sent, the reader and encoding/json agree.
func TestEvidenceReaderReadsRealEvidence(t *testing.T) {
	data := readFile(t, "snp-evidence.json")
	ev, _, err := parseEvidence(data)
	if err != nil {
		t.Fatal(err)
	}
	ref, err := refParseEvidence(data)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(ev, ref) {
		t.Fatalf("reader: %+v\nencoding/json: %+v", ev, ref)
	}
}

// TestEvidenceWriterMatchesEncodingJSON: appendJSON writes what
// json.Marshal writes, byte for byte, for real and fake evidence.
func TestEvidenceWriterMatchesEncodingJSON(t *testing.T) {
	s := newSigner(t, false)
	docs := [][]byte{
		readFile(t, "snp-evidence.json"),
		[]byte(evidenceJSON(t, fakeReport(t, s, reportData(1), nil), "VCEK", s.Vcek.Raw)),
	}
	for _, d := range docs {
		ev, _, err := parseEvidence(d)
		if err != nil {
			t.Fatal(err)
		}
		ev.CertChain = append(ev.CertChain, certEntry{Type: certType{Name: "OTHER", Other: "a<b>"}, Data: nil})
		want, err := json.Marshal(ev)
		if err != nil {
			t.Fatal(err)
		}
		if got := ev.appendJSON(nil); !bytes.Equal(got, want) {
			t.Fatalf("appendJSON differs from json.Marshal:\n got %s\nwant %s", got, want)
		}
		ev.CertChain = nil
		want, _ = json.Marshal(ev)
		if got := ev.appendJSON(nil); !bytes.Equal(got, want) {
			t.Fatalf("appendJSON without certificates differs:\n got %s\nwant %s", got, want)
		}
	}
}
