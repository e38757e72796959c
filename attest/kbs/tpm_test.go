package kbs

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"testing"

	"github.com/cwrun/cwrun/attest"
	"github.com/cwrun/cwrun/attest/tpm"
	"github.com/cwrun/cwrun/attest/tpm/tpmtest"
)

// TestTPMCredentialActivationEndToEnd: the guest client with a real
// (software) TPM against the broker with the tpm verifier trusting an
// EK CA. The AK is fresh and unknown to the broker; credential
// activation inside the handshake ties it to the EK the CA vouches for,
// so "ek_ca" can stand as the workload's tpm anchor instead of "ak".
func TestTPMCredentialActivationEndToEnd(t *testing.T) {
	ca := tpmtest.NewCA(t)
	conn := tpmtest.StartSwtpm(t, ca)
	v, err := tpm.NewVerifier(tpm.Options{EKCAs: []*x509.Certificate{ca.Cert}, CredentialKey: []byte(strings.Repeat("k", 32))})
	if err != nil {
		t.Fatal(err)
	}
	b := newBroker(t, func(o *Options) { o.Verifiers = append(o.Verifiers, v) })
	sum := sha256.Sum256(ca.Cert.Raw)
	anchor := hex.EncodeToString(sum[:])
	b.addWorkload(WorkloadSpec{ID: "vtpm", Tee: attest.TeeTPM, Passphrase: passphrase, References: map[string][]string{"ek_ca": {anchor}}})
	b.storeWorkload(WorkloadSpec{ID: "noanchor", Tee: attest.TeeTPM, Passphrase: passphrase, References: map[string][]string{"pcr0": {strings.Repeat("0", 64)}}})
	b.addWorkload(WorkloadSpec{ID: "otherca", Tee: attest.TeeTPM, Passphrase: passphrase, References: map[string][]string{"ek_ca": {strings.Repeat("ab", 32)}}})

	att, err := tpm.NewAttester(tpm.AttesterOptions{Conn: conn, EventLog: "-"})
	if err != nil {
		t.Fatal(err)
	}
	c := &attest.Client{BaseURL: b.ts.URL, HTTP: b.ts.Client(), Attester: att}
	ctx := context.Background()
	if got, err := c.Resource(ctx, PassphrasePath("vtpm")); err != nil || string(got) != passphrase {
		t.Fatalf("a vTPM of the trusted CA: %q, %v", got, err)
	}
	var be *attest.BrokerError
	_, err = c.Resource(ctx, PassphrasePath("noanchor"))
	if !errors.As(err, &be) || be.Status != 403 || !strings.Contains(be.Reason, "registers no ak or ek_ca reference value") {
		t.Fatalf("a tpm workload without an anchor: %v", err)
	}
	_, err = c.Resource(ctx, PassphrasePath("otherca"))
	if !errors.As(err, &be) || be.Status != 403 || !strings.Contains(be.Reason, "ek_ca") {
		t.Fatalf("a tpm workload trusting another CA: %v", err)
	}

	// A broker that trusts another CA refuses at /auth, with the reason.
	v2, _ := tpm.NewVerifier(tpm.Options{EKCAs: []*x509.Certificate{tpmtest.NewCA(t).Cert}, CredentialKey: []byte(strings.Repeat("k", 32))})
	b2 := newBroker(t, func(o *Options) { o.Verifiers = append(o.Verifiers, v2) })
	b2.addWorkload(WorkloadSpec{ID: "vtpm", Tee: attest.TeeTPM, Passphrase: passphrase, References: map[string][]string{"ek_ca": {anchor}}})
	c.BaseURL, c.HTTP = b2.ts.URL, b2.ts.Client()
	_, err = c.Resource(ctx, PassphrasePath("vtpm"))
	if !errors.As(err, &be) || be.Step != "auth" || be.Status != 401 || !strings.Contains(be.Reason, "does not chain to a trusted EK CA") {
		t.Fatalf("a vTPM of an untrusted CA: %v", err)
	}
}

// TestTPMReplayedQuote: a quote made for one handshake, sent in
// another (the nonce changed to the new session's), is refused: its
// qualifying data is the old handshake's report data.
func TestTPMReplayedQuote(t *testing.T) {
	conn := tpmtest.StartSwtpm(t, tpmtest.NewCA(t))
	v, err := tpm.NewVerifier(tpm.Options{})
	if err != nil {
		t.Fatal(err)
	}
	b := newBroker(t, func(o *Options) { o.Verifiers = append(o.Verifiers, v) })
	att, err := tpm.NewAttester(tpm.AttesterOptions{Conn: conn, EventLog: "-"})
	if err != nil {
		t.Fatal(err)
	}
	g := b.guest(att)
	old := g.attestBody(g.auth(), g.key.JWK, g.key.JWK)
	var at attest.Attestation
	if err := json.Unmarshal(old, &at); err != nil {
		t.Fatal(err)
	}
	at.RuntimeData.Nonce = g.auth() // a new session
	replayed, _ := json.Marshal(at)
	st, out := g.do(http.MethodPost, "/kbs/v0/attest", replayed)
	if st != http.StatusUnauthorized || !strings.Contains(string(out), "replayed or foreign quote") {
		t.Fatalf("a replayed quote: %d %s", st, out)
	}
	// The same TPM answering the new session's own challenge passes.
	g.attest(g.auth())
}
