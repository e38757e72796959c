package store

import (
	"fmt"
	"strings"
	"time"
	"unicode/utf8"
)

// CheckText reports whether s can be stored as a key or text field
// named what (for example "workload id"): non-empty, valid UTF-8 and
// free of NUL bytes, which PostgreSQL's text type cannot hold. Both
// stores call it so that they accept and refuse the same values.
func CheckText(what, s string) error {
	switch {
	case s == "":
		return fmt.Errorf("%s is empty: give a non-empty value", what)
	case !utf8.ValidString(s):
		return fmt.Errorf("%s %q is not valid UTF-8", what, s)
	case strings.IndexByte(s, 0) >= 0:
		return fmt.Errorf("%s %q contains a NUL byte", what, s)
	}
	return nil
}

// checkOptionalText is CheckText for fields that may be empty.
func checkOptionalText(what, s string) error {
	if s == "" {
		return nil
	}
	return CheckText(what, s)
}

// CheckWorkload reports whether w can be stored: its ID, Tee, Policy and
// reference claims must pass CheckText (Policy may be empty, reference
// values may not contain NUL either, as they are compared as text).
func CheckWorkload(w Workload) error {
	if err := CheckText("workload id", w.ID); err != nil {
		return err
	}
	if err := CheckText("workload "+w.ID+" tee", w.Tee); err != nil {
		return err
	}
	if err := checkOptionalText("workload "+w.ID+" policy", w.Policy); err != nil {
		return err
	}
	for claim, values := range w.References {
		if err := CheckText("workload "+w.ID+" reference claim", claim); err != nil {
			return err
		}
		for _, v := range values {
			if err := checkOptionalText("workload "+w.ID+" reference "+claim+" value", v); err != nil {
				return err
			}
		}
	}
	if w.CPUs < 0 || w.MemoryMiB < 0 {
		return fmt.Errorf("workload %s: cpus %d and memory %d MiB must not be negative", w.ID, w.CPUs, w.MemoryMiB)
	}
	return nil
}

// CheckExpiry reports whether a nonce expiring at expires is worth
// recording at now.
func CheckExpiry(expires, now time.Time) error {
	if !expires.After(now) {
		return fmt.Errorf("use nonce: expiry %s is not after now (%s): refuse the expired nonce before recording it",
			expires.UTC().Format(time.RFC3339Nano), now.UTC().Format(time.RFC3339Nano))
	}
	return nil
}

// Created returns the creation time a store records for w: w.Created
// in UTC to the microsecond, or now when it is zero.
func Created(w Workload, now time.Time) time.Time {
	t := w.Created
	if t.IsZero() {
		t = now
	}
	return t.UTC().Truncate(time.Microsecond)
}
