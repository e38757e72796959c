// Command cwrun-init is the PID 1 of a cwrun microVM. Build it static:
// CGO_ENABLED=0 go build ./cmd/cwrun-init. Everything is in package guest.
package main

import "github.com/cwrun/cwrun/guest"

func main() { guest.Main() }
