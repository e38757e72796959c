package launcher

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/cwrun/cwrun/guest/proto"
	"github.com/cwrun/cwrun/images"
	"github.com/cwrun/cwrun/launcher/vm"
)

func TestMakeRunDir(t *testing.T) {
	base := filepath.Join(t.TempDir(), "cwrun")
	d, err := makeRunDir(base, "web")
	if err != nil || d.dir != filepath.Join(base, "web") {
		t.Fatalf("%+v, %v", d, err)
	}
	if st, err := os.Stat(d.dir); err != nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("run folder %v, %v: want mode 0700", st, err)
	}
	if _, err := makeRunDir(base, "web"); err == nil || !strings.Contains(err.Error(), "is running") {
		t.Fatalf("a second VM named web: %v", err)
	}
	for _, bad := range []string{"a/b", "..", "."} {
		if _, err := makeRunDir(base, bad); err == nil {
			t.Errorf("name %q accepted", bad)
		}
	}
	a, err1 := makeRunDir(base, "")
	b, err2 := makeRunDir(base, "")
	if err1 != nil || err2 != nil || a.dir == b.dir {
		t.Fatalf("random names %+v %+v: %v %v", a, b, err1, err2)
	}
	for _, r := range []*runFolder{d, a, b} {
		if err := r.remove(); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(r.dir); !os.IsNotExist(err) {
			t.Errorf("%s still exists after remove: %v", r.dir, err)
		}
	}
}

func TestFindInit(t *testing.T) {
	p := filepath.Join(t.TempDir(), "cwrun-init")
	os.WriteFile(p, []byte("x"), 0o755)
	if got, err := findInit(p); err != nil || got != p {
		t.Fatalf("%q, %v", got, err)
	}
	if _, err := findInit(p + ".missing"); err == nil {
		t.Fatal("a missing init was accepted")
	}
	// The test binary has no cwrun-init beside it.
	if _, err := os.Stat("/usr/lib/cwrun/cwrun-init"); err != nil {
		if _, err := findInit(""); err == nil || !strings.Contains(err.Error(), "make build") {
			t.Fatalf("no init anywhere: %v", err)
		}
	}
}

func TestOptionsDefaults(t *testing.T) {
	o, err := Options{}.withDefaults()
	if err != nil || o.Network != "user" || o.Accel != vm.AccelAuto || o.StopTimeout != 10*time.Second || o.ReadyTimeout != 60*time.Second {
		t.Fatalf("%+v, %v", o, err)
	}
	for _, bad := range []Options{
		{Network: "bridge"},
		{Network: "none", Publish: []vm.Forward{{HostPort: 1, GuestPort: 1}}},
		{Volumes: []Volume{{HostPath: t.TempDir(), GuestPath: "relative"}}},
		{Volumes: []Volume{{HostPath: "/nonexistent", GuestPath: "/mnt"}}},
	} {
		if _, err := bad.withDefaults(); err == nil {
			t.Errorf("%+v accepted", bad)
		}
	}
}

func TestConsoleTail(t *testing.T) {
	dir := t.TempDir()
	r := &runner{spec: vm.Spec{Console: filepath.Join(dir, "console")}}
	if got := r.consoleTail(); !strings.Contains(got, "empty") {
		t.Errorf("no console: %q", got)
	}
	var b strings.Builder
	b.WriteString("[ 1.0] early\r\n[ 1.3] Kernel panic - not syncing: Attempted to kill init!\r\n")
	for i := 0; i < 20; i++ {
		b.WriteString("[ 1.4] register dump line\r\n")
	}
	b.WriteString("[ 1.5] last\r\n")
	os.WriteFile(r.spec.Console, []byte(b.String()), 0o600)
	got := r.consoleTail()
	if !strings.Contains(got, "panicked: [ 1.3] Kernel panic - not syncing: Attempted to kill init!") ||
		strings.Count(got, "\n  ") != consoleLines || !strings.HasSuffix(got, "[ 1.5] last") || strings.Contains(got, "\r") {
		t.Errorf("tail:\n%s", got)
	}
}

func TestTimelinePrint(t *testing.T) {
	tl := newTimeline()
	tl.mark("ignored before the VMM")
	tl.start()
	tl.guest(proto.StageModules, 1500)
	tl.guest(proto.StageUnlock, 1700)
	tl.mark("first output on the host")
	var b bytes.Buffer
	tl.print(&b)
	out := b.String()
	for _, want := range []string{"prepare", "guest kernel booted, modules loaded", "guest   1500 ms (+1500)", "guest   1700 ms (+200)", "first output on the host"} {
		if !strings.Contains(out, want) {
			t.Errorf("timings lack %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "ignored") {
		t.Errorf("a mark before the VMM was printed:\n%s", out)
	}
}

func TestCleanup(t *testing.T) {
	base := filepath.Join(t.TempDir(), "cwrun")
	log := slog.New(slog.DiscardHandler)
	live, err := makeRunDir(base, "live")
	if err != nil {
		t.Fatal(err)
	}
	defer live.remove()
	dead, err := makeRunDir(base, "dead")
	if err != nil {
		t.Fatal(err)
	}
	dead.lock.Close() // as if its cwrun was SIGKILLed: the kernel drops the lock
	// Folders without a lock file: a run between its mkdir and its
	// lock (young), or one of a cwrun from before the lock (old).
	young, old, oldQEMU := filepath.Join(base, "young"), filepath.Join(base, "old"), filepath.Join(base, "oldq")
	for _, d := range []string{young, old, oldQEMU} {
		os.Mkdir(d, 0o700)
	}
	// An old folder whose QEMU still answers (an older cwrun's live run).
	l, err := net.Listen("unix", filepath.Join(oldQEMU, "qmp.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	long := time.Now().Add(-2 * staleAfter)
	os.Chtimes(old, long, long)
	os.Chtimes(oldQEMU, long, long)

	removed, err := Cleanup(context.Background(), images.NewSession(images.Options{}), base, log)
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(removed)
	if want := []string{dead.dir, old}; strings.Join(removed, " ") != strings.Join(want, " ") {
		t.Errorf("removed %v, want %v", removed, want)
	}
	for _, d := range []string{live.dir, young, oldQEMU} {
		if _, err := os.Stat(d); err != nil {
			t.Errorf("%s was removed: %v", d, err)
		}
	}
	if _, err := os.Stat(dead.dir); !os.IsNotExist(err) {
		t.Errorf("the dead run's folder stays: %v", err)
	}
	// A damaged mount note is reported, and the folder still goes.
	d2, _ := makeRunDir(base, "dead2")
	os.WriteFile(filepath.Join(d2.dir, mountFile), []byte("{"), 0o600)
	d2.lock.Close()
	removed, err = Cleanup(context.Background(), images.NewSession(images.Options{}), base, log)
	if err == nil || !strings.Contains(err.Error(), "damaged") || len(removed) != 1 {
		t.Errorf("damaged note: removed %v, error %v", removed, err)
	}
	// The live run's lock is still its own.
	if stale, _, err := staleFolder(live.dir); stale || err != nil {
		t.Errorf("the live run's folder counts as stale: %v", err)
	}
}

func TestNetworkMode(t *testing.T) {
	fwd := []vm.Forward{{HostPort: 8080, GuestPort: 80}}
	for _, c := range []struct {
		in      string
		publish []vm.Forward
		want    string
		err     string
	}{
		{"", nil, "user", ""},
		{"none", nil, "none", ""},
		{"user", fwd, "user", ""},
		{"none", fwd, "", "-p needs a network"},
		{"bridge", nil, "", "want user or none"},
	} {
		got, err := networkMode(c.in, c.publish)
		if got != c.want || (c.err == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), c.err)) {
			t.Errorf("networkMode(%q, %v) = %q, %v; want %q, %q", c.in, c.publish, got, err, c.want, c.err)
		}
	}
}
