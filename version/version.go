// Package version holds cwrun's version, set at link time by the Makefile.
package version

// Version is replaced by -ldflags "-X github.com/cwrun/cwrun/version.Version=...".
var Version = "dev"
