package oci

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cwrun/cwrun/launcher/vm"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// A supervisor that takes the start and fails at once (a refused
// override) must not make Start fail: the boot's error is the
// container's, reported in its output and exit code.
func TestStartOfAQuicklyFailingBoot(t *testing.T) {
	rt := testRuntime(t, nil)
	bundle := writeBundle(t, specs.Spec{Annotations: map[string]string{"test.fail": "1"}})
	ctx := context.Background()
	for i := range 10 {
		id := "quick" + string(rune('a'+i))
		if err := rt.Create(ctx, id, CreateOptions{Bundle: bundle}); err != nil {
			t.Fatal(err)
		}
		st, _ := rt.State(id)
		proc, _ := os.FindProcess(st.Pid)
		done := make(chan int, 1)
		go func() { ps, _ := proc.Wait(); done <- ps.ExitCode() }()
		if err := rt.Start(ctx, id); err != nil {
			t.Fatalf("start of %s: %v", id, err)
		}
		if code := <-done; code != 125 {
			t.Errorf("%s: supervisor exit %d, want 125", id, code)
		}
	}
}

// A supervisor that dies before the start makes Start fail, saying why.
func TestStartOfADeadSupervisor(t *testing.T) {
	rt := testRuntime(t, nil)
	bundle := writeBundle(t, specs.Spec{Annotations: map[string]string{"test.wait": "60s"}})
	ctx := context.Background()
	if err := rt.Create(ctx, "dead", CreateOptions{Bundle: bundle}); err != nil {
		t.Fatal(err)
	}
	st, _ := rt.State("dead")
	proc, _ := os.FindProcess(st.Pid)
	// Let it install its signal handlers, then stop it before the start.
	time.Sleep(time.Second)
	proc.Signal(unix.SIGHUP)
	ps, _ := proc.Wait()
	handled := ps.ExitCode() == 128+int(unix.SIGHUP)
	if !handled && ps.Sys().(unix.WaitStatus).Signal() != unix.SIGHUP {
		t.Errorf("exit %v, want %d", ps, 128+int(unix.SIGHUP))
	}
	err := rt.Start(ctx, "dead")
	if !errors.Is(err, ErrNotRunning) || !strings.Contains(err.Error(), "exited before it took the start") {
		t.Errorf("start of a dead supervisor: %v", err)
	}
	// It says why, when it lived long enough to.
	if handled && !strings.Contains(err.Error(), "hangup before the start") {
		t.Errorf("start of a dead supervisor: %v (want its reason)", err)
	}
}

func TestParsePublish(t *testing.T) {
	got, err := ParsePublish(" 80, 8080:8000/tcp,53/UDP ,")
	want := []vm.Forward{{HostPort: 80, GuestPort: 80, Proto: "tcp"}, {HostPort: 8080, GuestPort: 8000, Proto: "tcp"}, {HostPort: 53, GuestPort: 53, Proto: "udp"}}
	if err != nil || len(got) != len(want) {
		t.Fatalf("%v %v", got, err)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("%d: %+v, want %+v", i, got[i], want[i])
		}
	}
	if f, err := ParsePublish(""); err != nil || f != nil {
		t.Errorf("empty: %v %v", f, err)
	}
	for _, bad := range []string{"x", "0", "70000", "80/sctp", "1:2:3", ":80", "80:"} {
		if _, err := ParsePublish(bad); err == nil || !strings.Contains(err.Error(), AnnotationPublish) {
			t.Errorf("%q: %v", bad, err)
		}
	}
}

func TestBundleNetNS(t *testing.T) {
	for _, c := range []struct {
		spec *specs.Spec
		want NetNS
	}{
		{nil, NetNS{}},
		{&specs.Spec{Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{{Type: specs.PIDNamespace}}}}, NetNS{}},
		{&specs.Spec{Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{{Type: specs.NetworkNamespace}}}}, NetNS{New: true}},
		{&specs.Spec{Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{{Type: specs.NetworkNamespace, Path: "/run/netns/x"}}}}, NetNS{Path: "/run/netns/x"}},
	} {
		if got := BundleNetNS(c.spec); got != c.want {
			t.Errorf("%+v: %+v, want %+v", c.spec, got, c.want)
		}
	}
}

func TestNotifySocket(t *testing.T) {
	s := &specs.Spec{
		Process: &specs.Process{Env: []string{"PATH=/bin", "NOTIFY_SOCKET=/run/notify/notify.sock"}},
		Mounts: []specs.Mount{
			{Destination: "/run", Type: "tmpfs", Source: "tmpfs"},
			{Destination: "/run/notify", Type: "bind", Source: "/bundle/notify", Options: []string{"rbind"}},
			{Destination: "/run/notify/other", Type: "bind", Source: "/elsewhere"},
		},
	}
	if got := NotifySocket(s); got != "/bundle/notify/notify.sock" {
		t.Errorf("got %q", got)
	}
	s.Process.Env[1] = "NOTIFY_SOCKET=@abstract"
	if got := NotifySocket(s); got != "" {
		t.Errorf("abstract socket: %q", got)
	}
	s.Process.Env = s.Process.Env[:1]
	if got := NotifySocket(s); got != "" {
		t.Errorf("no NOTIFY_SOCKET: %q", got)
	}
	if _, env := Overrides(&specs.Spec{Process: &specs.Process{Env: []string{"NOTIFY_SOCKET=/run/notify/notify.sock"}}}); env != nil {
		t.Errorf("NOTIFY_SOCKET taken for the user's -e: %q", env)
	}
}

// The supervisor answers podman --sdnotify=container for the guest:
// READY=1 on the bundle's socket once the workload started.
func TestSupervisorNotifiesReady(t *testing.T) {
	rt := testRuntime(t, nil)
	dir, err := os.MkdirTemp("", "cwn")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	// As deep as podman's storage puts conmon's socket: past what a
	// socket address holds.
	dir = filepath.Join(dir, strings.Repeat("d", 60), strings.Repeat("e", 60))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	df, err := os.OpenFile(dir, unix.O_PATH|unix.O_DIRECTORY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer df.Close()
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: "/proc/self/fd/" + strconv.Itoa(int(df.Fd())) + "/notify.sock", Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	bundle := writeBundle(t, specs.Spec{
		Process:     &specs.Process{Env: []string{"NOTIFY_SOCKET=/run/notify/notify.sock"}},
		Mounts:      []specs.Mount{{Destination: "/run/notify", Type: "bind", Source: dir}},
		Annotations: map[string]string{"test.wait": "60s"},
	})
	ctx := context.Background()
	if err := rt.Create(ctx, "n", CreateOptions{Bundle: bundle}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rt.Delete(ctx, "n", true, nil) })
	if err := rt.Start(ctx, "n"); err != nil {
		t.Fatal(err)
	}
	conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	buf := make([]byte, 64)
	n, err := conn.Read(buf)
	if err != nil || string(buf[:n]) != "READY=1" {
		t.Errorf("sd_notify: %q, %v", buf[:n], err)
	}
}

// podman run -t: create sends conmon a pty master over the console
// socket, and the supervisor runs with the slave as its terminal.
func TestCreateWithTerminal(t *testing.T) {
	rt := testRuntime(t, nil)
	dir, err := os.MkdirTemp("", "cwc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "console.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	got := make(chan *os.File, 1)
	go func() {
		c, err := l.AcceptUnix()
		if err != nil {
			got <- nil
			return
		}
		defer c.Close()
		buf, oob := make([]byte, 256), make([]byte, 256)
		_, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
		if err != nil {
			got <- nil
			return
		}
		msgs, _ := unix.ParseSocketControlMessage(oob[:oobn])
		if len(msgs) != 1 {
			got <- nil
			return
		}
		fds, _ := unix.ParseUnixRights(&msgs[0])
		if len(fds) != 1 {
			got <- nil
			return
		}
		got <- os.NewFile(uintptr(fds[0]), "master")
	}()
	bundle := writeBundle(t, specs.Spec{
		Process:     &specs.Process{Terminal: true, ConsoleSize: &specs.Box{Height: 30, Width: 100}},
		Annotations: map[string]string{"test.wait": "0s"},
	})
	ctx := context.Background()
	if err := rt.Create(ctx, "tty", CreateOptions{Bundle: bundle, ConsoleSocket: sock}); err != nil {
		t.Fatal(err)
	}
	var master *os.File
	select {
	case master = <-got:
	case <-time.After(10 * time.Second):
	}
	if master == nil {
		t.Fatal("no pty master arrived on the console socket")
	}
	defer master.Close()
	ws, err := unix.IoctlGetWinsize(int(master.Fd()), unix.TIOCGWINSZ)
	if err != nil || ws.Row != 30 || ws.Col != 100 {
		t.Errorf("pty size %+v, %v: want the bundle's 30x100", ws, err)
	}
	st, _ := rt.State("tty")
	proc, _ := os.FindProcess(st.Pid)
	go proc.Wait()
	if err := rt.Start(ctx, "tty"); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	buf := make([]byte, 1024)
	master.SetReadDeadline(time.Now().Add(20 * time.Second)) //nolint:errcheck // a pty may not do deadlines
	for !strings.Contains(out.String(), "\n") {
		n, err := master.Read(buf)
		out.Write(buf[:n])
		if err != nil {
			break
		}
	}
	if !strings.Contains(out.String(), "tty=true stdin=true") {
		t.Errorf("the supervisor's output on the pty: %q (want a terminal as its stdio)", out.String())
	}
	// No console socket for a terminal: refused before anything runs.
	if err := rt.Create(ctx, "tty2", CreateOptions{Bundle: bundle}); err == nil || !strings.Contains(err.Error(), "console-socket") {
		t.Errorf("create of a terminal bundle without --console-socket: %v", err)
	}
}

// QEMU runs in the container's network namespace through the script
// QEMUInNetNS makes; a stand-in for QEMU prints which one it is in.
func TestQEMUInNetNS(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (setns into a network namespace)")
	}
	for _, p := range []string{"nsenter", "unshare", "readlink", "sleep"} {
		if _, err := exec.LookPath(p); err != nil {
			t.Skipf("needs %s (util-linux, coreutils)", p)
		}
	}
	readlink, _ := exec.LookPath("readlink")
	self, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		t.Skipf("no network namespaces here: %v", err)
	}
	// A process in a namespace of its own stands for podman's.
	holder := exec.Command("unshare", "--net", "--", "sleep", "60")
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { holder.Process.Kill(); holder.Wait() }()
	nsPath := "/proc/" + strconv.Itoa(holder.Process.Pid) + "/ns/net"
	var want string
	for range 100 {
		if want, _ = os.Readlink(nsPath); want != "" && want != self {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if want == "" || want == self {
		t.Fatalf("the holder's namespace %q did not appear", want)
	}
	for _, c := range []struct {
		ns    NetNS
		check func(got string) bool
	}{
		{NetNS{Path: nsPath}, func(got string) bool { return got == want }},
		{NetNS{New: true}, func(got string) bool { return got != self && got != want }},
	} {
		prog, closer, err := QEMUInNetNS(readlink, c.ns)
		if err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command(prog, "/proc/self/ns/net").CombinedOutput()
		closer.Close()
		if got := strings.TrimSpace(string(out)); err != nil || !c.check(got) {
			t.Errorf("%+v: in %q (%v); the container's is %s, the host's %s", c.ns, got, err, want, self)
		}
	}
	if _, _, err := QEMUInNetNS(readlink, NetNS{}); err == nil {
		t.Error("no namespace: accepted")
	}
}
