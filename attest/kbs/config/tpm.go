package config

import (
	"crypto/x509"
	"errors"
	"fmt"

	"github.com/cwrun/cwrun/attest"
	"github.com/cwrun/cwrun/attest/tpm"
)

// TPM configures the tpm verifier.
type TPM struct {
	// EKCA are PEM files of CA certificates trusted to vouch for TPMs'
	// endorsement keys (self-signed ones are trust anchors, others
	// intermediates): a guest whose EK certificate chains to one proves
	// its AK by credential activation, and its claims carry "ek_ca" (the
	// SHA-256 of the anchor certificate), which a tpm workload may
	// register instead of its AK. For cwrun's software TPMs this is the
	// issuercert.pem of the run host's vTPM CA (/var/lib/cwrun/vtpm-ca).
	// None: only registered AKs ("ak" references) are trusted.
	EKCA []string `toml:"ek_ca"`
	// RequireEventLog refuses tpm evidence without the firmware's event
	// log (needed for kernel_digest, initrd_digest, cmdline_digest).
	RequireEventLog bool `toml:"require_eventlog"`
}

// tpmCredentialLabel derives the key of the TPM credential secrets
// from secrets_key (HKDF-SHA256), like the cookie and at-rest keys.
const tpmCredentialLabel = "cwrun-kbs tpm-credential-key v1"

// readEKCAs reads every certificate in the files.
func readEKCAs(files []string) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for _, f := range files {
		certs, err := readCerts(f)
		if err != nil {
			return nil, err
		}
		out = append(out, certs...)
	}
	return out, nil
}

func (c *Config) tpmVerifier() (attest.Verifier, error) {
	o := tpm.Options{RequireEventLog: c.TPM.RequireEventLog}
	if len(c.TPM.EKCA) > 0 {
		cas, err := readEKCAs(c.TPM.EKCA)
		if err != nil {
			return nil, fmt.Errorf("tpm.ek_ca: %w", err)
		}
		if c.keys == nil || len(c.keys.tpmCredential) == 0 {
			return nil, errors.New("tpm.ek_ca: no credential key (secrets_key was not read)")
		}
		o.EKCAs, o.CredentialKey, o.PreviousCredentialKeys = cas, c.keys.tpmCredential, c.keys.prevTpmCredential
	}
	return tpm.NewVerifier(o)
}
