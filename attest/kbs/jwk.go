package kbs

import (
	"encoding/json"
	"errors"

	"github.com/cwrun/cwrun/attest"
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
	var priv struct {
		D  json.RawMessage `json:"d"`
		P  json.RawMessage `json:"p"`
		DP json.RawMessage `json:"dp"`
	}
	if json.Unmarshal(raw, &priv) == nil && (priv.D != nil || priv.P != nil || priv.DP != nil) {
		// A guest that sends its private key has lost it; refuse rather
		// than encrypt to a key the whole path may have seen.
		return errors.New("tee-pubkey carries a private part; send only the public key")
	}
	if _, err := attest.ParseTeePubKey(raw); err != nil {
		return err
	}
	return nil
}
