package kbs

import (
	"encoding/json"
	"errors"
	"strings"

	"github.com/cwrun/cwrun/attest"
	"github.com/cwrun/cwrun/attest/internal/jsonx"
)

// checkTeePubKey refuses, at /attest, a TEE key that the resource step
// could not encrypt to: better to fail the handshake with a reason than
// to hand out a token that can never fetch anything. What it accepts is
// exactly what attest.EncryptResource accepts (it asks the same parser),
// less keys that arrive with their private part.
func checkTeePubKey(raw json.RawMessage) error {
	if len(raw) == 0 || string(raw) == "null" {
		return errors.New("runtime-data has no tee-pubkey")
	}
	// encoding/json matched member names without regard to case; so
	// does this scan.
	private := false
	r := jsonx.NewReader(raw)
	if r.Object(func(name string) error {
		if strings.EqualFold(name, "d") || strings.EqualFold(name, "p") || strings.EqualFold(name, "dp") {
			private = true
		}
		return r.Skip()
	}) == nil && private {
		// A guest that sends its private key has lost it; refuse rather
		// than encrypt to a key the whole path may have seen.
		return errors.New("tee-pubkey carries a private part; send only the public key")
	}
	if _, err := attest.ParseTeePubKey(raw); err != nil {
		return err
	}
	return nil
}
