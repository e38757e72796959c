package config

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"strings"
	"time"

	"github.com/cwrun/cwrun/attest/kbs"
)

// Rotating the secrets key (the key that seals passphrases and
// resources at rest and session cookies): the file named by secrets_key
// may hold several keys, one per line. The first seals; the others are
// earlier keys kept so that what they sealed still opens. RotateSecrets
// puts a new key first; once every replica runs with the new file, the
// admin API's reseal moves each record onto it, and FinishRotation
// leaves the new key alone in the file.

// SecretsFile describes a secrets key file.
type SecretsFile struct {
	Path string
	// KeyID names the first key's at-rest key (kbs.AtRestKeyID): the
	// one a broker started on this file seals under.
	KeyID string
	// Previous is how many earlier keys the file keeps.
	Previous int
}

// ReadSecretsFile describes the secrets key file that the config at
// configPath names.
func ReadSecretsFile(configPath string) (SecretsFile, error) {
	path, secrets, err := readSecretsOf(configPath)
	if err != nil {
		return SecretsFile{}, err
	}
	defer clearAll(secrets)
	return describeSecrets(path, secrets)
}

func describeSecrets(path string, secrets [][]byte) (SecretsFile, error) {
	_, atRest, err := deriveKeys(secrets[0])
	if err != nil {
		return SecretsFile{}, err
	}
	defer clear(atRest)
	return SecretsFile{Path: path, KeyID: kbs.AtRestKeyID(atRest), Previous: len(secrets) - 1}, nil
}

// RotateSecrets writes a new random key first into the secrets key file
// that the config at configPath names, keeping the keys it held after
// it. A broker started on the file seals under the new key and still
// opens what the earlier ones sealed.
func RotateSecrets(configPath string, now time.Time) (SecretsFile, error) {
	path, secrets, err := readSecretsOf(configPath)
	if err != nil {
		return SecretsFile{}, err
	}
	defer clearAll(secrets)
	fresh := make([]byte, 32)
	if _, err := rand.Read(fresh); err != nil {
		return SecretsFile{}, err
	}
	secrets = append([][]byte{fresh}, secrets...)
	var b strings.Builder
	fmt.Fprintf(&b, "# The broker's secrets key, rotated %s. The first key seals; the ones\n", now.UTC().Format(time.RFC3339))
	b.WriteString("# after it are earlier keys, kept so that what they sealed still opens,\n")
	b.WriteString("# until `cwrun kbs reseal` has moved every record onto the first and\n")
	b.WriteString("# `cwrun kbs rotate-secrets --drop-previous` removes them.\n")
	if err := writeSecrets(path, b.String(), secrets); err != nil {
		return SecretsFile{}, err
	}
	return describeSecrets(path, secrets)
}

// FinishRotation ends a rotation: it asks the broker behind c to
// reseal, and only when that broker seals under the first key of the
// secrets key file at configPath and opened every record does it drop
// the earlier keys from the file. Dropping a key that a record still
// needs would lose that record's secret for good, so anything else
// leaves the file as it was. A file holding one key is left alone, and
// the report is then zero (no broker was asked).
func FinishRotation(ctx context.Context, configPath string, c *kbs.AdminClient) (SecretsFile, kbs.ResealReport, error) {
	var rep kbs.ResealReport
	sf, err := ReadSecretsFile(configPath)
	if err != nil || sf.Previous == 0 {
		return sf, rep, err
	}
	const kept = "; nothing dropped (the broker must confirm that no record needs the earlier keys)"
	if rep, err = c.Reseal(ctx); err != nil {
		return sf, rep, fmt.Errorf("asking the broker to reseal: %w%s", err, kept)
	}
	if rep.KeyID != sf.KeyID {
		return sf, rep, fmt.Errorf("the broker at %s seals under key id %s, not %s, the first key in %s: restart it (and every broker sharing its store) on this file, run `cwrun kbs reseal`, then this again; nothing dropped",
			c.BaseURL, rep.KeyID, sf.KeyID, sf.Path)
	}
	if !rep.Done() {
		return sf, rep, fmt.Errorf("no key the broker holds opens %d record(s): %s; they need a key that is in neither this file nor the broker's%s",
			len(rep.Unopened), truncateList(rep.Unopened, 5), kept)
	}
	sf, err = dropPreviousSecrets(configPath)
	return sf, rep, err
}

// dropPreviousSecrets leaves only the first key in the secrets key file
// that the config at configPath names (FinishRotation checks first).
func dropPreviousSecrets(configPath string) (SecretsFile, error) {
	path, secrets, err := readSecretsOf(configPath)
	if err != nil {
		return SecretsFile{}, err
	}
	defer clearAll(secrets)
	if err := writeSecrets(path, "", secrets[:1]); err != nil {
		return SecretsFile{}, err
	}
	return describeSecrets(path, secrets[:1])
}

func readSecretsOf(configPath string) (string, [][]byte, error) {
	c, err := Read(configPath)
	if err != nil {
		return "", nil, err
	}
	if c.SecretsKey == "" {
		return "", nil, fmt.Errorf("%s names no secrets_key", configPath)
	}
	secrets, err := readSecrets(c.SecretsKey)
	return c.SecretsKey, secrets, err
}

// writeSecrets replaces the file with header and the keys in hex, one
// per line, mode 0600.
func writeSecrets(path, header string, secrets [][]byte) error {
	data := []byte(header)
	for _, k := range secrets {
		data = hex.AppendEncode(data, k)
		data = append(data, '\n')
	}
	defer clear(data)
	if err := replaceFile(path, data, 0o600); err != nil {
		return fmt.Errorf("secrets key: %w (%s is unchanged)", err, path)
	}
	return nil
}

func clearAll(bs [][]byte) {
	for _, b := range bs {
		clear(b)
	}
}
