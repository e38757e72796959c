package snp

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"

	"github.com/google/go-sev-guest/abi"
)

// This file maps the binary ATTESTATION_REPORT (1184 bytes, AMD SEV-SNP
// ABI spec 56860, table 23) to and from the JSON form Trustee sends: the
// serde form of the virtee `sev` crate's AttestationReport. The mapping
// must be exact both ways, because the report's signature covers the
// binary bytes and the JSON drops every reserved field: a verifier can
// only check a Trustee report by rebuilding its bytes.

// Offsets of the binary report.
const (
	offVersion         = 0x000
	offGuestSVN        = 0x004
	offPolicy          = 0x008
	offFamilyID        = 0x010
	offImageID         = 0x020
	offVMPL            = 0x030
	offSigAlgo         = 0x034
	offCurrentTCB      = 0x038
	offPlatInfo        = 0x040
	offKeyInfo         = 0x048
	offReportData      = 0x050
	offMeasurement     = 0x090
	offHostData        = 0x0C0
	offIDKeyDigest     = 0x0E0
	offAuthorKeyDigest = 0x110
	offReportID        = 0x140
	offReportIDMA      = 0x160
	offReportedTCB     = 0x180
	offCPUIDFam        = 0x188
	offCPUIDMod        = 0x189
	offCPUIDStep       = 0x18A
	offChipID          = 0x1A0
	offCommittedTCB    = 0x1E0
	offCurrentVersion  = 0x1E8 // build, minor, major, reserved
	offCommittedVer    = 0x1EC // build, minor, major, reserved
	offLaunchTCB       = 0x1F0
	offLaunchMitVector = 0x1F8 // report version 5 and later
	offCurrentMitVec   = 0x200 // report version 5 and later
	offSignature       = 0x2A0 // r (72 bytes LE), s (72 bytes LE), reserved
	sigComponentSize   = 72

	// turinFamily is the first CPUID family whose TCB_VERSION has the
	// Turin layout (an FMC field first).
	turinFamily = 0x1A
)

// reportJSON is the serde form of the sev crate's AttestationReport, field
// for field and in its order, so that marshalling a report made from a
// Trustee attester's JSON gives back the same bytes.
type reportJSON struct {
	Version         uint32      `json:"version"`
	GuestSVN        uint32      `json:"guest_svn"`
	Policy          uint64      `json:"policy"`
	FamilyID        byteArray   `json:"family_id"`
	ImageID         byteArray   `json:"image_id"`
	VMPL            uint32      `json:"vmpl"`
	SigAlgo         uint32      `json:"sig_algo"`
	CurrentTCB      tcbJSON     `json:"current_tcb"`
	PlatInfo        uint64      `json:"plat_info"`
	KeyInfo         uint32      `json:"key_info"`
	ReportData      byteArray   `json:"report_data"`
	Measurement     byteArray   `json:"measurement"`
	HostData        byteArray   `json:"host_data"`
	IDKeyDigest     byteArray   `json:"id_key_digest"`
	AuthorKeyDigest byteArray   `json:"author_key_digest"`
	ReportID        byteArray   `json:"report_id"`
	ReportIDMA      byteArray   `json:"report_id_ma"`
	ReportedTCB     tcbJSON     `json:"reported_tcb"`
	CPUIDFamID      *uint8      `json:"cpuid_fam_id"`
	CPUIDModID      *uint8      `json:"cpuid_mod_id"`
	CPUIDStep       *uint8      `json:"cpuid_step"`
	ChipID          byteArray   `json:"chip_id"`
	CommittedTCB    tcbJSON     `json:"committed_tcb"`
	Current         versionJSON `json:"current"`
	Committed       versionJSON `json:"committed"`
	LaunchTCB       tcbJSON     `json:"launch_tcb"`
	// Newer sev crates add the mitigation vectors of report version 5;
	// older ones (and reports before version 5) leave them out.
	LaunchMitVector  *uint64       `json:"launch_mit_vector,omitempty"`
	CurrentMitVector *uint64       `json:"current_mit_vector,omitempty"`
	Signature        signatureJSON `json:"signature"`
}

// tcbJSON is the sev crate's TcbVersion. FMC exists on Turin and later
// only; it is null for earlier products.
type tcbJSON struct {
	FMC        *uint8 `json:"fmc"`
	Bootloader uint8  `json:"bootloader"`
	TEE        uint8  `json:"tee"`
	SNP        uint8  `json:"snp"`
	Microcode  uint8  `json:"microcode"`
}

type versionJSON struct {
	Major uint8 `json:"major"`
	Minor uint8 `json:"minor"`
	Build uint8 `json:"build"`
}

type signatureJSON struct {
	R byteArray `json:"r"`
	S byteArray `json:"s"`
}

// byteArray is a byte string written as a JSON array of integers, as
// serde writes Rust arrays (encoding/json would write base64).
type byteArray []byte

func (b byteArray) MarshalJSON() ([]byte, error) {
	out := make([]byte, 0, 2+4*len(b))
	out = append(out, '[')
	for i, v := range b {
		if i > 0 {
			out = append(out, ',')
		}
		out = strconv.AppendUint(out, uint64(v), 10)
	}
	return append(out, ']'), nil
}

// UnmarshalJSON reads an array of integers 0-255. It scans the bytes
// itself: the report's arrays are most of the evidence, and going
// through encoding/json's reflection for each integer made parsing cost
// half as much as the report's signature check.
func (b *byteArray) UnmarshalJSON(data []byte) error {
	errNotBytes := errors.New("a byte field is not an array of integers 0-255")
	i := skipSpace(data, 0)
	if i >= len(data) || data[i] != '[' {
		return errNotBytes
	}
	out := make([]byte, 0, len(data)/3)
	i = skipSpace(data, i+1)
	if i < len(data) && data[i] == ']' {
		if skipSpace(data, i+1) != len(data) {
			return errNotBytes
		}
		*b = out
		return nil
	}
	for {
		start, v := i, 0
		for i < len(data) && data[i] >= '0' && data[i] <= '9' {
			v = v*10 + int(data[i]-'0')
			if v > 255 {
				return errNotBytes
			}
			i++
		}
		// JSON forbids leading zeros; serde never writes them.
		if i == start || (data[start] == '0' && i-start > 1) {
			return errNotBytes
		}
		out = append(out, byte(v))
		i = skipSpace(data, i)
		if i >= len(data) {
			return errNotBytes
		}
		if data[i] == ']' {
			break
		}
		if data[i] != ',' {
			return errNotBytes
		}
		i = skipSpace(data, i+1)
	}
	if skipSpace(data, i+1) != len(data) {
		return errNotBytes
	}
	*b = out
	return nil
}

func skipSpace(data []byte, i int) int {
	for i < len(data) && (data[i] == ' ' || data[i] == '\t' || data[i] == '\n' || data[i] == '\r') {
		i++
	}
	return i
}

// turinLayout says which TCB_VERSION layout a report uses, as the sev
// crate decides it: version 3 and later carry the CPU family; a
// version 2 report has no family, so a TCB with an FMC part says Turin.
func (r *reportJSON) turinLayout() bool {
	if r.Version >= 3 {
		return r.CPUIDFamID != nil && *r.CPUIDFamID >= turinFamily
	}
	for _, t := range []*tcbJSON{&r.CurrentTCB, &r.ReportedTCB, &r.CommittedTCB, &r.LaunchTCB} {
		if t.FMC != nil {
			return true
		}
	}
	return false
}

func (t tcbJSON) encode(turin bool) ([8]byte, error) {
	var b [8]byte
	if turin {
		if t.FMC != nil {
			b[0] = *t.FMC
		}
		b[1], b[2], b[3], b[7] = t.Bootloader, t.TEE, t.SNP, t.Microcode
		return b, nil
	}
	if t.FMC != nil {
		return b, errors.New("a TCB version has an FMC part, which only Turin and later CPUs have, on a pre-Turin report")
	}
	b[0], b[1], b[6], b[7] = t.Bootloader, t.TEE, t.SNP, t.Microcode
	return b, nil
}

func decodeTCB(b []byte, turin bool) tcbJSON {
	if turin {
		fmc := b[0]
		return tcbJSON{FMC: &fmc, Bootloader: b[1], TEE: b[2], SNP: b[3], Microcode: b[7]}
	}
	return tcbJSON{Bootloader: b[0], TEE: b[1], SNP: b[6], Microcode: b[7]}
}

// binary rebuilds the 1184-byte report. Reserved bytes are zero, as the
// firmware writes them.
func (r *reportJSON) binary() ([]byte, error) {
	fields := []struct {
		name string
		b    []byte
		size int
	}{
		{"family_id", r.FamilyID, abi.FamilyIDSize},
		{"image_id", r.ImageID, abi.ImageIDSize},
		{"report_data", r.ReportData, abi.ReportDataSize},
		{"measurement", r.Measurement, abi.MeasurementSize},
		{"host_data", r.HostData, abi.HostDataSize},
		{"id_key_digest", r.IDKeyDigest, abi.IDKeyDigestSize},
		{"author_key_digest", r.AuthorKeyDigest, abi.AuthorKeyDigestSize},
		{"report_id", r.ReportID, abi.ReportIDSize},
		{"report_id_ma", r.ReportIDMA, abi.ReportIDMASize},
		{"chip_id", r.ChipID, abi.ChipIDSize},
		{"signature.r", r.Signature.R, sigComponentSize},
		{"signature.s", r.Signature.S, sigComponentSize},
	}
	for _, f := range fields {
		if len(f.b) != f.size {
			return nil, fmt.Errorf("attestation_report.%s has %d bytes, want %d", f.name, len(f.b), f.size)
		}
	}
	if r.Version < abi.MinSupportedReportVersion || r.Version > abi.MaxSupportedReportVersion {
		return nil, fmt.Errorf("attestation_report.version is %d; versions %d to %d are supported",
			r.Version, abi.MinSupportedReportVersion, abi.MaxSupportedReportVersion)
	}
	if r.Version < abi.ReportVersion3 && (r.CPUIDFamID != nil || r.CPUIDModID != nil || r.CPUIDStep != nil) {
		return nil, fmt.Errorf("attestation_report has CPUID fields, which a version %d report lacks", r.Version)
	}
	if r.Version < abi.ReportVersion5 && (r.LaunchMitVector != nil || r.CurrentMitVector != nil) {
		return nil, fmt.Errorf("attestation_report has mitigation vectors, which a version %d report lacks", r.Version)
	}

	b := make([]byte, abi.ReportSize)
	le := binary.LittleEndian
	le.PutUint32(b[offVersion:], r.Version)
	le.PutUint32(b[offGuestSVN:], r.GuestSVN)
	le.PutUint64(b[offPolicy:], r.Policy)
	copy(b[offFamilyID:], r.FamilyID)
	copy(b[offImageID:], r.ImageID)
	le.PutUint32(b[offVMPL:], r.VMPL)
	le.PutUint32(b[offSigAlgo:], r.SigAlgo)
	le.PutUint64(b[offPlatInfo:], r.PlatInfo)
	le.PutUint32(b[offKeyInfo:], r.KeyInfo)
	copy(b[offReportData:], r.ReportData)
	copy(b[offMeasurement:], r.Measurement)
	copy(b[offHostData:], r.HostData)
	copy(b[offIDKeyDigest:], r.IDKeyDigest)
	copy(b[offAuthorKeyDigest:], r.AuthorKeyDigest)
	copy(b[offReportID:], r.ReportID)
	copy(b[offReportIDMA:], r.ReportIDMA)
	copy(b[offChipID:], r.ChipID)

	turin := r.turinLayout()
	for _, t := range []struct {
		name string
		off  int
		tcb  tcbJSON
	}{
		{"current_tcb", offCurrentTCB, r.CurrentTCB},
		{"reported_tcb", offReportedTCB, r.ReportedTCB},
		{"committed_tcb", offCommittedTCB, r.CommittedTCB},
		{"launch_tcb", offLaunchTCB, r.LaunchTCB},
	} {
		enc, err := t.tcb.encode(turin)
		if err != nil {
			return nil, fmt.Errorf("attestation_report.%s: %w", t.name, err)
		}
		copy(b[t.off:], enc[:])
	}
	if r.Version >= abi.ReportVersion3 {
		for off, v := range map[int]*uint8{offCPUIDFam: r.CPUIDFamID, offCPUIDMod: r.CPUIDModID, offCPUIDStep: r.CPUIDStep} {
			if v != nil {
				b[off] = *v
			}
		}
	}
	b[offCurrentVersion], b[offCurrentVersion+1], b[offCurrentVersion+2] = r.Current.Build, r.Current.Minor, r.Current.Major
	b[offCommittedVer], b[offCommittedVer+1], b[offCommittedVer+2] = r.Committed.Build, r.Committed.Minor, r.Committed.Major
	if r.LaunchMitVector != nil {
		le.PutUint64(b[offLaunchMitVector:], *r.LaunchMitVector)
	}
	if r.CurrentMitVector != nil {
		le.PutUint64(b[offCurrentMitVec:], *r.CurrentMitVector)
	}
	copy(b[offSignature:], r.Signature.R)
	copy(b[offSignature+sigComponentSize:], r.Signature.S)
	return b, nil
}

// reportFromBinary is the inverse of binary: what a Trustee attester
// would send for raw. It refuses reports whose reserved bytes are not
// zero, since the JSON could not carry them.
func reportFromBinary(raw []byte) (*reportJSON, error) {
	if len(raw) != abi.ReportSize {
		return nil, fmt.Errorf("an SEV-SNP report has %d bytes, got %d", abi.ReportSize, len(raw))
	}
	if _, err := abi.ReportToProto(raw); err != nil {
		return nil, fmt.Errorf("malformed SEV-SNP report: %w", err)
	}
	le := binary.LittleEndian
	clone := func(off, n int) byteArray { return append(byteArray(nil), raw[off:off+n]...) }
	r := &reportJSON{
		Version:         le.Uint32(raw[offVersion:]),
		GuestSVN:        le.Uint32(raw[offGuestSVN:]),
		Policy:          le.Uint64(raw[offPolicy:]),
		FamilyID:        clone(offFamilyID, abi.FamilyIDSize),
		ImageID:         clone(offImageID, abi.ImageIDSize),
		VMPL:            le.Uint32(raw[offVMPL:]),
		SigAlgo:         le.Uint32(raw[offSigAlgo:]),
		PlatInfo:        le.Uint64(raw[offPlatInfo:]),
		KeyInfo:         le.Uint32(raw[offKeyInfo:]),
		ReportData:      clone(offReportData, abi.ReportDataSize),
		Measurement:     clone(offMeasurement, abi.MeasurementSize),
		HostData:        clone(offHostData, abi.HostDataSize),
		IDKeyDigest:     clone(offIDKeyDigest, abi.IDKeyDigestSize),
		AuthorKeyDigest: clone(offAuthorKeyDigest, abi.AuthorKeyDigestSize),
		ReportID:        clone(offReportID, abi.ReportIDSize),
		ReportIDMA:      clone(offReportIDMA, abi.ReportIDMASize),
		ChipID:          clone(offChipID, abi.ChipIDSize),
		Current:         versionJSON{Build: raw[offCurrentVersion], Minor: raw[offCurrentVersion+1], Major: raw[offCurrentVersion+2]},
		Committed:       versionJSON{Build: raw[offCommittedVer], Minor: raw[offCommittedVer+1], Major: raw[offCommittedVer+2]},
		Signature: signatureJSON{
			R: clone(offSignature, sigComponentSize),
			S: clone(offSignature+sigComponentSize, sigComponentSize),
		},
	}
	var turin bool
	if r.Version >= abi.ReportVersion3 {
		fam, mod, step := raw[offCPUIDFam], raw[offCPUIDMod], raw[offCPUIDStep]
		r.CPUIDFamID, r.CPUIDModID, r.CPUIDStep = &fam, &mod, &step
		turin = fam >= turinFamily
	} else {
		// As the sev crate does: a version 2 report has no CPU family,
		// but a Turin chip ID uses only its first 8 bytes.
		chip := raw[offChipID : offChipID+abi.ChipIDSize]
		turin = !allZero(chip) && allZero(chip[8:])
	}
	r.CurrentTCB = decodeTCB(raw[offCurrentTCB:offCurrentTCB+8], turin)
	r.ReportedTCB = decodeTCB(raw[offReportedTCB:offReportedTCB+8], turin)
	r.CommittedTCB = decodeTCB(raw[offCommittedTCB:offCommittedTCB+8], turin)
	r.LaunchTCB = decodeTCB(raw[offLaunchTCB:offLaunchTCB+8], turin)
	if r.Version >= abi.ReportVersion5 {
		lmv, cmv := le.Uint64(raw[offLaunchMitVector:]), le.Uint64(raw[offCurrentMitVec:])
		r.LaunchMitVector, r.CurrentMitVector = &lmv, &cmv
	}
	// The JSON cannot carry bytes the TCB layout leaves reserved; a
	// report with any set there would not survive the round trip.
	back, err := r.binary()
	if err != nil {
		return nil, err
	}
	if !bytes.Equal(back, raw) {
		return nil, errors.New("the report has non-zero reserved bytes that Trustee's JSON form cannot carry")
	}
	return r, nil
}

func allZero(b []byte) bool {
	for _, v := range b {
		if v != 0 {
			return false
		}
	}
	return true
}
