package tpm

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"math/big"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/cwrun/cwrun/attest"
	"github.com/cwrun/cwrun/attest/tpm/tpmtest"
)

// handshake runs the activation as attest.Client and the broker do,
// and returns the claims of VerifySession.
func handshake(t *testing.T, a *Attester, v *verifier, nonce, verifyNonce string) (*attest.Claims, error) {
	t.Helper()
	ctx := context.Background()
	params, err := a.AuthParams(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if params[paramEKCert] == nil || params[paramAKPublic] == nil {
		t.Fatalf("AuthParams sent no EK certificate or AK: %v", params)
	}
	extra, _ := json.Marshal(params)
	ch, err := v.Challenge(ctx, nonce, extra)
	if err != nil {
		return nil, err
	}
	if err := a.TakeChallenge(ctx, ch); err != nil {
		t.Fatalf("TakeChallenge: %v", err)
	}
	rd := bytes.Repeat([]byte{7}, ReportDataLen)
	ev, err := a.Evidence(ctx, rd)
	if err != nil {
		t.Fatal(err)
	}
	return v.VerifySession(ctx, ev, rd, verifyNonce)
}

func TestCredentialActivation(t *testing.T) {
	ca := tpmtest.NewCA(t)
	conn := tpmtest.StartSwtpm(t, ca)
	a := mustAttester(t, conn)
	key := bytes.Repeat([]byte{1}, 32)
	vi, err := NewVerifier(Options{EKCAs: []*x509.Certificate{ca.Cert}, CredentialKey: key})
	if err != nil {
		t.Fatal(err)
	}
	v := vi.(*verifier)
	want := sha256.Sum256(ca.Cert.Raw)

	t.Run("trusted CA", func(t *testing.T) {
		c, err := handshake(t, a, v, "nonce-1", "nonce-1")
		if err != nil {
			t.Fatalf("VerifySession: %v", err)
		}
		if got := c.Values["ek_ca"]; got != hex.EncodeToString(want[:]) {
			t.Errorf("ek_ca claim %q, want %x", got, want)
		}
	})
	t.Run("replayed to another session", func(t *testing.T) {
		// The secret of session 1's credential presented in session 2:
		// the evidence of a guest that never activated session 2's.
		_, err := handshake(t, a, v, "nonce-1", "nonce-2")
		if !errors.Is(err, attest.ErrEvidence) || !strings.Contains(err.Error(), "not this handshake's") {
			t.Fatalf("a credential of another session passed: %v", err)
		}
	})
	t.Run("untrusted CA", func(t *testing.T) {
		other := tpmtest.NewCA(t)
		ov, err := NewVerifier(Options{EKCAs: []*x509.Certificate{other.Cert}, CredentialKey: key})
		if err != nil {
			t.Fatal(err)
		}
		params, _ := a.AuthParams(context.Background())
		extra, _ := json.Marshal(params)
		_, err = ov.(*verifier).Challenge(context.Background(), "n", extra)
		if !errors.Is(err, attest.ErrEvidence) || !strings.Contains(err.Error(), "does not chain to a trusted EK CA") {
			t.Fatalf("an EK of another CA got a credential: %v", err)
		}
	})
	t.Run("another broker key", func(t *testing.T) {
		// A credential this broker did not make (the guest made its own
		// secret up) fails: the broker's key is in the secret.
		ov, _ := NewVerifier(Options{EKCAs: []*x509.Certificate{ca.Cert}, CredentialKey: bytes.Repeat([]byte{2}, 32)})
		ev, rd := activate(t, a, ov.(*verifier), "n")
		if _, err := v.VerifySession(context.Background(), ev, rd, "n"); err == nil {
			t.Fatal("a credential of another broker key passed")
		}
	})
	t.Run("rotated broker key", func(t *testing.T) {
		// A credential a replica not yet rotated issued, answered at one
		// that was: accepted under the earlier key, and only there.
		rotated, _ := NewVerifier(Options{EKCAs: []*x509.Certificate{ca.Cert}, CredentialKey: bytes.Repeat([]byte{3}, 32),
			PreviousCredentialKeys: [][]byte{key}})
		ev, rd := activate(t, a, v, "n4")
		if _, err := rotated.(*verifier).VerifySession(context.Background(), ev, rd, "n4"); err != nil {
			t.Fatalf("a credential under the previous key: %v", err)
		}
		fresh, _ := NewVerifier(Options{EKCAs: []*x509.Certificate{ca.Cert}, CredentialKey: bytes.Repeat([]byte{3}, 32)})
		if _, err := fresh.(*verifier).VerifySession(context.Background(), ev, rd, "n4"); err == nil {
			t.Fatal("a credential under a key the verifier does not hold passed")
		}
	})
	t.Run("swapped AK", func(t *testing.T) {
		// The credential activated for the TPM's AK, but a quote by a
		// key of the host's own: the AK in the evidence is not the one
		// the TPM vouched for.
		raw, rd := activate(t, a, v, "n3")
		var ev map[string]any
		json.Unmarshal(raw, &ev)
		other := mustAttester(t, startSwtpm(t).conn)
		oraw, _ := other.Evidence(context.Background(), rd)
		var oev map[string]any
		json.Unmarshal(oraw, &oev)
		oev["ek_cert"], oev["ak_credential"] = ev["ek_cert"], ev["ak_credential"]
		forged, _ := json.Marshal(oev)
		if _, err := v.VerifySession(context.Background(), forged, rd, "n3"); err == nil || !strings.Contains(err.Error(), "not this handshake's") {
			t.Fatalf("a quote by another AK passed with this TPM's credential: %v", err)
		}
	})
	t.Run("AK attributes", func(t *testing.T) {
		params, _ := a.AuthParams(context.Background())
		var akB64 string
		json.Unmarshal(params[paramAKPublic], &akB64)
		raw, _ := base64.StdEncoding.DecodeString(akB64)
		// TPMT_PUBLIC: type(2) nameAlg(2) objectAttributes(4): clear
		// "restricted" (bit 16).
		raw[4+1] &^= 0x01
		params[paramAKPublic] = jsonString(base64.StdEncoding.EncodeToString(raw))
		extra, _ := json.Marshal(params)
		if _, err := v.Challenge(context.Background(), "n", extra); err == nil || !strings.Contains(err.Error(), "restricted") {
			t.Fatalf("an unrestricted AK got a credential: %v", err)
		}
	})
}

// activate runs a's side of credential activation against v's
// challenge for nonce, and returns the evidence a then makes and the
// report data it binds.
func activate(t *testing.T, a *Attester, v *verifier, nonce string) (ev, rd []byte) {
	t.Helper()
	params, _ := a.AuthParams(context.Background())
	extra, _ := json.Marshal(params)
	ch, err := v.Challenge(context.Background(), nonce, extra)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.TakeChallenge(context.Background(), ch); err != nil {
		t.Fatal(err)
	}
	rd = bytes.Repeat([]byte{7}, ReportDataLen)
	ev, err = a.Evidence(context.Background(), rd)
	if err != nil {
		t.Fatal(err)
	}
	return ev, rd
}

func mustAttester(t testing.TB, conn net.Conn) *Attester {
	t.Helper()
	a, err := NewAttester(AttesterOptions{Conn: conn, EventLog: "-"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.(*Attester).Close() })
	return a.(*Attester)
}

// BenchmarkActivationBroker is the broker's added cost per handshake
// for an EK-CA-trusted TPM: at /auth, the EK chain check and
// TPM2_MakeCredential (one RSA-OAEP encryption); at /attest, the chain
// again and an HMAC (on top of Verify).
func BenchmarkActivationBroker(b *testing.B) {
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "bench CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true}
	caDER, _ := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	ca, _ := x509.ParseCertificate(caDER)
	ekKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	ekDER, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{SerialNumber: big.NewInt(2),
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageKeyEncipherment},
		ca, &ekKey.PublicKey, caKey)
	if err != nil {
		b.Fatal(err)
	}
	akKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	ak := akTemplate(false)
	ak.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: akKey.N.Bytes()})
	extra, _ := json.Marshal(map[string]string{
		paramEKCert:   base64.StdEncoding.EncodeToString(ekDER),
		paramAKPublic: base64.StdEncoding.EncodeToString(tpm2.Marshal(ak)),
	})
	vi, err := NewVerifier(Options{EKCAs: []*x509.Certificate{ca}, CredentialKey: bytes.Repeat([]byte{1}, 32)})
	if err != nil {
		b.Fatal(err)
	}
	v := vi.(*verifier)
	spki, _ := x509.MarshalPKIXPublicKey(&akKey.PublicKey)
	b.Run("auth (chain + MakeCredential)", func(b *testing.B) {
		for b.Loop() {
			if _, err := v.Challenge(context.Background(), "nonce", extra); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("attest (chain + HMAC)", func(b *testing.B) {
		for b.Loop() {
			if _, _, err := v.ekAnchor(ekDER); err != nil {
				b.Fatal(err)
			}
			_ = v.credentialSecret("nonce", ekDER, spki)
		}
	})
}
