package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"

	"github.com/cwrun/cwrun/launcher"
	"github.com/cwrun/cwrun/sealed"
	"github.com/spf13/pflag"
)

// tpmCAFingerprint is the broker's "ek_ca" claim for a CA certificate
// file: the SHA-256 of its DER encoding.
func tpmCAFingerprint(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("--tpm-ek-ca: %w", err)
	}
	if blk, _ := pem.Decode(b); blk != nil {
		b = blk.Bytes
	}
	cert, err := x509.ParseCertificate(b)
	if err != nil {
		return "", fmt.Errorf("--tpm-ek-ca %s: not a PEM or DER certificate: %v", path, err)
	}
	if !cert.IsCA {
		return "", fmt.Errorf("--tpm-ek-ca %s: %s is not a CA certificate", path, cert.Subject)
	}
	sum := sha256.Sum256(cert.Raw)
	return hex.EncodeToString(sum[:]), nil
}

// kbsRegisterOpts are `cwrun build`'s flags for registering the sealed
// workload with a key broker.
type kbsRegisterOpts struct {
	url, adminKey, caCert string
	refs                  []string
	ekCAs                 []string
}

func (o *kbsRegisterOpts) addFlags(f *pflag.FlagSet) {
	f.StringVar(&o.url, "kbs", os.Getenv("CWRUN_KBS_URL"), "register the disk key with this key broker (https://HOST:PORT; env CWRUN_KBS_URL) instead of handing it to you")
	f.StringVar(&o.adminKey, "kbs-admin-key", os.Getenv("CWRUN_KBS_ADMIN_KEY"), "the broker's admin key (env CWRUN_KBS_ADMIN_KEY; default: admin.key in the broker's config folder)")
	f.StringVar(&o.caCert, "kbs-cacert", os.Getenv("CWRUN_KBS_CACERT"), "CA certificate of the broker's TLS (env CWRUN_KBS_CACERT; default: ca.crt, or tls.crt, in the broker's config folder when present)")
	f.StringArrayVar(&o.refs, "ref", nil, "a reference value the guest's evidence must match, NAME=VALUE (repeatable; e.g. measurement=<hex> for snp, mr_td=<hex> for tdx)")
	f.StringArrayVar(&o.ekCAs, "tpm-ek-ca", nil, "with --tee tpm: a root CA certificate (PEM or DER) of the TPMs whose endorsement keys the broker may trust for this workload (repeatable; a vTPM's is the launcher's vTPM CA, see `cwrun run --help`)")
}

// mustHave names, per TEE, the claim without which any genuine machine
// of that kind would get the key: a host could boot its own guest on
// the same CPU and ask for it.
var mustHave = map[sealed.TEE]string{sealed.TEESNP: "measurement", sealed.TEETDX: "mr_td"}

// registrar checks the flags and returns build's Register hook. The
// registration itself is `cwrun-kbs workload add`, the passphrase on
// its stdin (never in argv).
func (o *kbsRegisterOpts) registrar(tee sealed.TEE) (func(context.Context, sealed.Config, []byte) (func(context.Context) error, error), error) {
	names := map[string]bool{}
	for _, r := range o.refs {
		name, value, ok := strings.Cut(r, "=")
		if !ok || strings.TrimSpace(name) == "" || strings.TrimSpace(value) == "" {
			return nil, fmt.Errorf("--ref %q: want NAME=VALUE, e.g. measurement=<96 hex digits>", r)
		}
		names[strings.TrimSpace(name)] = true
	}
	if len(o.ekCAs) > 0 && tee != sealed.TEETPM {
		return nil, fmt.Errorf("--tpm-ek-ca is for --tee tpm, not %s", tee)
	}
	for _, f := range o.ekCAs {
		sum, err := tpmCAFingerprint(f)
		if err != nil {
			return nil, err
		}
		o.refs = append(o.refs, "ek_ca="+sum)
		names["ek_ca"] = true
	}
	if tee == sealed.TEETPM && !names["ek_ca"] && !names["ak"] {
		return nil, errors.New("--tee tpm --kbs without --tpm-ek-ca FILE (or --ref ek_ca=<hex> / --ref ak=<hex>): the broker would release the key to any TPM, including one the host emulates itself; give the CA that signs your TPMs' endorsement keys (for cwrun's software TPMs, the launcher's vTPM CA certificate), or the AK of one TPM")
	}
	if need, ok := mustHave[tee]; ok && !names[need] {
		return nil, fmt.Errorf("--tee %s --kbs without --ref %s=<hex>: the broker would release the key to any genuine %s guest, including one the host boots itself; give the expected %s (repeat --ref for several)", tee, need, tee, need)
	}
	bin, err := findKbs()
	if err != nil {
		return nil, err
	}
	client := []string{"--kbs", o.url}
	if o.adminKey != "" {
		client = append(client, "--admin-key", o.adminKey)
	}
	if o.caCert != "" {
		client = append(client, "--cacert", o.caCert)
	}
	kbs := func(ctx context.Context, stdin []byte, args ...string) error {
		cmd := exec.CommandContext(ctx, bin, append(args, client...)...)
		cmd.Stdin = bytes.NewReader(stdin)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Run(); err != nil {
			msg := strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(stderr.String()), "cwrun kbs:"))
			if msg == "" {
				msg = err.Error()
			}
			return errors.New(strings.TrimSpace(msg))
		}
		return nil
	}
	return func(ctx context.Context, c sealed.Config, pass []byte) (func(context.Context) error, error) {
		args := []string{"workload", "add", c.WorkloadID, "--tee", string(c.TEE), "--passphrase-stdin",
			"--cpus", strconv.Itoa(c.CPUs), "--memory", strconv.Itoa(c.RAMMiB)}
		for _, r := range o.refs {
			args = append(args, "--ref", r)
		}
		if tee == sealed.TEETPM {
			// What the run will boot, measured ahead: a --ref of the
			// same name overrides it.
			refs, err := launcher.TPMReferenceValues(ctx, launcher.Options{}, c.RAMMiB)
			if err != nil {
				return nil, fmt.Errorf("the broker needs the digests of what a tpm run boots: %w", err)
			}
			for _, name := range slices.Sorted(maps.Keys(refs)) {
				if !names[name] {
					args = append(args, "--ref", name+"="+refs[name])
				}
			}
		}
		if err := kbs(ctx, pass, args...); err != nil {
			return nil, err
		}
		return func(ctx context.Context) error { return kbs(ctx, nil, "workload", "rm", c.WorkloadID) }, nil
	}, nil
}
