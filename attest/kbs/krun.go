package kbs

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"

	"github.com/cwrun/cwrun/attest"
)

// krun's reference KBS registration, as `buildah mkcw` sends it
// (POST /kbs/v0/register_workload):
//
//	{"workload_id": "...", "launch_measurement": "<hex>",
//	 "tee_config": "<JSON string>", "passphrase": "..."}
//
// with tee_config = {"flags":{"bits":N},"minfw":{"major":M,"minor":m}}.
// The registration is unauthenticated in krun's design, so the broker
// serves it only with Options.AllowRegister, and never lets it replace a
// workload (409): a registration can add a workload, not take one over.

// KrunRegistration is the body of POST /kbs/v0/register_workload.
type KrunRegistration struct {
	WorkloadID        string `json:"workload_id"`
	LaunchMeasurement string `json:"launch_measurement"`
	TeeConfig         string `json:"tee_config"`
	Passphrase        string `json:"passphrase"`
	// Tee is a cwrun extension: the TEE the workload runs on. krun
	// registers SEV-SNP workloads, so empty means snp.
	Tee string `json:"tee,omitempty"`
}

// KrunTeeConfig is tee_config decoded. CPUs and memory are not part of
// buildah's tee_config; they are read when a registrant adds them (krun's
// workload config names them cpus and ram_mib).
type KrunTeeConfig struct {
	Flags struct {
		Bits int64 `json:"bits"`
	} `json:"flags"`
	MinFW struct {
		Major int `json:"major"`
		Minor int `json:"minor"`
	} `json:"minfw"`
	CPUs   int `json:"cpus,omitempty"`
	RAMMiB int `json:"ram_mib,omitempty"`
}

// SpecFromKrun maps a krun registration onto a workload spec:
// launch_measurement becomes References["measurement"] (lower-case hex),
// and tee_config's cpus/ram_mib become CPUs/MemoryMiB. tee_config's
// flags are not mapped: buildah sets SNP_CONFIG_DEBUG on every SNP
// registration, and a guest whose policy allows debugging is refused
// whatever a registration says (the host could read its memory). Its
// minfw is not mapped either; set MinTCB on the SNP verifier instead.
func SpecFromKrun(reg KrunRegistration) (WorkloadSpec, error) {
	spec := WorkloadSpec{ID: reg.WorkloadID, Tee: reg.Tee, Passphrase: reg.Passphrase}
	if spec.Tee == "" {
		spec.Tee = attest.TeeSNP
	}
	m := strings.ToLower(strings.TrimSpace(reg.LaunchMeasurement))
	if m == "" {
		return spec, fmt.Errorf("launch_measurement is empty: a workload without one would release its key to any %s guest", spec.Tee)
	}
	if spec.Tee == attest.TeeSNP && !isHex(m, 96) {
		return spec, fmt.Errorf("launch_measurement %q is not an SNP launch measurement (96 hex digits, SHA-384)", abbrev(m))
	}
	spec.References = map[string][]string{"measurement": {m}}
	if reg.TeeConfig != "" {
		var tc KrunTeeConfig
		if err := json.Unmarshal([]byte(reg.TeeConfig), &tc); err != nil {
			return spec, fmt.Errorf("tee_config is not krun's JSON shape: %v", err)
		}
		spec.CPUs, spec.MemoryMiB = tc.CPUs, tc.RAMMiB
	}
	return spec, nil
}

func isHex(s string, n int) bool {
	if len(s) != n {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

func (s *Server) handleRegisterWorkload(w http.ResponseWriter, r *http.Request, _ []string) error {
	if !s.register {
		return errorf(http.StatusForbidden, "register_workload is off on this broker (it is unauthenticated); register with the admin API, or start the broker with registration allowed")
	}
	body, err := readBody(w, r, maxAdminBody, "registration")
	if err != nil {
		return err
	}
	var reg KrunRegistration
	if err := decodeJSON(body, &reg, false, "registration"); err != nil {
		return err
	}
	spec, err := SpecFromKrun(reg)
	if err != nil {
		return badRequest("registration of %q: %v", truncate(reg.WorkloadID, 32), err)
	}
	if _, err := s.addWorkload(r, &spec, "register_workload"); err != nil {
		return err
	}
	// buildah accepts 200 or 202.
	writeJSON(w, http.StatusOK, map[string]string{"workload_id": spec.ID})
	return nil
}
