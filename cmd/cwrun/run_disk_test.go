package main

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// runStderr runs `cwrun ARGS` and returns its error and what it wrote
// to stderr. Only for command lines that fail before anything boots.
func runStderr(t *testing.T, args ...string) (error, string) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	saved := os.Stderr
	os.Stderr = w
	defer func() { os.Stderr = saved }()
	out := make(chan string)
	go func() { b, _ := io.ReadAll(r); out <- string(b) }()
	root := newRootCmd()
	root.SetArgs(args)
	root.SetErr(w)
	root.SetOut(io.Discard)
	err = root.Execute()
	w.Close()
	return err, <-out
}

func TestRunDiskCommandLine(t *testing.T) {
	// A compressed "disk": should a command line get past the checks,
	// the launcher refuses it before anything starts.
	disk := filepath.Join(t.TempDir(), "disk.raw.zst")
	os.WriteFile(disk, []byte("\x28\xb5\x2f\xfd"), 0o644)
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"run", "--disk"}, "--disk needs REF"},
		{[]string{"run", "--disk", disk, "--passphrase-file", "/k", "-e", "A=B"}, "--env, --passphrase-file: only for sealed images"},
		{[]string{"run", "--disk", disk, "sh", "-c", "x"}, "unexpected arguments"},
		{[]string{"run", "--disk", disk, "--referrer-of", "quay.io/a/b:1"}, "both REF"},
		{[]string{"run", "--referrer-of", "quay.io/a/b:1", disk}, "both REF"},
		{[]string{"run", "--disk", disk, "--persist", "--rm", "--name", "a"}, "contradict"},
		{[]string{"run", "--disk", disk, "-p", "http"}, `-p "http"`},
		{[]string{"run", "--disk", disk, "--accel", "fast"}, "--accel"},
		{[]string{"run", "--accel", "tcg", "--disk", disk, "--name", "x", "-p", "8080:80"}, "zstd-compressed"}, // got through
	} {
		err, stderr := runStderr(t, c.args...)
		var ee exitError
		if !errors.As(err, &ee) || int(ee) != 125 || !strings.Contains(stderr, c.want) {
			t.Errorf("cwrun %s: %v, stderr %q; want exit 125 and %q", strings.Join(c.args, " "), err, stderr, c.want)
		}
	}
	// Without --disk, run still wants a sealed image.
	if err, _ := runStderr(t, "run"); err == nil || !strings.Contains(err.Error(), "arg") {
		t.Errorf("cwrun run: %v, want a missing-argument error", err)
	}
}

func TestLocalDisk(t *testing.T) {
	dir := t.TempDir()
	f := filepath.Join(dir, "disk.raw")
	os.WriteFile(f, nil, 0o644)
	wd, _ := os.Getwd()
	defer os.Chdir(wd)
	os.Chdir(dir)
	for ref, want := range map[string]bool{
		f: true, "./missing.qcow2": true, "../x.raw": true, "/abs/missing": true,
		"disk.raw":                         true, // an existing file in the working folder
		"quay.io/podman/machine-os:5.3":    false,
		"docker://quay.io/containers/disk": false,
		"":                                 false,
	} {
		if got := localDisk(ref); got != want {
			t.Errorf("localDisk(%q) = %v, want %v", ref, got, want)
		}
	}
}
