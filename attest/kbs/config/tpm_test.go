package config

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cwrun/cwrun/attest"
	"github.com/cwrun/cwrun/attest/tpm/tpmtest"
)

func TestTPMSection(t *testing.T) {
	dir := initDir(t, InitOptions{Listen: "127.0.0.1:0"})
	ca := tpmtest.NewCA(t)
	p := filepath.Join(dir, FileName)
	f, err := os.OpenFile(p, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("\n[tpm]\nek_ca = [\"" + ca.CertFile() + "\", \"missing.pem\"]\n")
	f.Close()
	if _, err := Load(p); err == nil || !strings.Contains(err.Error(), "tpm.ek_ca") || !strings.Contains(err.Error(), "missing.pem") {
		t.Fatalf("a missing EK CA file: %v", err)
	}
	b, _ := os.ReadFile(p)
	os.WriteFile(p, []byte(strings.Replace(string(b), `, "missing.pem"`, "", 1)), 0o600)
	c, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	c.TEEs = []string{"tpm"}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	opts, st, err := c.Options(context.Background(), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if len(opts.Verifiers) != 1 || opts.Verifiers[0].Tee() != attest.TeeTPM {
		t.Fatalf("verifiers %v, want the tpm one", opts.Verifiers)
	}
}
