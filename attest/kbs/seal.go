package kbs

import (
	"crypto/rand"
	"errors"
)

// Secrets at rest (passphrases, resources) are sealed with the at-rest
// key before the store sees them: AES-256-GCM, nonce prepended, with the
// record's identity as additional data, so that a blob copied onto
// another record (by someone with write access to the database) fails to
// open instead of releasing one workload's key as another's.

const atRestVersion = 1

func passphraseAAD(id string) []byte { return []byte("cwrun-kbs passphrase " + id) }
func resourceAAD(path string) []byte { return []byte("cwrun-kbs resource " + path) }

func (s *Server) sealAtRest(aad, plaintext []byte) ([]byte, error) {
	ns := s.atRest.NonceSize()
	out := make([]byte, 1+ns, 1+ns+len(plaintext)+s.atRest.Overhead())
	out[0] = atRestVersion
	if _, err := rand.Read(out[1:]); err != nil {
		return nil, err
	}
	return s.atRest.Seal(out, out[1:1+ns], plaintext, aad), nil
}

// errSealed is the answer when a stored secret does not open: the
// broker's fault (wrong at-rest key, or a tampered store), never the
// client's.
var errSealed = errors.New("a stored secret does not open with the at-rest key (wrong key in the config, or the record was altered)")

func (s *Server) openAtRest(aad, blob []byte) ([]byte, error) {
	ns := s.atRest.NonceSize()
	if len(blob) < 1+ns+s.atRest.Overhead() || blob[0] != atRestVersion {
		return nil, storeErr("open sealed record", errSealed)
	}
	pt, err := s.atRest.Open(nil, blob[1:1+ns], blob[1+ns:], aad)
	if err != nil {
		return nil, storeErr("open sealed record", errSealed)
	}
	return pt, nil
}
