package main

import (
	"testing"

	"github.com/cwrun/cwrun/launcher/vm"
	"github.com/spf13/cobra"
)

func TestParsePublish(t *testing.T) {
	for in, want := range map[string]vm.Forward{
		"8080:80":           {HostPort: 8080, GuestPort: 80, Proto: "tcp"},
		"127.0.0.1:8080:80": {HostAddr: "127.0.0.1", HostPort: 8080, GuestPort: 80, Proto: "tcp"},
		"53:53/udp":         {HostPort: 53, GuestPort: 53, Proto: "udp"},
	} {
		if got, err := parsePublish(in); err != nil || got != want {
			t.Errorf("%q: %+v, %v", in, got, err)
		}
	}
	for _, bad := range []string{"80", "a:80", "0:80", "8080:70000", "host:1:2", "1:2/sctp", "1:2:3:4"} {
		if _, err := parsePublish(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestParseVolume(t *testing.T) {
	v, err := parseVolume("/data:/mnt:ro")
	if err != nil || v.HostPath != "/data" || v.GuestPath != "/mnt" || !v.ReadOnly {
		t.Errorf("%+v, %v", v, err)
	}
	v, err = parseVolume("/data:/mnt")
	if err != nil || v.ReadOnly {
		t.Errorf("%+v, %v", v, err)
	}
	for _, bad := range []string{"/data", ":/mnt", "/data:", "/d:/m:rx", "/a:/b:ro:x"} {
		if _, err := parseVolume(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

// CWRUN_KBS_CACERT names the broker's CA for run as for build and the
// OCI runtime: set once, it serves every command.
func TestRunKBSCACertFromEnv(t *testing.T) {
	t.Setenv("CWRUN_KBS_CACERT", "/etc/cwrun/kbs/ca.crt")
	for name, cmd := range map[string]*cobra.Command{"run": newRunCmd(&globalOpts{}), "build": newBuildCmd(&globalOpts{})} {
		if got := cmd.Flags().Lookup("kbs-cacert").Value.String(); got != "/etc/cwrun/kbs/ca.crt" {
			t.Errorf("%s --kbs-cacert defaults to %q with CWRUN_KBS_CACERT set", name, got)
		}
	}
}
