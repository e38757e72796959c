package config

import (
	"bytes"
	"context"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cwrun/cwrun/attest"
	"github.com/cwrun/cwrun/attest/kbs"
	"github.com/cwrun/cwrun/attest/kbs/store"
	"github.com/cwrun/cwrun/attest/kbs/store/sqlite"
)

// The secrets key file through a rotation: a new key first, the old one
// kept after it (so Load hands the broker both), then dropped.
func TestRotateSecrets(t *testing.T) {
	dir := initDir(t, InitOptions{})
	cfg := filepath.Join(dir, FileName)
	keyFile := filepath.Join(dir, SecretsKeyFile)
	before, err := Load(cfg)
	if err != nil {
		t.Fatal(err)
	}
	sf, err := ReadSecretsFile(cfg)
	if err != nil || sf.Previous != 0 || sf.KeyID != kbs.AtRestKeyID(before.keys.atRest) {
		t.Fatalf("ReadSecretsFile of init's file = %+v, %v", sf, err)
	}

	sf, err = RotateSecrets(cfg, time.Date(2026, 12, 5, 7, 0, 0, 0, time.UTC))
	if err != nil {
		t.Fatal(err)
	}
	data, _ := os.ReadFile(keyFile)
	if !bytes.HasPrefix(data, []byte("# The broker's secrets key, rotated 2026-12-05T07:00:00Z.")) {
		t.Errorf("the rotated file does not say what it holds:\n%s", data)
	}
	if fi, _ := os.Stat(keyFile); fi.Mode().Perm() != 0o600 {
		t.Errorf("the rotated file has mode %v", fi.Mode().Perm())
	}
	if _, err := os.Stat(keyFile + ".new"); !os.IsNotExist(err) {
		t.Errorf("a .new file was left behind: %v", err)
	}
	after, err := Load(cfg)
	if err != nil {
		t.Fatal(err)
	}
	k := after.keys
	if sf.Previous != 1 || sf.KeyID != kbs.AtRestKeyID(k.atRest) || sf.KeyID == kbs.AtRestKeyID(before.keys.atRest) {
		t.Errorf("after the rotation: %+v", sf)
	}
	if bytes.Equal(k.atRest, before.keys.atRest) || len(k.prevAtRest) != 1 || !bytes.Equal(k.prevAtRest[0], before.keys.atRest) ||
		len(k.prevCookie) != 1 || !bytes.Equal(k.prevCookie[0], before.keys.cookie) ||
		len(k.prevTpmCredential) != 1 || !bytes.Equal(k.prevTpmCredential[0], before.keys.tpmCredential) {
		t.Error("Load does not give the new key first and the old one as previous")
	}
	o, closer, err := after.Options(context.Background(), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	closer.Close()
	if len(o.PreviousAtRestKeys) != 1 || len(o.PreviousCookieKeys) != 1 {
		t.Error("the broker's options lack the previous keys")
	}
	if !found(Check(context.Background(), cfg, time.Now()), Note, "config", "1 earlier key(s)") {
		t.Error("check does not mention the rotation in progress")
	}

	// A second rotation keeps both earlier keys.
	if sf, err = RotateSecrets(cfg, time.Now()); err != nil || sf.Previous != 2 {
		t.Fatalf("second rotation: %+v, %v", sf, err)
	}
	first := sf.KeyID
	sf, err = dropPreviousSecrets(cfg)
	if err != nil || sf.Previous != 0 || sf.KeyID != first {
		t.Fatalf("DropPreviousSecrets = %+v, %v; want the first key (%s) alone", sf, err, first)
	}
	if data, _ := os.ReadFile(keyFile); bytes.Count(data, []byte("\n")) != 1 {
		t.Errorf("after the drop the file holds:\n%s", data)
	}
}

func TestReadSecretsRefuses(t *testing.T) {
	k1, k2 := strings.Repeat("ab", 32), strings.Repeat("cd", 32)
	for _, c := range []struct{ name, data, want string }{
		{"empty", "# nothing\n\n", "holds no key"},
		{"short", k1 + "\n" + "abcd\n", "line 2 does not hold 32 bytes"},
		{"repeated", k1 + "\n# old:\n" + k2 + "\n" + k1 + "\n", "line 4 repeats an earlier key"},
	} {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "secrets.key")
			os.WriteFile(p, []byte(c.data), 0o600)
			if _, err := readSecrets(p); err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("readSecrets: %v; want %q", err, c.want)
			}
		})
	}
	// One key without a newline, as `openssl rand -hex 32 > f` writes
	// it less the newline, and base64: both still read.
	p := filepath.Join(t.TempDir(), "secrets.key")
	os.WriteFile(p, []byte("  "+k1+"  "), 0o600)
	if ks, err := readSecrets(p); err != nil || len(ks) != 1 {
		t.Errorf("a bare hex key: %d keys, %v", len(ks), err)
	}
	os.WriteFile(p, []byte("q6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s=\n"), 0o600)
	if ks, err := readSecrets(p); err != nil || len(ks) != 1 {
		t.Errorf("a base64 key: %d keys, %v", len(ks), err)
	}
}

// FinishRotation drops the earlier keys only for a broker that seals
// under the file's first key and opens every record.
func TestFinishRotation(t *testing.T) {
	ctx := context.Background()
	dir := initDir(t, InitOptions{})
	cfg := filepath.Join(dir, FileName)
	keyFile := filepath.Join(dir, SecretsKeyFile)
	// A broker on the old key, reached through the admin API.
	serve := func() (*kbs.AdminClient, func()) {
		c, err := Load(cfg)
		if err != nil {
			t.Fatal(err)
		}
		o, closer, err := c.Options(ctx, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		srv, err := kbs.New(o)
		if err != nil {
			t.Fatal(err)
		}
		ts := httptest.NewServer(srv)
		ad, err := NewAdminClient(ClientOptions{URL: ts.URL, Dir: dir})
		if err != nil {
			t.Fatal(err)
		}
		return ad, func() { ts.Close(); closer.Close() }
	}
	ad, stop := serve()
	if _, err := ad.AddWorkload(ctx, kbs.WorkloadSpec{ID: "w", Tee: attest.TeeSample, Passphrase: "pw"}); err != nil {
		t.Fatal(err)
	}
	if _, err := RotateSecrets(cfg, time.Now()); err != nil {
		t.Fatal(err)
	}
	rotated, _ := os.ReadFile(keyFile)
	// Not restarted: it seals under the old key.
	if _, _, err := FinishRotation(ctx, cfg, ad); err == nil || !strings.Contains(err.Error(), "seals under key id") {
		t.Fatalf("FinishRotation with a broker not restarted: %v", err)
	}
	stop()

	// Restarted on the file, but the store holds a record of another
	// secrets key.
	ad, stop = serve()
	defer func() { stop() }()
	st, err := sqlite.Open(ctx, filepath.Join(dir, "kbs.db"))
	if err != nil {
		t.Fatal(err)
	}
	st.AddWorkload(ctx, store.Workload{ID: "stray", Tee: "sample", SealedPassphrase: bytes.Repeat([]byte{1}, 64), References: map[string][]string{}})
	st.Close()
	if _, _, err := FinishRotation(ctx, cfg, ad); err == nil || !strings.Contains(err.Error(), "workload stray") {
		t.Fatalf("FinishRotation with a record no key opens: %v", err)
	}
	if now, _ := os.ReadFile(keyFile); !bytes.Equal(now, rotated) {
		t.Fatal("a refused FinishRotation changed the secrets key file")
	}
	if err := ad.DeleteWorkload(ctx, "stray"); err != nil {
		t.Fatal(err)
	}
	sf, rep, err := FinishRotation(ctx, cfg, ad)
	if err != nil || sf.Previous != 0 || rep.Resealed+rep.Current != 1 || !rep.Done() {
		t.Fatalf("FinishRotation = %+v, %+v, %v; want w under the new key (resealed by the refused try) and the old key dropped", sf, rep, err)
	}
	if sf, rep, err := FinishRotation(ctx, cfg, ad); err != nil || rep.KeyID != "" || sf.Previous != 0 {
		t.Errorf("FinishRotation of a one-key file = %+v, %+v, %v; want nothing asked", sf, rep, err)
	}
}
