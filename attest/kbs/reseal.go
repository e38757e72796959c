package kbs

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/http"

	"github.com/cwrun/cwrun/attest/kbs/store"
)

// Rotating the secrets key: the config's secrets_key file holds the new
// key first and the earlier ones after it (Options.Previous*Keys). Every
// replica then opens what either sealed, seals only under the new one,
// and Reseal moves the stored records onto it, after which the earlier
// keys can go. Records are swapped one by one against the blob they were
// read with (store.SwapPassphrase), so an admin's change made meanwhile
// is never overwritten with the older secret.

// ResealReport is what Reseal did: records moved onto the current
// at-rest key, records already under it, and those no key opens (named
// "workload ID" or "resource PATH"), which it left as they were.
type ResealReport struct {
	// KeyID names the key everything is now sealed under (AtRestKeyID).
	KeyID    string `json:"key_id"`
	Resealed int    `json:"resealed"`
	Current  int    `json:"current"`
	// Previous counts records an earlier key sealed that were left as
	// they were: CheckSealed's answer; Reseal moves them.
	Previous int      `json:"previous,omitempty"`
	Unopened []string `json:"unopened,omitempty"`
}

// Done says whether every stored secret is now under the current key:
// the earlier keys are no longer needed by the store.
func (r ResealReport) Done() bool { return len(r.Unopened) == 0 }

// AtRestKeyID names an at-rest key without revealing it: 8 bytes of
// SHA-256 over a label and the key, in hex. Reseal reports the broker's,
// so that the tool dropping the earlier keys can check that the broker
// it asked seals under the key it is about to keep.
func AtRestKeyID(key []byte) string {
	h := sha256.New()
	h.Write([]byte("cwrun-kbs at-rest key id v1\x00"))
	h.Write(key)
	return hex.EncodeToString(h.Sum(nil)[:8])
}

// resealTries bounds how often one record is read again after it
// changed under the swap; an admin rewriting it that often is a loop.
const resealTries = 5

// Reseal re-seals every passphrase and resource that an earlier at-rest
// key sealed under the current one. It is idempotent: a second run finds
// every record current.
func (s *Server) Reseal(ctx context.Context) (ResealReport, error) {
	return s.walkSealed(ctx, true)
}

// CheckSealed reports which key opens each stored passphrase and
// resource, changing nothing: whether the broker's keys open them all
// (a backup before it is restored, a store before a key is dropped).
func (s *Server) CheckSealed(ctx context.Context) (ResealReport, error) {
	return s.walkSealed(ctx, false)
}

// walkSealed opens every sealed record and, with move, re-seals under
// the current key those an earlier key sealed.
func (s *Server) walkSealed(ctx context.Context, move bool) (ResealReport, error) {
	rep := ResealReport{KeyID: s.atRestID}
	wls, err := s.store.Workloads(ctx)
	if err != nil {
		return rep, storeErr("list workloads", err)
	}
	for _, w := range wls {
		read := func() ([]byte, error) {
			w, err := s.store.Workload(ctx, w.ID)
			return w.SealedPassphrase, err
		}
		swap := func(prev, next []byte) error { return s.store.SwapPassphrase(ctx, w.ID, prev, next) }
		if !move {
			swap = nil
		}
		if err := s.reseal(&rep, "workload "+w.ID, passphraseAAD(w.ID), w.SealedPassphrase, read, swap); err != nil {
			return rep, err
		}
	}
	s.forgetWorkloads()
	paths, err := s.store.ResourcePaths(ctx)
	if err != nil {
		return rep, storeErr("list resources", err)
	}
	for _, p := range paths {
		read := func() ([]byte, error) { return s.store.Resource(ctx, p) }
		swap := func(prev, next []byte) error { return s.store.SwapResource(ctx, p, prev, next) }
		blob, err := read()
		if errors.Is(err, store.ErrNotFound) {
			continue
		}
		if err != nil {
			return rep, storeErr("read resource", err)
		}
		if !move {
			swap = nil
		}
		if err := s.reseal(&rep, "resource "+p, resourceAAD(p), blob, read, swap); err != nil {
			return rep, err
		}
	}
	return rep, nil
}

// reseal moves one record onto the current key, reading it again when
// it changed under the swap; a record deleted meanwhile is skipped.
// With no swap it only counts the record.
func (s *Server) reseal(rep *ResealReport, name string, aad, blob []byte, read func() ([]byte, error), swap func(prev, next []byte) error) error {
	for range resealTries {
		pt, current, err := s.openAtRestKey(aad, blob)
		switch {
		case err != nil:
			rep.Unopened = append(rep.Unopened, name)
			return nil
		case current:
			clear(pt)
			rep.Current++
			return nil
		case swap == nil:
			clear(pt)
			rep.Previous++
			return nil
		}
		next, err := s.sealAtRest(aad, pt)
		clear(pt)
		if err != nil {
			return fmt.Errorf("re-seal %s: %w", name, err)
		}
		err = swap(blob, next)
		if err == nil {
			rep.Resealed++
			return nil
		}
		if errors.Is(err, store.ErrNotFound) {
			return nil
		}
		if !errors.Is(err, store.ErrChanged) {
			return storeErr("re-seal", err)
		}
		if blob, err = read(); errors.Is(err, store.ErrNotFound) {
			return nil
		} else if err != nil {
			return storeErr("re-seal", err)
		}
	}
	return fmt.Errorf("re-seal %s: it changed %d times while being re-sealed; run reseal again when admin changes have settled", name, resealTries)
}

// handleReseal is POST /kbs/v0/admin/reseal.
func (s *Server) handleReseal(w http.ResponseWriter, r *http.Request, _ []string) error {
	rep, err := s.Reseal(r.Context())
	if err != nil {
		return err
	}
	lvl := slog.LevelInfo
	if !rep.Done() {
		lvl = slog.LevelError
	}
	s.log.LogAttrs(r.Context(), lvl, "records re-sealed under the current at-rest key",
		slog.Int("resealed", rep.Resealed), slog.Int("current", rep.Current),
		slog.Any("unopened", rep.Unopened), slog.String("remote", r.RemoteAddr))
	writeJSON(w, http.StatusOK, rep)
	return nil
}
