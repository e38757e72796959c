// Package storeurl opens the broker's store named by one string, the
// broker's --store flag: a PostgreSQL URL or a SQLite file. It lives
// apart from package store because it imports both implementations,
// which import store. It must never guess: a scheme it does not know
// is an error, not a file name.
package storeurl

import (
	"context"
	"fmt"
	"regexp"
	"strings"

	"github.com/cwrun/cwrun/attest/kbs/store"
	"github.com/cwrun/cwrun/attest/kbs/store/postgres"
	"github.com/cwrun/cwrun/attest/kbs/store/sqlite"
)

// Forms lists the accepted forms, for help texts and errors.
const Forms = "postgres://… or postgresql://… (PostgreSQL), sqlite:///abs/path.db, sqlite:rel/path.db, or a bare file path (SQLite)"

// Kind says which store a target names.
type Kind string

// The kinds of store.
const (
	SQLite   Kind = "sqlite"
	Postgres Kind = "postgres"
)

// scheme matches a URL scheme (RFC 3986: a letter, then letters,
// digits, "+", "-" or "."), followed by its colon.
var scheme = regexp.MustCompile(`^([A-Za-z][A-Za-z0-9+.-]*):`)

// Parse says which store target names and returns what to pass to
// that store's Open: the URL itself for PostgreSQL, the file path for
// SQLite.
func Parse(target string) (Kind, string, error) {
	if target == "" {
		return "", "", fmt.Errorf("no store given: use %s", Forms)
	}
	m := scheme.FindStringSubmatch(target)
	if m == nil {
		return SQLite, target, nil // a bare path: /x, ./x, x.db
	}
	switch strings.ToLower(m[1]) {
	case "postgres", "postgresql":
		return Postgres, target, nil
	case "sqlite", "sqlite3":
		rest := target[len(m[0]):]
		if strings.HasPrefix(rest, "//") {
			// sqlite:///abs/path: an empty authority, then the path.
			rest = rest[2:]
			if !strings.HasPrefix(rest, "/") {
				return "", "", fmt.Errorf("store %q: a sqlite:// URL takes no host; write sqlite:///abs/path.db or sqlite:rel/path.db", target)
			}
		}
		if rest == "" || strings.ContainsAny(rest, "?#") {
			return "", "", fmt.Errorf("store %q: give a file path after sqlite: (no query or fragment); accepted: %s", target, Forms)
		}
		return SQLite, rest, nil
	default:
		return "", "", fmt.Errorf("store %q: unknown scheme %q; accepted: %s (write ./%s for a file whose name has a colon)", target, m[1], Forms, target)
	}
}

// Open opens the store target names for a broker: a SQLite file with
// sqlite.OpenExclusive (one broker per file, nonces in memory).
func Open(ctx context.Context, target string) (store.Store, error) {
	kind, arg, err := Parse(target)
	if err != nil {
		return nil, err
	}
	switch kind {
	case Postgres:
		return postgres.Open(ctx, arg)
	default:
		return sqlite.OpenExclusive(ctx, arg)
	}
}
