package tpm

// Trust in an EK CA: a fresh vTPM has a fresh AK on every boot, so a
// broker cannot register it beforehand; what it can trust is the CA that
// signed the TPM's endorsement key (EK) certificate. The AK is bound to
// that EK by credential activation (TPM 2.0 Part 1, 24 "Credential
// Protection"), inside Trustee's handshake and without broker state:
//
//  1. /auth: the guest's extra-params carry its EK certificate and its
//     AK's TPMT_PUBLIC;
//  2. the broker checks the EK certificate up to a trusted CA and the
//     AK's attributes (fixedTPM, fixedParent, restricted signing key:
//     only the TPM can make a quote it signs), derives a secret from
//     the session's nonce, the EK certificate and the AK with a key of
//     its own (HMAC: nothing to remember), and answers it as a
//     credential (TPM2_MakeCredential done in software) that only the
//     TPM holding that EK can open, and only for an AK of that Name;
//  3. the guest opens it (TPM2_ActivateCredential) and puts the secret
//     and its EK certificate in its evidence;
//  4. /attest: the broker derives the secret again; equal, the AK lives
//     in a TPM whose EK the CA vouches for, and the claim "ek_ca" (the
//     SHA-256 of the CA certificate) says which CA.
//
// This is the credential-activation flow and not the EK-certified AK of
// TPM2_Certify: an EK is a decryption key and cannot sign.

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/cwrun/cwrun/attest"
)

// Extra-params members of the activation. Trustee's KBS ignores them.
const (
	paramEKCert     = "tpm_ek_cert"    // /auth request: base64 DER EK certificate
	paramAKPublic   = "tpm_ak_public"  // /auth request: base64 TPMT_PUBLIC of the AK
	paramCredential = "tpm_credential" // challenge: {"id_object","enc_secret"} base64
)

// NV indices of the EK certificates (TCG EK Credential Profile 2.0,
// 2.2.1.4): RSA 2048 and ECC NIST P-256.
const (
	nvRSAEKCert = 0x01c00002
	// persistentRSAEK is where swtpm_setup (and most provisioning)
	// keeps the RSA EK.
	persistentRSAEK tpm2.TPMHandle = 0x81010001
)

// credentialLabel separates this HMAC's use of the broker key.
const credentialLabel = "cwrun tpm credential v1\x00"

// maxCertSize bounds an EK certificate read from NV or sent.
const maxCertSize = 4096

// AuthParams implements the client's optional AuthParamser: the EK
// certificate and the AK's public area, when the TPM has an RSA EK
// certificate (none: the AK must be registered with the broker instead,
// and no members are added).
func (a *Attester) AuthParams(ctx context.Context) (map[string]json.RawMessage, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.tpm == nil {
		return nil, errors.New("tpm: attester is closed")
	}
	a.credSecret, a.ekCert = nil, nil
	cert, err := readNV(a.tpm, nvRSAEKCert)
	if err != nil {
		a.log.Debug("no RSA EK certificate in the TPM's NV; the broker must know the AK", "err", err)
		return nil, nil
	}
	rsp, err := (tpm2.ReadPublic{ObjectHandle: a.ak}).Execute(a.tpm)
	if err != nil {
		return nil, fmt.Errorf("tpm: reading the AK's public area: %v", err)
	}
	a.ekCert = cert
	return map[string]json.RawMessage{
		paramEKCert:   jsonString(base64.StdEncoding.EncodeToString(cert)),
		paramAKPublic: jsonString(base64.StdEncoding.EncodeToString(rsp.OutPublic.Bytes())),
	}, nil
}

// TakeChallenge implements the client's optional ChallengeTaker: it
// activates the broker's credential, if the challenge carries one, and
// keeps the secret for the evidence.
func (a *Attester) TakeChallenge(ctx context.Context, extra json.RawMessage) error {
	var p map[string]json.RawMessage
	if t := bytes.TrimSpace(extra); len(t) == 0 || t[0] != '{' {
		return nil
	}
	if err := json.Unmarshal(extra, &p); err != nil {
		return fmt.Errorf("tpm: challenge extra-params: %v", err)
	}
	raw, ok := p[paramCredential]
	if !ok {
		return nil
	}
	var c struct {
		IDObject  string `json:"id_object"`
		EncSecret string `json:"enc_secret"`
	}
	if err := json.Unmarshal(raw, &c); err != nil {
		return fmt.Errorf("tpm: challenge %s: %v", paramCredential, err)
	}
	id, err1 := base64.StdEncoding.DecodeString(c.IDObject)
	enc, err2 := base64.StdEncoding.DecodeString(c.EncSecret)
	if err := errors.Join(err1, err2); err != nil {
		return fmt.Errorf("tpm: challenge %s is not base64: %v", paramCredential, err)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.tpm == nil {
		return errors.New("tpm: attester is closed")
	}
	if a.ekCert == nil {
		return errors.New("tpm: the broker sent a credential, but this attester sent no EK certificate")
	}
	ek, flush, err := loadEK(a.tpm, a.ekCert)
	if err != nil {
		return err
	}
	defer flush()
	rsp, err := (tpm2.ActivateCredential{
		ActivateHandle: tpm2.AuthHandle{Handle: a.ak, Name: a.akName, Auth: tpm2.PasswordAuth(nil)},
		KeyHandle: tpm2.AuthHandle{Handle: ek.handle, Name: ek.name, Auth: tpm2.Policy(tpm2.TPMAlgSHA256, 16,
			func(t transport.TPM, h tpm2.TPMISHPolicy, nonce tpm2.TPM2BNonce) error {
				_, err := (tpm2.PolicySecret{
					AuthHandle:    tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
					PolicySession: h, NonceTPM: nonce,
				}).Execute(t)
				return err
			})},
		CredentialBlob: tpm2.TPM2BIDObject{Buffer: id},
		Secret:         tpm2.TPM2BEncryptedSecret{Buffer: enc},
	}).Execute(a.tpm)
	if err != nil {
		return fmt.Errorf("tpm: activating the broker's credential with the EK: %v (is the EK certificate this TPM's?)", err)
	}
	a.credSecret = bytes.Clone(rsp.CertInfo.Buffer)
	return nil
}

type loadedEK struct {
	handle tpm2.TPMHandle
	name   tpm2.TPM2BName
}

// loadEK finds the RSA EK whose public key is the certificate's: the
// persistent one, or one re-created from the TCG template.
func loadEK(t transport.TPM, certDER []byte) (*loadedEK, func(), error) {
	cert, err := x509.ParseCertificate(certDER)
	if err != nil {
		return nil, nil, fmt.Errorf("tpm: the TPM's EK certificate does not parse: %v", err)
	}
	want, ok := cert.PublicKey.(*rsa.PublicKey)
	if !ok {
		return nil, nil, fmt.Errorf("tpm: the EK certificate holds a %T key, want RSA", cert.PublicKey)
	}
	same := func(pub tpm2.TPM2BPublic) bool {
		p, err := pub.Contents()
		if err != nil {
			return false
		}
		k, err := tpm2.Pub(*p)
		if err != nil {
			return false
		}
		r, ok := k.(*rsa.PublicKey)
		return ok && r.Equal(want)
	}
	if rsp, err := (tpm2.ReadPublic{ObjectHandle: persistentRSAEK}).Execute(t); err == nil && same(rsp.OutPublic) {
		return &loadedEK{handle: persistentRSAEK, name: rsp.Name}, func() {}, nil
	}
	cp, err := (tpm2.CreatePrimary{
		PrimaryHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
		InPublic:      tpm2.New2B(tpm2.RSAEKTemplate),
	}).Execute(t)
	if err != nil {
		return nil, nil, fmt.Errorf("tpm: creating the RSA EK: %v", err)
	}
	flush := func() { (tpm2.FlushContext{FlushHandle: cp.ObjectHandle}).Execute(t) } //nolint:errcheck // best effort
	if !same(cp.OutPublic) {
		flush()
		return nil, nil, errors.New("tpm: the RSA EK made from the TCG template is not the key of the EK certificate in NV")
	}
	return &loadedEK{handle: cp.ObjectHandle, name: cp.Name}, flush, nil
}

// readNV reads a whole NV index.
func readNV(t transport.TPM, index uint32) ([]byte, error) {
	pub, err := (tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(index)}).Execute(t)
	if err != nil {
		return nil, err
	}
	nv, err := pub.NVPublic.Contents()
	if err != nil {
		return nil, err
	}
	if nv.DataSize == 0 || nv.DataSize > maxCertSize {
		return nil, fmt.Errorf("NV index %#x holds %d bytes", index, nv.DataSize)
	}
	var out []byte
	for len(out) < int(nv.DataSize) {
		n := min(int(nv.DataSize)-len(out), 512) // below every TPM's MAX_NV_BUFFER_SIZE
		rsp, err := (tpm2.NVRead{
			AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
			NVIndex:    tpm2.NamedHandle{Handle: tpm2.TPMHandle(index), Name: pub.NVName},
			Size:       uint16(n), Offset: uint16(len(out)),
		}).Execute(t)
		if err != nil {
			return nil, err
		}
		if len(rsp.Data.Buffer) == 0 {
			return nil, fmt.Errorf("NV index %#x: empty read at %d", index, len(out))
		}
		out = append(out, rsp.Data.Buffer...)
	}
	return out, nil
}

func jsonString(s string) json.RawMessage {
	b, _ := json.Marshal(s)
	return b
}

// ekAnchor checks an EK certificate up to the verifier's EK CAs and
// returns the SHA-256 of the trust anchor's certificate.
func (v *verifier) ekAnchor(der []byte) ([sha256.Size]byte, *rsa.PublicKey, error) {
	var zero [sha256.Size]byte
	if len(der) > maxCertSize {
		return zero, nil, fmt.Errorf("EK certificate is %d bytes, more than %d", len(der), maxCertSize)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return zero, nil, fmt.Errorf("EK certificate does not parse: %v", err)
	}
	// EK certificates name the TPM's manufacturer, model and version in
	// a directoryName subject alternative name, critical because the
	// subject is empty (TCG EK Credential Profile 3.2.9), which Go does
	// not read: it describes the TPM and restricts nothing. Any other
	// unknown critical extension still fails Verify.
	cert.UnhandledCriticalExtensions = slices.DeleteFunc(cert.UnhandledCriticalExtensions,
		func(id asn1.ObjectIdentifier) bool { return id.Equal(oidSubjectAltName) })
	chains, err := cert.Verify(x509.VerifyOptions{
		Roots: v.ekRoots, Intermediates: v.ekIntermediates,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	if err != nil {
		return zero, nil, fmt.Errorf("EK certificate (issuer %q) does not chain to a trusted EK CA: %v", cert.Issuer.String(), err)
	}
	pub, ok := cert.PublicKey.(*rsa.PublicKey)
	if !ok {
		return zero, nil, fmt.Errorf("EK certificate holds a %T key; cwrun activates credentials with RSA EKs", cert.PublicKey)
	}
	root := chains[0][len(chains[0])-1]
	return sha256.Sum256(root.Raw), pub, nil
}

var oidSubjectAltName = asn1.ObjectIdentifier{2, 5, 29, 17}

// credentialSecret binds the activation to this handshake (nonce), this
// EK certificate and this AK.
func (v *verifier) credentialSecret(nonce string, ekDER, akSPKI []byte) []byte {
	return credentialSecret(v.opts.CredentialKey, nonce, ekDER, akSPKI)
}

// activated says whether got is the credential secret of this
// handshake under the credential key or an earlier one.
func (v *verifier) activated(got []byte, nonce string, ekDER, akSPKI []byte) bool {
	if hmac.Equal(got, v.credentialSecret(nonce, ekDER, akSPKI)) {
		return true
	}
	for _, k := range v.opts.PreviousCredentialKeys {
		if hmac.Equal(got, credentialSecret(k, nonce, ekDER, akSPKI)) {
			return true
		}
	}
	return false
}

func credentialSecret(key []byte, nonce string, ekDER, akSPKI []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(credentialLabel))
	m.Write([]byte(nonce))
	m.Write([]byte{0})
	e, a := sha256.Sum256(ekDER), sha256.Sum256(akSPKI)
	m.Write(e[:])
	m.Write(a[:])
	return m.Sum(nil)
}

// Challenge implements the broker's optional challenger: for a guest
// that sent its EK certificate and AK, the credential it must activate.
// Nothing is answered (nil) when the verifier trusts no EK CA or the
// guest sent none.
func (v *verifier) Challenge(ctx context.Context, nonce string, extra json.RawMessage) (json.RawMessage, error) {
	if v.ekRoots == nil || len(v.opts.CredentialKey) == 0 {
		return nil, nil
	}
	var p map[string]json.RawMessage
	if t := bytes.TrimSpace(extra); len(t) == 0 || t[0] != '{' {
		return nil, nil
	}
	if err := json.Unmarshal(extra, &p); err != nil {
		return nil, deny("auth extra-params: %v", err)
	}
	if p[paramEKCert] == nil {
		return nil, nil
	}
	var ekB64, akB64 string
	if err := errors.Join(json.Unmarshal(p[paramEKCert], &ekB64), json.Unmarshal(p[paramAKPublic], &akB64)); err != nil {
		return nil, deny("auth extra-params %s and %s must be base64 strings", paramEKCert, paramAKPublic)
	}
	ekDER, err1 := base64.StdEncoding.DecodeString(ekB64)
	akRaw, err2 := base64.StdEncoding.DecodeString(akB64)
	if err := errors.Join(err1, err2); err != nil {
		return nil, deny("auth extra-params are not base64: %v", err)
	}
	_, ekPub, err := v.ekAnchor(ekDER)
	if err != nil {
		return nil, deny("%v", err)
	}
	ak, err := tpm2.Unmarshal[tpm2.TPMTPublic](akRaw)
	if err != nil {
		return nil, deny("%s is not a TPMT_PUBLIC: %v", paramAKPublic, err)
	}
	if err := checkAKAttributes(ak); err != nil {
		return nil, deny("%v", err)
	}
	name, err := tpm2.ObjectName(ak)
	if err != nil {
		return nil, deny("AK name: %v", err)
	}
	key, err := tpm2.Pub(*ak)
	if err != nil {
		return nil, deny("AK public key: %v", err)
	}
	spki, err := x509.MarshalPKIXPublicKey(key)
	if err != nil {
		return nil, deny("AK public key: %v", err)
	}
	if _, err := parseAK(spki); err != nil {
		return nil, deny("AK: %v", err)
	}
	ekTmpl := tpm2.RSAEKTemplate
	ekTmpl.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: ekPub.N.Bytes()})
	if ekPub.E != 65537 {
		return nil, deny("EK exponent %d: the TCG EK template uses 65537", ekPub.E)
	}
	encKey, err := tpm2.ImportEncapsulationKey(&ekTmpl)
	if err != nil {
		return nil, deny("EK public key: %v", err)
	}
	id, enc, err := tpm2.CreateCredential(rand.Reader, encKey, name.Buffer, v.credentialSecret(nonce, ekDER, spki))
	if err != nil {
		return nil, fmt.Errorf("tpm: making the credential: %w", err)
	}
	cred, _ := json.Marshal(map[string]string{
		"id_object":  base64.StdEncoding.EncodeToString(id),
		"enc_secret": base64.StdEncoding.EncodeToString(enc),
	})
	return json.Marshal(map[string]json.RawMessage{paramCredential: cred})
}

// checkAKAttributes requires a restricted signing key that never leaves
// its TPM: the TPM refuses to sign, with a restricted key, data that
// mimics its own attestation structures, so a quote it signed is the
// TPM's own.
func checkAKAttributes(p *tpm2.TPMTPublic) error {
	a := p.ObjectAttributes
	var missing []string
	for _, c := range []struct {
		ok   bool
		name string
	}{
		{a.FixedTPM, "fixedTPM"}, {a.FixedParent, "fixedParent"}, {a.SensitiveDataOrigin, "sensitiveDataOrigin"},
		{a.Restricted, "restricted"}, {a.SignEncrypt, "sign"}, {!a.Decrypt, "not decrypt"},
	} {
		if !c.ok {
			missing = append(missing, c.name)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("the AK is not a restricted signing key bound to its TPM (missing: %v)", missing)
	}
	if p.NameAlg != tpm2.TPMAlgSHA256 {
		return fmt.Errorf("the AK's name algorithm is %#x, want SHA-256", p.NameAlg)
	}
	return nil
}

// VerifySession implements the broker's optional sessionVerifier:
// Verify, and for evidence that carries an activated credential, the
// check that ties the AK to a trusted EK (claim "ek_ca").
func (v *verifier) VerifySession(ctx context.Context, raw json.RawMessage, reportData []byte, nonce string) (*attest.Claims, error) {
	claims, err := v.Verify(ctx, raw, reportData)
	if err != nil {
		return nil, err
	}
	var ev struct {
		AKPublic   string `json:"ak_public"`
		EKCert     string `json:"ek_cert"`
		Credential string `json:"ak_credential"`
	}
	if err := json.Unmarshal(raw, &ev); err != nil {
		return nil, deny("%v", err)
	}
	if ev.Credential == "" && ev.EKCert == "" {
		return claims, nil // a registered AK's evidence, or Trustee's
	}
	if v.ekRoots == nil || len(v.opts.CredentialKey) == 0 {
		return nil, deny("evidence carries an activated credential, but this broker trusts no EK CA ([tpm] ek_ca)")
	}
	ekDER, err1 := base64.StdEncoding.DecodeString(ev.EKCert)
	got, err2 := base64.StdEncoding.DecodeString(ev.Credential)
	spki, err3 := base64.StdEncoding.DecodeString(ev.AKPublic)
	if err := errors.Join(err1, err2, err3); err != nil {
		return nil, deny("ek_cert, ak_credential or ak_public is not base64: %v", err)
	}
	anchor, _, err := v.ekAnchor(ekDER)
	if err != nil {
		return nil, deny("%v", err)
	}
	if !v.activated(got, nonce, ekDER, spki) {
		return nil, deny("the activated credential is not this handshake's for this EK and AK: the AK was not shown to live in the TPM of that EK certificate (or the evidence is replayed)")
	}
	claims.Values["ek_ca"] = hex.EncodeToString(anchor[:])
	return claims, nil
}
