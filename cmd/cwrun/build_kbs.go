package main

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/cwrun/cwrun/attest/kbs"
	"github.com/cwrun/cwrun/attest/kbs/config"
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
	f.StringVar(&o.adminKey, "kbs-admin-key", os.Getenv("CWRUN_KBS_ADMIN_KEY"), "the broker's admin key (env CWRUN_KBS_ADMIN_KEY; default: admin.key in "+config.DefaultDir()+")")
	f.StringVar(&o.caCert, "kbs-cacert", os.Getenv("CWRUN_KBS_CACERT"), "CA certificate of the broker's TLS (env CWRUN_KBS_CACERT; default: tls.crt in "+config.DefaultDir()+" when present)")
	f.StringArrayVar(&o.refs, "ref", nil, "a reference value the guest's evidence must match, NAME=VALUE (repeatable; e.g. measurement=<hex> for snp, mr_td=<hex> for tdx)")
}

// mustHave names, per TEE, the claim without which any genuine machine
// of that kind would get the key: a host could boot its own guest on
// the same CPU and ask for it.
var mustHave = map[sealed.TEE]string{sealed.TEESNP: "measurement", sealed.TEETDX: "mr_td"}

// registrar checks the flags and returns build's Register hook.
func (o *kbsRegisterOpts) registrar(tee sealed.TEE) (func(context.Context, sealed.Config, []byte) (func(context.Context) error, error), error) {
	refs, err := parseRefs(o.refs)
	if err != nil {
		return nil, err
	}
	if tee == sealed.TEETPM {
		return nil, errors.New("--tee tpm with --kbs: TPM attestation is not available in this cwrun yet; use --tee sample for development, or seal without --kbs")
	}
	if need, ok := mustHave[tee]; ok && len(refs[need]) == 0 {
		return nil, fmt.Errorf("--tee %s --kbs without --ref %s=<hex>: the broker would release the key to any genuine %s guest, including one the host boots itself; give the expected %s (repeat --ref for several)", tee, need, tee, need)
	}
	client, err := config.NewAdminClient(config.ClientOptions{URL: o.url, AdminKey: o.adminKey, CACert: o.caCert})
	if err != nil {
		return nil, err
	}
	return func(ctx context.Context, c sealed.Config, pass []byte) (func(context.Context) error, error) {
		spec := kbs.WorkloadSpec{
			ID: c.WorkloadID, Tee: string(c.TEE), Passphrase: string(pass),
			References: refs, CPUs: c.CPUs, MemoryMiB: c.RAMMiB,
		}
		if _, err := client.AddWorkload(ctx, spec); err != nil {
			if errors.Is(err, kbs.ErrExists) {
				return nil, fmt.Errorf("%w: the broker never overwrites a workload; pick another --workload-id or remove the old one with `cwrun kbs workload rm %s`", err, c.WorkloadID)
			}
			return nil, err
		}
		return func(ctx context.Context) error { return client.DeleteWorkload(ctx, c.WorkloadID) }, nil
	}, nil
}
