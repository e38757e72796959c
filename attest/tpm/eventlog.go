package tpm

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"sort"
	"strings"
)

// Event types of the TCG PC Client Platform Firmware Profile that the
// log parser and explanations name.
const (
	EvNoAction                    = 0x00000003
	EvSeparator                   = 0x00000004
	EvAction                      = 0x00000005
	EvEventTag                    = 0x00000006
	EvSCRTMContents               = 0x00000007
	EvSCRTMVersion                = 0x00000008
	EvPlatformConfigFlags         = 0x0000000a
	EvIPL                         = 0x0000000d
	EvEFIVariableDriverConfig     = 0x80000001
	EvEFIVariableBoot             = 0x80000002
	EvEFIBootServicesApplication  = 0x80000003
	EvEFIBootServicesDriver       = 0x80000004
	EvEFIRuntimeServicesDriver    = 0x80000005
	EvEFIGPTEvent                 = 0x80000006
	EvEFIAction                   = 0x80000007
	EvEFIPlatformFirmwareBlob     = 0x80000008
	EvEFIHandoffTables            = 0x80000009
	EvEFIPlatformFirmwareBlob2    = 0x8000000a
	EvEFIHandoffTables2           = 0x8000000b
	EvEFIVariableBoot2            = 0x8000000c
	EvEFIVariableAuthority        = 0x800000e0
	linuxInitrdTag                = 0x8f3b22ec // Linux EFI stub: INITRD_EVENT_TAG_ID
	linuxLoadOptionsTag           = 0x8f3b22ed // Linux EFI stub: LOAD_OPTIONS_EVENT_TAG_ID
	specIDSignature               = "Spec ID Event03\x00"
	startupLocalitySignature      = "StartupLocality\x00"
	maxEventData                  = 1 << 24 // no firmware event is near 16 MiB; bounds hostile sizes
	maxAlgorithmsInSpecID         = 16
	sha256Size                    = sha256.Size
	eventLogSHA1HeaderDigestBytes = 20
)

var eventTypeNames = map[uint32]string{
	0x0: "EV_PREBOOT_CERT", 0x1: "EV_POST_CODE", EvNoAction: "EV_NO_ACTION",
	EvSeparator: "EV_SEPARATOR", EvAction: "EV_ACTION", EvEventTag: "EV_EVENT_TAG",
	EvSCRTMContents: "EV_S_CRTM_CONTENTS", EvSCRTMVersion: "EV_S_CRTM_VERSION",
	0x9: "EV_CPU_MICROCODE", EvPlatformConfigFlags: "EV_PLATFORM_CONFIG_FLAGS",
	0xb: "EV_TABLE_OF_DEVICES", 0xc: "EV_COMPACT_HASH", EvIPL: "EV_IPL",
	0xe: "EV_IPL_PARTITION_DATA", 0xf: "EV_NONHOST_CODE", 0x10: "EV_NONHOST_CONFIG",
	0x11: "EV_NONHOST_INFO", 0x12: "EV_OMIT_BOOT_DEVICE_EVENTS",
	EvEFIVariableDriverConfig: "EV_EFI_VARIABLE_DRIVER_CONFIG", EvEFIVariableBoot: "EV_EFI_VARIABLE_BOOT",
	EvEFIBootServicesApplication: "EV_EFI_BOOT_SERVICES_APPLICATION",
	EvEFIBootServicesDriver:      "EV_EFI_BOOT_SERVICES_DRIVER", EvEFIRuntimeServicesDriver: "EV_EFI_RUNTIME_SERVICES_DRIVER",
	EvEFIGPTEvent: "EV_EFI_GPT_EVENT", EvEFIAction: "EV_EFI_ACTION",
	EvEFIPlatformFirmwareBlob: "EV_EFI_PLATFORM_FIRMWARE_BLOB", EvEFIHandoffTables: "EV_EFI_HANDOFF_TABLES",
	EvEFIPlatformFirmwareBlob2: "EV_EFI_PLATFORM_FIRMWARE_BLOB2", EvEFIHandoffTables2: "EV_EFI_HANDOFF_TABLES2",
	EvEFIVariableBoot2: "EV_EFI_VARIABLE_BOOT2", 0x80000010: "EV_EFI_HCRTM_EVENT",
	EvEFIVariableAuthority: "EV_EFI_VARIABLE_AUTHORITY",
}

// EventTypeName is the specification's name for an event type.
func EventTypeName(t uint32) string {
	if n, ok := eventTypeNames[t]; ok {
		return n
	}
	return fmt.Sprintf("event type %#x", t)
}

// Event is one measurement of a crypto-agile (TCG_PCR_EVENT2) log.
type Event struct {
	Seq    int    // position in the log, from 0 (the Spec ID header)
	PCR    uint32 // PCR index
	Type   uint32 // event type (EvSeparator, EvEFIBootServicesApplication...)
	SHA256 []byte // the SHA-256 bank's digest; nil for the SHA-1 format header
	Data   []byte // the event data as logged (not necessarily what was hashed)
}

// What names the event as a person reading a denial wants it: "kernel",
// "initrd", "cmdline" for what the boot chain loads, else the
// specification's type name.
func (e Event) What() string {
	switch {
	case e.PCR == 4 && e.Type == EvEFIBootServicesApplication:
		return "boot application (kernel)"
	case e.Type == EvEventTag && len(e.Data) >= 4:
		switch binary.LittleEndian.Uint32(e.Data) {
		case linuxInitrdTag:
			return "initrd"
		case linuxLoadOptionsTag:
			return "cmdline"
		}
	case e.Type == EvEFIAction || e.Type == EvAction:
		return fmt.Sprintf("%s %q", EventTypeName(e.Type), printable(e.Data))
	}
	return EventTypeName(e.Type)
}

// EventLog is a parsed TCG PC Client crypto-agile event log, the format
// of /sys/kernel/security/tpm0/binary_bios_measurements.
type EventLog struct {
	Events []Event
	// DigestSizes are the banks the log records, TPM_ALG_ID → size, from
	// its Spec ID header.
	DigestSizes map[uint16]int
	// StartupLocality is the locality PCR 0 was reset in (it becomes
	// PCR 0's last initial byte); 0 without a StartupLocality event.
	StartupLocality uint8
}

// ParseEventLog parses a crypto-agile event log. Trailing zero bytes
// (the rest of a preallocated log area) are ignored.
func ParseEventLog(b []byte) (*EventLog, error) {
	// The header is a TCG_PCR_EVENT (SHA-1 format), little-endian.
	if len(b) < 32 {
		return nil, errors.New("event log shorter than its header event")
	}
	le := binary.LittleEndian
	pcr, typ := le.Uint32(b[0:]), le.Uint32(b[4:])
	size := le.Uint32(b[28:])
	if typ != EvNoAction || pcr != 0 {
		return nil, fmt.Errorf("event log's first event is %s in PCR %d, want the EV_NO_ACTION Spec ID header (is it a SHA-1-only log?)", EventTypeName(typ), pcr)
	}
	if uint64(size) > uint64(len(b)-32) {
		return nil, errors.New("event log header event: data ends early")
	}
	hdr := b[32 : 32+size]
	log := &EventLog{DigestSizes: map[uint16]int{}}
	if err := log.parseSpecID(hdr); err != nil {
		return nil, err
	}
	log.Events = append(log.Events, Event{Seq: 0, PCR: 0, Type: EvNoAction, Data: hdr})
	// Everything after the last non-zero byte is padding; finding it
	// once keeps parsing linear.
	end := len(b)
	for end > 32+int(size) && b[end-1] == 0 {
		end--
	}
	rest := b[32+size:]
	for seq := 1; len(rest) > len(b)-end; seq++ {
		ev, n, err := log.parseEvent(rest)
		if err != nil {
			return nil, fmt.Errorf("event log event %d: %w", seq, err)
		}
		ev.Seq = seq
		if ev.Type == EvNoAction && ev.PCR == 0 && bytes.HasPrefix(ev.Data, []byte(startupLocalitySignature)) && len(ev.Data) == len(startupLocalitySignature)+1 {
			log.StartupLocality = ev.Data[len(startupLocalitySignature)]
		}
		log.Events = append(log.Events, ev)
		rest = rest[n:]
	}
	return log, nil
}

func (l *EventLog) parseSpecID(h []byte) error {
	// TCG_EfiSpecIDEvent: signature[16], platformClass u32, minor u8,
	// major u8, errata u8, uintnSize u8, numberOfAlgorithms u32,
	// {algorithmId u16, digestSize u16}[n], vendorInfoSize u8, vendorInfo.
	if len(h) < 28 || string(h[:16]) != specIDSignature {
		return errors.New(`event log header is not a "Spec ID Event03" (only crypto-agile logs are read)`)
	}
	le := binary.LittleEndian
	n := le.Uint32(h[24:])
	if n == 0 || n > maxAlgorithmsInSpecID {
		return fmt.Errorf("event log header lists %d digest algorithms", n)
	}
	p := h[28:]
	if uint64(len(p)) < uint64(n)*4+1 {
		return errors.New("event log header: algorithm list ends early")
	}
	for i := uint32(0); i < n; i++ {
		alg, sz := le.Uint16(p), le.Uint16(p[2:])
		if sz == 0 || sz > 64 {
			return fmt.Errorf("event log header: algorithm %#04x has digest size %d", alg, sz)
		}
		l.DigestSizes[alg] = int(sz)
		p = p[4:]
	}
	if sz, ok := l.DigestSizes[algSHA256]; !ok || sz != sha256Size {
		return errors.New("event log records no SHA-256 bank")
	}
	if vendor := int(p[0]); len(p) != 1+vendor {
		return errors.New("event log header: vendor info size does not match")
	}
	return nil
}

func (l *EventLog) parseEvent(b []byte) (Event, int, error) {
	le := binary.LittleEndian
	if len(b) < 12 {
		return Event{}, 0, errShort
	}
	ev := Event{PCR: le.Uint32(b), Type: le.Uint32(b[4:])}
	count := le.Uint32(b[8:])
	if count == 0 || count > uint32(len(l.DigestSizes)) {
		return Event{}, 0, fmt.Errorf("%d digests, the header lists %d algorithms", count, len(l.DigestSizes))
	}
	off := 12
	for i := uint32(0); i < count; i++ {
		if len(b) < off+2 {
			return Event{}, 0, errShort
		}
		alg := le.Uint16(b[off:])
		sz, ok := l.DigestSizes[alg]
		if !ok {
			return Event{}, 0, fmt.Errorf("digest algorithm %#04x is not in the header", alg)
		}
		off += 2
		if len(b) < off+sz {
			return Event{}, 0, errShort
		}
		if alg == algSHA256 {
			if ev.SHA256 != nil {
				return Event{}, 0, errors.New("two SHA-256 digests")
			}
			ev.SHA256 = b[off : off+sz : off+sz]
		}
		off += sz
	}
	if ev.SHA256 == nil {
		return Event{}, 0, errors.New("no SHA-256 digest")
	}
	if len(b) < off+4 {
		return Event{}, 0, errShort
	}
	size := le.Uint32(b[off:])
	off += 4
	if size > maxEventData || uint64(len(b)-off) < uint64(size) {
		return Event{}, 0, fmt.Errorf("event data of %d bytes %w", size, errShort)
	}
	ev.Data = b[off : off+int(size) : off+int(size)]
	return ev, off + int(size), nil
}

// Replay computes the SHA-256 bank's PCR values the log's events extend
// to, for the PCRs that have events. EV_NO_ACTION events are not
// extended (they never reach a PCR).
func (l *EventLog) Replay() map[uint32][]byte {
	out := map[uint32][]byte{}
	for _, e := range l.Events {
		if e.Type == EvNoAction || e.SHA256 == nil {
			continue
		}
		cur, ok := out[e.PCR]
		if !ok {
			cur = initialPCR(e.PCR, l.StartupLocality)
		}
		h := sha256.New()
		h.Write(cur)
		h.Write(e.SHA256)
		out[e.PCR] = h.Sum(nil)
	}
	return out
}

// initialPCR is a PCR's value after TPM2_Startup on a PC Client
// platform: zeros, except PCR 0's last byte (the startup locality) and
// the DRTM PCRs 17–22, which start all ones.
func initialPCR(pcr uint32, locality uint8) []byte {
	v := make([]byte, sha256Size)
	switch {
	case pcr == 0:
		v[sha256Size-1] = locality
	case pcr >= 17 && pcr <= 22:
		for i := range v {
			v[i] = 0xff
		}
	}
	return v
}

// CheckReplay replays the log and compares every PCR it touches with
// the quoted values (pcrs[i] is PCR i). The error lists every PCR that
// differs.
func (l *EventLog) CheckReplay(pcrs [][]byte) error {
	var bad []string
	replayed := l.Replay()
	idx := make([]int, 0, len(replayed))
	for p := range replayed {
		idx = append(idx, int(p))
	}
	sort.Ints(idx)
	for _, p := range idx {
		if p >= len(pcrs) {
			bad = append(bad, fmt.Sprintf("PCR %d has events but was not quoted", p))
			continue
		}
		if got := replayed[uint32(p)]; !bytes.Equal(got, pcrs[p]) {
			bad = append(bad, fmt.Sprintf("PCR %d: the event log replays to %x, the quote has %x", p, got, pcrs[p]))
		}
	}
	if len(bad) > 0 {
		return errors.New(strings.Join(bad, "; "))
	}
	return nil
}

// BootClaims returns the digests of what the boot chain loaded, by the
// claim names reference values use: "kernel_digest" (the last
// EV_EFI_BOOT_SERVICES_APPLICATION in PCR 4: with a direct kernel boot,
// the kernel's Authenticode digest), "initrd_digest" and
// "cmdline_digest" (the Linux EFI stub's tagged events in PCR 9). A
// claim is absent when its event is.
func (l *EventLog) BootClaims() map[string]string {
	out := map[string]string{}
	for _, e := range l.Events {
		switch e.What() {
		case "boot application (kernel)":
			out["kernel_digest"] = hex.EncodeToString(e.SHA256)
		case "initrd":
			out["initrd_digest"] = hex.EncodeToString(e.SHA256)
		case "cmdline":
			out["cmdline_digest"] = hex.EncodeToString(e.SHA256)
		}
	}
	return out
}

// Explain compares a guest's event log with the reference log expected
// for it, PCR by PCR, and returns one line per difference ("PCR 9:
// initrd digest X, expected Y"), in PCR then log order. EV_NO_ACTION
// events are skipped: they are never extended. An empty result means
// the logs measure the same things.
func Explain(got, want *EventLog) []string {
	g, w := extendedByPCR(got), extendedByPCR(want)
	pcrs := map[uint32]bool{}
	for p := range g {
		pcrs[p] = true
	}
	for p := range w {
		pcrs[p] = true
	}
	order := make([]int, 0, len(pcrs))
	for p := range pcrs {
		order = append(order, int(p))
	}
	sort.Ints(order)
	var out []string
	for _, pi := range order {
		p := uint32(pi)
		ge, we := g[p], w[p]
		for i := 0; i < max(len(ge), len(we)); i++ {
			switch {
			case i >= len(we):
				out = append(out, fmt.Sprintf("PCR %d: unexpected %s event (digest %x)", p, ge[i].What(), ge[i].SHA256))
			case i >= len(ge):
				out = append(out, fmt.Sprintf("PCR %d: missing %s event (expected digest %x)", p, we[i].What(), we[i].SHA256))
			case ge[i].Type != we[i].Type || ge[i].What() != we[i].What():
				out = append(out, fmt.Sprintf("PCR %d: event %d is %s, expected %s", p, i, ge[i].What(), we[i].What()))
			case !bytes.Equal(ge[i].SHA256, we[i].SHA256):
				out = append(out, fmt.Sprintf("PCR %d: %s digest %x, expected %x", p, ge[i].What(), ge[i].SHA256, we[i].SHA256))
			}
		}
	}
	return out
}

func extendedByPCR(l *EventLog) map[uint32][]Event {
	out := map[uint32][]Event{}
	if l == nil {
		return out
	}
	for _, e := range l.Events {
		if e.Type != EvNoAction {
			out[e.PCR] = append(out[e.PCR], e)
		}
	}
	return out
}

// printable keeps an action string readable in a message.
func printable(b []byte) string {
	if len(b) > 64 {
		b = b[:64]
	}
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r > 0x7e {
			return -1
		}
		return r
	}, string(b))
}
