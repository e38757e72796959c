package kbs

import (
	"os"
	"testing"

	"github.com/cwrun/cwrun/attest/kbs/store/pgtest"
)

// TestMain shares one PostgreSQL server among the tests that use one.
func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }
