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
var errSealed = errors.New("a stored secret does not open with the at-rest key (wrong key in the config, a previous key dropped from secrets_key too early, or the record was altered)")

func (s *Server) openAtRest(aad, blob []byte) ([]byte, error) {
	pt, _, err := s.openAtRestKey(aad, blob)
	return pt, err
}

// openAtRestKey opens blob with the at-rest key or, during a rotation,
// an earlier one (an AEAD opens only under the key that sealed, so
// trying each is safe), and says whether it was the current key.
func (s *Server) openAtRestKey(aad, blob []byte) (pt []byte, current bool, err error) {
	ns := s.atRest.NonceSize()
	if len(blob) < 1+ns+s.atRest.Overhead() || blob[0] != atRestVersion {
		return nil, false, storeErr("open sealed record", errSealed)
	}
	nonce, ct := blob[1:1+ns], blob[1+ns:]
	if pt, err := s.atRest.Open(nil, nonce, ct, aad); err == nil {
		return pt, true, nil
	}
	for _, old := range s.atRestOld {
		if pt, err := old.Open(nil, nonce, ct, aad); err == nil {
			return pt, false, nil
		}
	}
	return nil, false, storeErr("open sealed record", errSealed)
}

// currentSeal returns blob when the current at-rest key sealed it (or
// no key opens it: nothing to re-seal), else the same secret sealed
// under the current key.
func (s *Server) currentSeal(aad, blob []byte) ([]byte, error) {
	pt, current, err := s.openAtRestKey(aad, blob)
	if err != nil || current {
		clear(pt)
		return blob, nil
	}
	defer clear(pt)
	return s.sealAtRest(aad, pt)
}
