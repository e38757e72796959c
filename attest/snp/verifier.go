// Package snp verifies AMD SEV-SNP evidence in the broker and produces
// it in the guest.
//
// Evidence is Trustee's `snp` JSON: the serde form of the virtee `sev`
// crate's attestation report and, when the host supplied it, the
// certificate table (VCEK or VLEK). The verifier rebuilds the binary
// report from the JSON, checks the VCEK/VLEK chains up to AMD's roots
// and the report's signature, the report data binding, and the guest
// policy's debug bit. It never compares measurements with reference
// values (that is appraisal's job) and never trusts a certificate the
// evidence brings beyond the endorsement key itself.
package snp

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"embed"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/cwrun/cwrun/attest"
	"github.com/cwrun/cwrun/attest/internal/atomicfile"
	"github.com/google/go-sev-guest/abi"
	"github.com/google/go-sev-guest/verify/trust"
)

// TCB is an SEV-SNP TCB version: the security patch levels of the AMD
// secure processor's firmware parts and of the CPU microcode. FMC exists
// on Turin and later only.
type TCB struct {
	Bootloader uint8
	TEE        uint8
	SNP        uint8
	Microcode  uint8
	FMC        uint8
}

func (t TCB) String() string {
	return fmt.Sprintf("bootloader=%d tee=%d snp=%d microcode=%d fmc=%d", t.Bootloader, t.TEE, t.SNP, t.Microcode, t.FMC)
}

// atLeast reports whether every part of t is at least min's.
func (t TCB) atLeast(min TCB) bool {
	return t.Bootloader >= min.Bootloader && t.TEE >= min.TEE && t.SNP >= min.SNP &&
		t.Microcode >= min.Microcode && t.FMC >= min.FMC
}

func tcbOf(t tcbJSON) TCB {
	out := TCB{Bootloader: t.Bootloader, TEE: t.TEE, SNP: t.SNP, Microcode: t.Microcode}
	if t.FMC != nil {
		out.FMC = *t.FMC
	}
	return out
}

// Options configures NewVerifier. The zero value verifies evidence that
// carries its VCEK or VLEK, against AMD's published roots.
type Options struct {
	// CacheDir is a folder of VCEK certificates (DER or PEM) read when
	// the evidence carries none, and where what Getter fetched is kept.
	// A file is named vcek-<hwid>-bl<N>-tee<N>-snp<N>-ucode<N>.der
	// (Turin adds -fmc<N>), hwid being the report's CHIP_ID in lower-case
	// hex (its first 8 bytes on Turin) and N the reported TCB's parts in
	// decimal: the same values AMD's key server is asked with. "": none.
	CacheDir string
	// Getter fetches VCEKs from AMD's key server (KDS) when neither the
	// evidence nor CacheDir has one; go-sev-guest's
	// trust.DefaultHTTPSGetter() does so over HTTPS. AMD allows about one
	// request per 10 s per address, so keep CacheDir set with it. nil:
	// AMD is never asked.
	Getter trust.HTTPSGetter
	// Now is the time at which certificates must be valid. nil: time.Now.
	Now func() time.Time
	// MinTCB, when set, is the lowest reported TCB accepted: every part
	// must be at least MinTCB's. nil: not checked.
	MinTCB *TCB
	// Roots, when set, replaces AMD's roots: for each product line
	// ("Milan", "Genoa", "Turin"), the ARK with its ASK (VCEK chains)
	// and/or ASVK (VLEK chains). Tests pass go-sev-guest's fake signer's.
	// nil: the roots AMD publishes (embedded).
	Roots map[string][]*trust.AMDRootCerts
	// Logger receives key server fetches and cache write failures. nil:
	// nothing is logged.
	Logger *slog.Logger
}

//go:embed roots/*.pem
var rootsFS embed.FS

// productLines are the products whose roots are embedded, with their
// files under roots/ (AMD's ASK, ARK and ASVK, as Trustee embeds them).
var productLines = map[string]string{
	"Milan": "roots/milan_ask_ark_asvk.pem",
	"Genoa": "roots/genoa_ask_ark_asvk.pem",
	"Turin": "roots/turin_ask_ark_asvk.pem",
}

// rootSet is one product line's ARK with the intermediates it signed.
type rootSet struct {
	ark, ask, asvk *x509.Certificate
}

// intermediate is the CA that certifies key's kind of endorsement key.
func (r rootSet) intermediate(key abi.ReportSigner) *x509.Certificate {
	if key == abi.VlekReportSigner {
		return r.asvk
	}
	return r.ask
}

// endorsement is a VCEK or VLEK whose chain to AMD's roots was checked.
type endorsement struct {
	pub         *p384Key
	ext         *vekExtensions
	productLine string
	// The chain holds only between these times.
	notBefore, notAfter time.Time
}

type chainKey struct {
	der         [sha256.Size]byte
	key         abi.ReportSigner
	productLine string
}

// maxChains bounds the chain cache; a broker sees one VCEK per chip and
// TCB version, so a fleet rarely comes near it.
const maxChains = 4096

type verifier struct {
	opts  Options
	now   func() time.Time
	log   *slog.Logger
	roots map[string][]rootSet

	mu     sync.RWMutex
	chains map[chainKey]*endorsement

	// fetchMu makes concurrent handshakes from one chip ask AMD once.
	fetchMu sync.Mutex
}

// NewVerifier returns the SEV-SNP verifier.
func NewVerifier(opts Options) (attest.Verifier, error) {
	v := &verifier{
		opts:   opts,
		now:    opts.Now,
		log:    opts.Logger,
		chains: map[chainKey]*endorsement{},
	}
	if v.now == nil {
		v.now = time.Now
	}
	if v.log == nil {
		v.log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	var err error
	if opts.Roots != nil {
		v.roots, err = rootsFromOptions(opts.Roots)
	} else {
		v.roots, err = defaultRoots()
	}
	if err != nil {
		return nil, err
	}
	if opts.CacheDir != "" {
		if fi, err := os.Stat(opts.CacheDir); err != nil || !fi.IsDir() {
			return nil, fmt.Errorf("snp VCEK cache %s is not a folder: create it or leave the cache unset", opts.CacheDir)
		}
	}
	return v, nil
}

func (v *verifier) Tee() string { return attest.TeeSNP }

func rootsFromOptions(in map[string][]*trust.AMDRootCerts) (map[string][]rootSet, error) {
	out := map[string][]rootSet{}
	for line, list := range in {
		for _, r := range list {
			if r == nil || r.ProductCerts == nil || r.ProductCerts.Ark == nil {
				return nil, fmt.Errorf("snp roots for %s: an entry has no ARK", line)
			}
			pc := r.ProductCerts
			out[line] = append(out[line], rootSet{ark: pc.Ark, ask: pc.Ask, asvk: pc.Asvk})
		}
	}
	return out, nil
}

// defaultRoots are AMD's: the embedded PEMs (ASK, ARK, ASVK per product)
// and go-sev-guest's embedded ASK/ARK, where they differ.
func defaultRoots() (map[string][]rootSet, error) {
	out := map[string][]rootSet{}
	for line, file := range productLines {
		data, err := rootsFS.ReadFile(file)
		if err != nil {
			return nil, err
		}
		var set rootSet
		for len(data) > 0 {
			var block *pem.Block
			block, data = pem.Decode(data)
			if block == nil {
				break
			}
			cert, err := x509.ParseCertificate(block.Bytes)
			if err != nil {
				return nil, fmt.Errorf("embedded AMD root %s: %w", file, err)
			}
			switch cert.Subject.CommonName {
			case "ARK-" + line:
				set.ark = cert
			case "SEV-" + line:
				set.ask = cert
			case "SEV-VLEK-" + line:
				set.asvk = cert
			default:
				return nil, fmt.Errorf("embedded AMD root %s holds an unexpected %q", file, cert.Subject.CommonName)
			}
		}
		if set.ark == nil || set.ask == nil || set.asvk == nil {
			return nil, fmt.Errorf("embedded AMD root %s lacks the ARK, ASK or ASVK", file)
		}
		out[line] = append(out[line], set)
		if gsg, ok := trust.DefaultRootCerts[line]; ok && gsg.ProductCerts != nil && gsg.ProductCerts.Ark != nil &&
			(!gsg.ProductCerts.Ark.Equal(set.ark) || !gsg.ProductCerts.Ask.Equal(set.ask)) {
			out[line] = append(out[line], rootSet{ark: gsg.ProductCerts.Ark, ask: gsg.ProductCerts.Ask})
		}
	}
	return out, nil
}

// deny makes a verification failure naming the failed check.
func deny(check, format string, args ...any) error {
	return fmt.Errorf("%w: snp %s: %s", attest.ErrEvidence, check, fmt.Sprintf(format, args...))
}

// Check names, as denials and the broker's log show them.
const (
	checkFormat     = "evidence format"
	checkKey        = "endorsement key"
	checkChain      = "certificate chain"
	checkBinding    = "endorsement key binding"
	checkSignature  = "report signature"
	checkReportData = "report data"
	checkPolicy     = "guest policy"
	checkMinimumTCB = "minimum TCB"
)

func (v *verifier) Verify(ctx context.Context, evidence json.RawMessage, reportData []byte) (*attest.Claims, error) {
	ev, raw, err := parseEvidence(evidence)
	if err != nil {
		return nil, deny(checkFormat, "%v", err)
	}
	rep, err := abi.ReportToProto(raw)
	if err != nil {
		return nil, deny(checkFormat, "malformed report: %v", err)
	}
	info, err := abi.ParseSignerInfo(rep.SignerInfo)
	if err != nil {
		return nil, deny(checkFormat, "malformed key_info: %v", err)
	}
	key := info.SigningKey
	if key != abi.VcekReportSigner && key != abi.VlekReportSigner {
		return nil, deny(checkKey, "the report is signed by %v; only VCEK- and VLEK-signed reports are accepted", key)
	}
	if rep.SignatureAlgo != abi.SignEcdsaP384Sha384 {
		return nil, deny(checkSignature, "signature algorithm %d is not ECDSA P-384 with SHA-384", rep.SignatureAlgo)
	}
	turin := ev.Report.turinLayout()
	reported := tcbOf(ev.Report.ReportedTCB)
	// The product line is known from the report from version 3 on; a
	// version 2 report leaves it to the certificate.
	var productLine string
	if rep.Version >= abi.ReportVersion3 {
		productLine = productLineOfFMS(raw[offCPUIDFam], raw[offCPUIDMod])
	}

	der, err := v.endorsementKey(ctx, ev, key, productLine, turin, reported)
	if err != nil {
		return nil, err
	}
	end, err := v.chain(der, key, productLine)
	if err != nil {
		return nil, deny(checkChain, "%v", err)
	}

	// The endorsement key must be the one for this chip at the reported
	// TCB: AMD derives a VCEK from both.
	if key == abi.VcekReportSigner && !info.MaskChipKey {
		hwid := end.ext.HWID
		if !bytes.Equal(hwid, ev.Report.ChipID[:len(hwid)]) || !allZero(ev.Report.ChipID[len(hwid):]) {
			return nil, deny(checkBinding, "the VCEK belongs to chip %x, the report comes from chip %x",
				hwid, ev.Report.ChipID)
		}
	}
	certTCB := end.ext.TCB
	if !turin {
		certTCB.FMC = 0
	}
	if certTCB != reported {
		return nil, deny(checkBinding, "the %v is for TCB %v, the report states %v", key, certTCB, reported)
	}

	digest := sha512.Sum384(raw[:offSignature])
	r := leBigInt(raw[offSignature : offSignature+sigComponentSize])
	s := leBigInt(raw[offSignature+sigComponentSize : offSignature+2*sigComponentSize])
	if !verifyP384(end.pub, digest[:], r, s) {
		return nil, deny(checkSignature, "the %v did not sign this report", key)
	}

	if len(reportData) != abi.ReportDataSize {
		return nil, deny(checkReportData, "the expected report data is %d bytes, not %d", len(reportData), abi.ReportDataSize)
	}
	if !bytes.Equal(rep.ReportData, reportData) {
		return nil, deny(checkReportData, "the report binds %s…, this handshake wants %s… (a replayed or foreign report)",
			hex.EncodeToString(rep.ReportData[:8]), hex.EncodeToString(reportData[:8]))
	}

	policy, err := abi.ParseSnpPolicy(rep.Policy)
	if err != nil {
		return nil, deny(checkPolicy, "malformed guest policy %#x: %v", rep.Policy, err)
	}
	if policy.Debug {
		return nil, deny(checkPolicy, "SNP guest policy allows debugging (policy %#x): the host can read and change the guest's memory", rep.Policy)
	}
	if v.opts.MinTCB != nil && !reported.atLeast(*v.opts.MinTCB) {
		return nil, deny(checkMinimumTCB, "reported TCB %v is below the minimum %v: update the host's firmware", reported, *v.opts.MinTCB)
	}

	values := map[string]string{
		"measurement":             hex.EncodeToString(rep.Measurement),
		"host_data":               hex.EncodeToString(rep.HostData),
		"report_data":             hex.EncodeToString(rep.ReportData),
		"policy":                  fmt.Sprintf("%016x", rep.Policy),
		"policy_debug":            strconv.FormatBool(policy.Debug),
		"policy_migrate_ma":       strconv.FormatBool(policy.MigrateMA),
		"policy_smt":              strconv.FormatBool(policy.SMT),
		"guest_svn":               strconv.FormatUint(uint64(rep.GuestSvn), 10),
		"reported_tcb":            fmt.Sprintf("%016x", binary.LittleEndian.Uint64(raw[offReportedTCB:])),
		"reported_tcb_bootloader": strconv.Itoa(int(reported.Bootloader)),
		"reported_tcb_tee":        strconv.Itoa(int(reported.TEE)),
		"reported_tcb_snp":        strconv.Itoa(int(reported.SNP)),
		"reported_tcb_microcode":  strconv.Itoa(int(reported.Microcode)),
		"chip_id":                 hex.EncodeToString(rep.ChipId),
		"vmpl":                    strconv.FormatUint(uint64(rep.Vmpl), 10),
		"family_id":               hex.EncodeToString(rep.FamilyId),
		"image_id":                hex.EncodeToString(rep.ImageId),
		"id_key_digest":           hex.EncodeToString(rep.IdKeyDigest),
		"signing_key":             map[abi.ReportSigner]string{abi.VcekReportSigner: "vcek", abi.VlekReportSigner: "vlek"}[key],
		"product_line":            end.productLine,
	}
	if turin {
		values["reported_tcb_fmc"] = strconv.Itoa(int(reported.FMC))
	}
	return &attest.Claims{Tee: attest.TeeSNP, Values: values}, nil
}

// productLineOfFMS maps a report's CPUID family and model to AMD's
// product line, as the key server names it.
func productLineOfFMS(family, model uint8) string {
	switch {
	case family == 0x19 && model <= 0x0F:
		return "Milan"
	case family == 0x19 && model >= 0x10 && model <= 0x1F, family == 0x19 && model >= 0xA0 && model <= 0xAF:
		return "Genoa"
	case family == 0x1A && model <= 0x11:
		return "Turin"
	}
	return fmt.Sprintf("unknown (family %#x model %#x)", family, model)
}

// leBigInt reads AMD's little-endian signature component.
func leBigInt(le []byte) *big.Int {
	be := make([]byte, len(le))
	for i, b := range le {
		be[len(le)-1-i] = b
	}
	return new(big.Int).SetBytes(be)
}

// chain checks der's chain to the roots, or finds it checked before:
// checking the RSA-4096 chain costs more than the report's own
// signature, and a broker sees the same VCEK again and again.
func (v *verifier) chain(der []byte, key abi.ReportSigner, productLine string) (*endorsement, error) {
	now := v.now()
	k := chainKey{der: sha256.Sum256(der), key: key, productLine: productLine}
	v.mu.RLock()
	e := v.chains[k]
	v.mu.RUnlock()
	if e != nil && !now.Before(e.notBefore) && !now.After(e.notAfter) {
		return e, nil
	}
	e, err := v.checkChain(der, key, productLine, now)
	if err != nil {
		return nil, err
	}
	v.mu.Lock()
	if len(v.chains) >= maxChains {
		for old := range v.chains {
			delete(v.chains, old)
			break
		}
	}
	v.chains[k] = e
	v.mu.Unlock()
	return e, nil
}

func (v *verifier) checkChain(der []byte, key abi.ReportSigner, productLine string, now time.Time) (*endorsement, error) {
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("the %v certificate does not parse: %v", key, err)
	}
	ext, err := checkVEKCert(cert, key)
	if err != nil {
		return nil, err
	}
	if productLine == "" {
		productLine = productLineOfName(ext.ProductName)
	}
	sets := v.roots[productLine]
	if len(sets) == 0 {
		return nil, fmt.Errorf("no AMD roots for product line %q", productLine)
	}
	wantIssuer := "SEV-" + productLine
	if key == abi.VlekReportSigner {
		wantIssuer = "SEV-VLEK-" + productLine
	}
	if cert.Issuer.CommonName != wantIssuer {
		return nil, fmt.Errorf("the %v certificate is issued by %q, not %q", key, cert.Issuer.CommonName, wantIssuer)
	}
	var errs []error
	for _, set := range sets {
		ica := set.intermediate(key)
		if ica == nil {
			continue
		}
		roots, inter := x509.NewCertPool(), x509.NewCertPool()
		roots.AddCert(set.ark)
		inter.AddCert(ica)
		chains, err := cert.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: now})
		if err != nil {
			errs = append(errs, err)
			continue
		}
		pub, err := newP384Key(cert.PublicKey.(*ecdsa.PublicKey))
		if err != nil {
			return nil, fmt.Errorf("the %v certificate: %w", key, err)
		}
		e := &endorsement{pub: pub, ext: ext, productLine: productLine}
		for i, c := range chains[0] {
			if i == 0 || c.NotBefore.After(e.notBefore) {
				e.notBefore = c.NotBefore
			}
			if i == 0 || c.NotAfter.Before(e.notAfter) {
				e.notAfter = c.NotAfter
			}
		}
		return e, nil
	}
	if len(errs) == 0 {
		return nil, fmt.Errorf("no AMD root for %s has the intermediate that certifies a %v", productLine, key)
	}
	return nil, fmt.Errorf("the %v certificate does not chain to AMD's %s roots: %w", key, productLine, errors.Join(errs...))
}

// endorsementKey finds the VCEK or VLEK certificate: in the evidence,
// in the cache folder, or at AMD's key server.
func (v *verifier) endorsementKey(ctx context.Context, ev *evidence, key abi.ReportSigner, productLine string, turin bool, tcb TCB) ([]byte, error) {
	if der := ev.cert(key.String()); len(der) > 0 {
		return der, nil
	}
	if key == abi.VlekReportSigner {
		return nil, deny(checkKey, "the report is signed by a VLEK and the evidence carries no VLEK certificate; AMD's key server gives VLEKs to cloud providers only, so the host must supply it in the extended report")
	}
	chip := ev.Report.ChipID
	if allZero(chip) {
		return nil, deny(checkKey, "the evidence carries no VCEK and the report's chip ID is masked, so no VCEK can be looked up; have the host supply the VCEK")
	}
	hwid := []byte(chip)
	if turin {
		hwid = hwid[:8]
	}
	name := fmt.Sprintf("vcek-%x-bl%d-tee%d-snp%d-ucode%d", hwid, tcb.Bootloader, tcb.TEE, tcb.SNP, tcb.Microcode)
	if turin {
		name += fmt.Sprintf("-fmc%d", tcb.FMC)
	}
	name += ".der"
	if v.opts.CacheDir != "" {
		if data, err := os.ReadFile(filepath.Join(v.opts.CacheDir, name)); err == nil {
			return pemOrDER(data), nil
		}
	}
	if v.opts.Getter == nil {
		where := "pass a key server getter (kds = true in the broker's [snp] settings)"
		if v.opts.CacheDir != "" {
			where += " or put the VCEK in " + filepath.Join(v.opts.CacheDir, name)
		} else {
			where += " or a VCEK cache folder holding " + name
		}
		return nil, deny(checkKey, "no VCEK in the evidence and no key server configured; %s", where)
	}
	return v.fetchVCEK(ctx, name, hwid, productLine, turin, tcb)
}

func (v *verifier) fetchVCEK(ctx context.Context, name string, hwid []byte, productLine string, turin bool, tcb TCB) ([]byte, error) {
	v.fetchMu.Lock()
	defer v.fetchMu.Unlock()
	// Another handshake may have fetched it while this one waited.
	if v.opts.CacheDir != "" {
		if data, err := os.ReadFile(filepath.Join(v.opts.CacheDir, name)); err == nil {
			return pemOrDER(data), nil
		}
	}
	lines := []string{productLine}
	if productLine == "" {
		// A version 2 report does not say its product; try them.
		lines = []string{"Milan", "Genoa"}
	}
	var errs []error
	for _, line := range lines {
		url := fmt.Sprintf("https://kdsintf.amd.com/vcek/v1/%s/%x?blSPL=%d&teeSPL=%d&snpSPL=%d&ucodeSPL=%d",
			line, hwid, tcb.Bootloader, tcb.TEE, tcb.SNP, tcb.Microcode)
		if turin {
			url = fmt.Sprintf("https://kdsintf.amd.com/vcek/v1/%s/%x?fmcSPL=%d&blSPL=%d&teeSPL=%d&snpSPL=%d&ucodeSPL=%d",
				line, hwid, tcb.FMC, tcb.Bootloader, tcb.TEE, tcb.SNP, tcb.Microcode)
		}
		der, err := trust.GetWith(ctx, v.opts.Getter, url)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", url, err))
			continue
		}
		der = pemOrDER(der)
		v.log.InfoContext(ctx, "fetched a VCEK from AMD's key server", "url", url)
		if v.opts.CacheDir != "" {
			if err := atomicfile.Write(filepath.Join(v.opts.CacheDir, name), der, 0o644); err != nil {
				v.log.WarnContext(ctx, "could not keep the VCEK in the cache folder; AMD will be asked again", "err", err)
			}
		}
		return der, nil
	}
	return nil, deny(checkKey, "no VCEK in the evidence or the cache, and AMD's key server failed: %v", errors.Join(errs...))
}

// pemOrDER returns the DER of a certificate given as PEM or DER.
func pemOrDER(data []byte) []byte {
	if block, _ := pem.Decode(data); block != nil && block.Type == "CERTIFICATE" {
		return block.Bytes
	}
	return data
}
