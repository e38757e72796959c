package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"

	"github.com/cwrun/cwrun/sealed"
	"github.com/spf13/pflag"
)

// kbsRegisterOpts are `cwrun build`'s flags for registering the sealed
// workload with a key broker.
type kbsRegisterOpts struct {
	url, adminKey, caCert string
	refs                  []string
}

func (o *kbsRegisterOpts) addFlags(f *pflag.FlagSet) {
	f.StringVar(&o.url, "kbs", os.Getenv("CWRUN_KBS_URL"), "register the disk key with this key broker (https://HOST:PORT; env CWRUN_KBS_URL) instead of handing it to you")
	f.StringVar(&o.adminKey, "kbs-admin-key", os.Getenv("CWRUN_KBS_ADMIN_KEY"), "the broker's admin key (env CWRUN_KBS_ADMIN_KEY; default: admin.key in the broker's config folder)")
	f.StringVar(&o.caCert, "kbs-cacert", os.Getenv("CWRUN_KBS_CACERT"), "CA certificate of the broker's TLS (env CWRUN_KBS_CACERT; default: tls.crt in the broker's config folder when present)")
	f.StringArrayVar(&o.refs, "ref", nil, "a reference value the guest's evidence must match, NAME=VALUE (repeatable; e.g. measurement=<hex> for snp, mr_td=<hex> for tdx)")
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
	if tee == sealed.TEETPM {
		return nil, errors.New("--tee tpm with --kbs: TPM attestation is not available in this cwrun yet; use --tee sample for development, or seal without --kbs")
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
		if err := kbs(ctx, pass, args...); err != nil {
			return nil, err
		}
		return func(ctx context.Context) error { return kbs(ctx, nil, "workload", "rm", c.WorkloadID) }, nil
	}, nil
}
