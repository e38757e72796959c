package snp

import (
	"fmt"
	"math"
	"slices"
	"strconv"

	"github.com/cwrun/cwrun/attest/internal/jsonx"
)

// Trustee's snp evidence, read and written without reflection. Most of
// a document is byte arrays written as JSON integer arrays (a report
// and two or three certificates: 10-30 KiB); encoding/json scanned it
// three times and cost about as much as the report's P-384 signature
// check. The reader keeps the strictness of the encoding/json decoding
// it replaces (unknown members refused, one value, byte arrays of
// integers 0-255) and is stricter in two ways serde also is: member
// names match exactly, and null is refused where the field is not
// optional. The struct tags stay the reference: tests compare both
// ways against encoding/json.

// read reads the whole document into ev.
func (ev *evidence) read(r *jsonx.Reader) error {
	err := r.Object(func(name string) error {
		switch name {
		case "attestation_report":
			if r.Null() {
				ev.Report = nil
				return nil
			}
			// A repeated member updates the same report, as
			// encoding/json's decoding into the same pointer does.
			if ev.Report == nil {
				ev.Report = &reportJSON{}
			}
			return ev.Report.read(r)
		case "cert_chain":
			if r.Null() {
				ev.CertChain = nil
				return nil
			}
			n := 0
			err := r.Array(func() error {
				if n == len(ev.CertChain) {
					ev.CertChain = append(ev.CertChain, certEntry{})
				}
				n++
				return ev.CertChain[n-1].read(r)
			})
			if err != nil {
				return err
			}
			ev.CertChain = ev.CertChain[:n]
			if ev.CertChain == nil {
				ev.CertChain = []certEntry{}
			}
			return nil
		}
		return unknown(name)
	})
	if err != nil {
		return err
	}
	return r.End()
}

func unknown(name string) error {
	return fmt.Errorf("unknown field %q", name)
}

func (c *certEntry) read(r *jsonx.Reader) error {
	return r.Object(func(name string) error {
		switch name {
		case "cert_type":
			return c.Type.read(r)
		case "data":
			b, err := r.Bytes()
			if err != nil {
				return fmt.Errorf("cert_chain data: %w", err)
			}
			c.Data = b
			return nil
		}
		return unknown(name)
	})
}

func (c *certType) read(r *jsonx.Reader) error {
	if r.Peek() == '"' {
		s, err := r.String()
		c.Name = s
		return err
	}
	var other *string
	err := r.Object(func(name string) error {
		if name != "OTHER" {
			return r.Skip()
		}
		if r.Null() {
			other = nil
			return nil
		}
		s, err := r.String()
		other = &s
		return err
	})
	if err != nil || other == nil {
		return fmt.Errorf(`cert_type is neither a name ("VCEK") nor {"OTHER":"<uuid>"}`)
	}
	c.Name, c.Other = "OTHER", *other
	return nil
}

func (rep *reportJSON) read(r *jsonx.Reader) error {
	return r.Object(func(name string) error {
		switch name {
		case "version":
			return readUint32(r, &rep.Version)
		case "guest_svn":
			return readUint32(r, &rep.GuestSVN)
		case "policy":
			return readUint64(r, &rep.Policy)
		case "family_id":
			return readBytes(r, &rep.FamilyID)
		case "image_id":
			return readBytes(r, &rep.ImageID)
		case "vmpl":
			return readUint32(r, &rep.VMPL)
		case "sig_algo":
			return readUint32(r, &rep.SigAlgo)
		case "current_tcb":
			return rep.CurrentTCB.read(r)
		case "plat_info":
			return readUint64(r, &rep.PlatInfo)
		case "key_info":
			return readUint32(r, &rep.KeyInfo)
		case "report_data":
			return readBytes(r, &rep.ReportData)
		case "measurement":
			return readBytes(r, &rep.Measurement)
		case "host_data":
			return readBytes(r, &rep.HostData)
		case "id_key_digest":
			return readBytes(r, &rep.IDKeyDigest)
		case "author_key_digest":
			return readBytes(r, &rep.AuthorKeyDigest)
		case "report_id":
			return readBytes(r, &rep.ReportID)
		case "report_id_ma":
			return readBytes(r, &rep.ReportIDMA)
		case "reported_tcb":
			return rep.ReportedTCB.read(r)
		case "cpuid_fam_id":
			return readOptUint8(r, &rep.CPUIDFamID)
		case "cpuid_mod_id":
			return readOptUint8(r, &rep.CPUIDModID)
		case "cpuid_step":
			return readOptUint8(r, &rep.CPUIDStep)
		case "chip_id":
			return readBytes(r, &rep.ChipID)
		case "committed_tcb":
			return rep.CommittedTCB.read(r)
		case "current":
			return rep.Current.read(r)
		case "committed":
			return rep.Committed.read(r)
		case "launch_tcb":
			return rep.LaunchTCB.read(r)
		case "launch_mit_vector":
			return readOptUint64(r, &rep.LaunchMitVector)
		case "current_mit_vector":
			return readOptUint64(r, &rep.CurrentMitVector)
		case "signature":
			return r.Object(func(name string) error {
				switch name {
				case "r":
					return readBytes(r, &rep.Signature.R)
				case "s":
					return readBytes(r, &rep.Signature.S)
				}
				return unknown(name)
			})
		}
		return unknown(name)
	})
}

func (t *tcbJSON) read(r *jsonx.Reader) error {
	return r.Object(func(name string) error {
		switch name {
		case "fmc":
			return readOptUint8(r, &t.FMC)
		case "bootloader":
			return readUint8(r, &t.Bootloader)
		case "tee":
			return readUint8(r, &t.TEE)
		case "snp":
			return readUint8(r, &t.SNP)
		case "microcode":
			return readUint8(r, &t.Microcode)
		}
		return unknown(name)
	})
}

func (v *versionJSON) read(r *jsonx.Reader) error {
	return r.Object(func(name string) error {
		switch name {
		case "major":
			return readUint8(r, &v.Major)
		case "minor":
			return readUint8(r, &v.Minor)
		case "build":
			return readUint8(r, &v.Build)
		}
		return unknown(name)
	})
}

func readBytes(r *jsonx.Reader, dst *byteArray) error {
	b, err := r.Bytes()
	if err != nil {
		return err
	}
	*dst = b
	return nil
}

func readUint8(r *jsonx.Reader, dst *uint8) error {
	v, err := r.Uint(math.MaxUint8)
	*dst = uint8(v)
	return err
}

func readUint32(r *jsonx.Reader, dst *uint32) error {
	v, err := r.Uint(math.MaxUint32)
	*dst = uint32(v)
	return err
}

func readUint64(r *jsonx.Reader, dst *uint64) error {
	v, err := r.Uint(math.MaxUint64)
	*dst = v
	return err
}

func readOptUint8(r *jsonx.Reader, dst **uint8) error {
	if r.Null() {
		*dst = nil
		return nil
	}
	v, err := r.Uint(math.MaxUint8)
	b := uint8(v)
	*dst = &b
	return err
}

func readOptUint64(r *jsonx.Reader, dst **uint64) error {
	if r.Null() {
		*dst = nil
		return nil
	}
	v, err := r.Uint(math.MaxUint64)
	*dst = &v
	return err
}

// appendJSON writes ev exactly as json.Marshal writes it (the struct
// tags' names and order, byte arrays as integer arrays), without
// reflection or the re-validation encoding/json does of every
// MarshalJSON result.
func (ev *evidence) appendJSON(dst []byte) []byte {
	dst = append(dst, `{"attestation_report":`...)
	if ev.Report == nil {
		dst = append(dst, "null"...)
	} else {
		dst = ev.Report.appendJSON(dst)
	}
	dst = append(dst, `,"cert_chain":`...)
	if ev.CertChain == nil {
		dst = append(dst, "null"...)
	} else {
		dst = append(dst, '[')
		for i, c := range ev.CertChain {
			if i > 0 {
				dst = append(dst, ',')
			}
			dst = append(dst, `{"cert_type":`...)
			if c.Type.Name == "OTHER" {
				dst = append(dst, `{"OTHER":`...)
				dst = jsonx.AppendString(dst, c.Type.Other)
				dst = append(dst, '}')
			} else {
				dst = jsonx.AppendString(dst, c.Type.Name)
			}
			dst = append(dst, `,"data":`...)
			dst = appendBytes(dst, c.Data)
			dst = append(dst, '}')
		}
		dst = append(dst, ']')
	}
	return append(dst, '}')
}

func (rep *reportJSON) appendJSON(dst []byte) []byte {
	u := func(dst []byte, name string, v uint64) []byte {
		dst = append(dst, name...)
		return strconv.AppendUint(dst, v, 10)
	}
	opt8 := func(dst []byte, name string, v *uint8) []byte {
		dst = append(dst, name...)
		if v == nil {
			return append(dst, "null"...)
		}
		return strconv.AppendUint(dst, uint64(*v), 10)
	}
	bytes := func(dst []byte, name string, b byteArray) []byte {
		return appendBytes(append(dst, name...), b)
	}
	dst = u(dst, `{"version":`, uint64(rep.Version))
	dst = u(dst, `,"guest_svn":`, uint64(rep.GuestSVN))
	dst = u(dst, `,"policy":`, rep.Policy)
	dst = bytes(dst, `,"family_id":`, rep.FamilyID)
	dst = bytes(dst, `,"image_id":`, rep.ImageID)
	dst = u(dst, `,"vmpl":`, uint64(rep.VMPL))
	dst = u(dst, `,"sig_algo":`, uint64(rep.SigAlgo))
	dst = rep.CurrentTCB.appendJSON(append(dst, `,"current_tcb":`...))
	dst = u(dst, `,"plat_info":`, rep.PlatInfo)
	dst = u(dst, `,"key_info":`, uint64(rep.KeyInfo))
	dst = bytes(dst, `,"report_data":`, rep.ReportData)
	dst = bytes(dst, `,"measurement":`, rep.Measurement)
	dst = bytes(dst, `,"host_data":`, rep.HostData)
	dst = bytes(dst, `,"id_key_digest":`, rep.IDKeyDigest)
	dst = bytes(dst, `,"author_key_digest":`, rep.AuthorKeyDigest)
	dst = bytes(dst, `,"report_id":`, rep.ReportID)
	dst = bytes(dst, `,"report_id_ma":`, rep.ReportIDMA)
	dst = rep.ReportedTCB.appendJSON(append(dst, `,"reported_tcb":`...))
	dst = opt8(dst, `,"cpuid_fam_id":`, rep.CPUIDFamID)
	dst = opt8(dst, `,"cpuid_mod_id":`, rep.CPUIDModID)
	dst = opt8(dst, `,"cpuid_step":`, rep.CPUIDStep)
	dst = bytes(dst, `,"chip_id":`, rep.ChipID)
	dst = rep.CommittedTCB.appendJSON(append(dst, `,"committed_tcb":`...))
	dst = rep.Current.appendJSON(append(dst, `,"current":`...))
	dst = rep.Committed.appendJSON(append(dst, `,"committed":`...))
	dst = rep.LaunchTCB.appendJSON(append(dst, `,"launch_tcb":`...))
	if rep.LaunchMitVector != nil {
		dst = u(dst, `,"launch_mit_vector":`, *rep.LaunchMitVector)
	}
	if rep.CurrentMitVector != nil {
		dst = u(dst, `,"current_mit_vector":`, *rep.CurrentMitVector)
	}
	dst = bytes(dst, `,"signature":{"r":`, rep.Signature.R)
	dst = bytes(dst, `,"s":`, rep.Signature.S)
	return append(dst, '}', '}')
}

func (t *tcbJSON) appendJSON(dst []byte) []byte {
	dst = append(dst, `{"fmc":`...)
	if t.FMC == nil {
		dst = append(dst, "null"...)
	} else {
		dst = strconv.AppendUint(dst, uint64(*t.FMC), 10)
	}
	dst = strconv.AppendUint(append(dst, `,"bootloader":`...), uint64(t.Bootloader), 10)
	dst = strconv.AppendUint(append(dst, `,"tee":`...), uint64(t.TEE), 10)
	dst = strconv.AppendUint(append(dst, `,"snp":`...), uint64(t.SNP), 10)
	dst = strconv.AppendUint(append(dst, `,"microcode":`...), uint64(t.Microcode), 10)
	return append(dst, '}')
}

func (v *versionJSON) appendJSON(dst []byte) []byte {
	dst = strconv.AppendUint(append(dst, `{"major":`...), uint64(v.Major), 10)
	dst = strconv.AppendUint(append(dst, `,"minor":`...), uint64(v.Minor), 10)
	dst = strconv.AppendUint(append(dst, `,"build":`...), uint64(v.Build), 10)
	return append(dst, '}')
}

// appendBytes writes b as serde writes a byte array (and as
// byteArray.MarshalJSON does, nil included).
func appendBytes(dst []byte, b byteArray) []byte {
	dst = slices.Grow(dst, 2+4*len(b))
	dst = append(dst, '[')
	for i, v := range b {
		if i > 0 {
			dst = append(dst, ',')
		}
		switch {
		case v >= 100:
			dst = append(dst, '0'+v/100, '0'+v/10%10, '0'+v%10)
		case v >= 10:
			dst = append(dst, '0'+v/10, '0'+v%10)
		default:
			dst = append(dst, '0'+v)
		}
	}
	return append(dst, ']')
}
