// Package sealed describes the krun confidential-workload layout that
// `buildah mkcw` writes, libkrun boots and cwrun both writes and reads:
// the workload config (krun-sev.json), the footer that carries it at the
// end of disk.img, the file names of the image's root file system, and
// the annotations cwrun adds.
//
// It is a leaf: pure data and byte layouts, no I/O beyond io.ReaderAt,
// so that the guest init may use it. It must never import c/image,
// c/storage or anything that talks to a VMM or a broker.
package sealed

import (
	"encoding/json"
	"fmt"
	"strings"
)

// Paths of the sealed image's root file system (one layer).
const (
	DiskPath         = "disk.img"
	ConfigPath       = "krun-sev.json"
	EntrypointPath   = "entrypoint"
	TmpPath          = "tmp"
	SEVChainPath     = "sev.chain"
	KrunConfigInDisk = ".krun_config.json" // the source image's config, inside the encrypted disk
)

// Annotations on the sealed image's manifest. krun's own tools ignore
// them; crun honours KrunVariant.
const (
	AnnotationSealed  = "io.cwrun.sealed"      // "true"
	AnnotationVersion = "io.cwrun.version"     // the cwrun version that sealed it
	AnnotationTEE     = "io.cwrun.tee"         // the TEE the disk was sealed for
	KrunVariant       = "krun.variant"         // crun's key; value "sev"
	AnnotationLUKS    = "io.cwrun.luks"        // "1" or "2"
	AnnotationWID     = "io.cwrun.workload-id" // the broker's key for this workload
	AnnotationDiskSz  = "io.cwrun.disk-size"   // bytes of disk.img
)

// LabelAllowOverrides, set to "true" in the config sealed inside the
// encrypted disk (/.krun_config.json), is what lets the guest honour the
// host's command and environment overrides. The footer's
// CwrunConfig.AllowOverrides is only the host's early refusal: the host
// can rewrite the footer, never the encrypted disk.
const LabelAllowOverrides = "io.cwrun.allow-overrides"

// TEE names a trusted execution environment, as written in krun-sev.json.
type TEE string

// The TEEs cwrun seals for. SEV is read (buildah writes it) but not sealed for.
const (
	TEESNP    TEE = "snp"
	TEETDX    TEE = "tdx"
	TEETPM    TEE = "tpm"
	TEESample TEE = "sample"
	TEESEV    TEE = "sev"
)

// ParseTEE accepts the --tee values cwrun seals for.
func ParseTEE(s string) (TEE, error) {
	switch t := TEE(strings.ToLower(s)); t {
	case TEESNP, TEETDX, TEETPM, TEESample:
		return t, nil
	}
	return "", fmt.Errorf("unknown TEE %q: use one of snp, tdx, tpm, sample", s)
}

// Insecure reports whether the TEE gives no protection from the host.
func (t TEE) Insecure() bool { return t == TEESample }

// Config is krun-sev.json: the workload config, the same JSON as the
// disk footer. The first six fields are krun's, in krun's order (buildah
// writes them so); cwrun's additions follow and krun's tools ignore them.
type Config struct {
	TEE            TEE    `json:"tee"`
	TEEData        string `json:"tee_data"` // a JSON document as a string, e.g. {"gen":"milan"}
	WorkloadID     string `json:"workload_id"`
	CPUs           int    `json:"cpus"`
	RAMMiB         int    `json:"ram_mib"`
	AttestationURL string `json:"attestation_url"`

	// Cwrun holds cwrun's own fields; nil in images from buildah mkcw.
	Cwrun *CwrunConfig `json:"cwrun,omitempty"`
}

// CwrunConfig is what cwrun adds to the workload config.
type CwrunConfig struct {
	Version string `json:"version,omitempty"` // the cwrun that sealed it
	LUKS    int    `json:"luks,omitempty"`    // LUKS version of disk.img
	// AllowOverrides says the seal lets the host replace the sealed
	// command and add environment at run time (off by default: the host
	// is the party the seal protects against). This copy only lets the
	// host refuse early; the guest obeys LabelAllowOverrides inside the
	// encrypted disk.
	AllowOverrides bool `json:"allow_overrides,omitempty"`
}

// DefaultTEEData is what buildah writes for each TEE.
func DefaultTEEData(t TEE) string {
	switch t {
	case TEESNP:
		return `{"gen":"milan"}`
	case TEESEV:
		return `{"vendor_chain":"/sev.chain","attestation_server_pubkey":""}`
	}
	return "{}"
}

// Marshal encodes the config compactly, as buildah does.
func (c Config) Marshal() ([]byte, error) { return json.Marshal(c) }

// ParseConfig decodes and checks a workload config from an untrusted image.
func ParseConfig(b []byte) (Config, error) {
	var c Config
	if err := json.Unmarshal(b, &c); err != nil {
		return Config{}, fmt.Errorf("workload config: %w", err)
	}
	if c.TEE == "" {
		return Config{}, fmt.Errorf("workload config: no \"tee\" field")
	}
	if c.CPUs < 0 || c.RAMMiB < 0 {
		return Config{}, fmt.Errorf("workload config: negative cpus (%d) or ram_mib (%d)", c.CPUs, c.RAMMiB)
	}
	return c, nil
}
