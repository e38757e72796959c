package tests

// End-to-end tests of cwrun as podman's OCI runtime: Debian's podman
// (4.3) and conmon drive `cwrun create/start/kill/delete`; the sealed
// images get their disk key from a real broker through the launcher's
// relay (sample evidence), so no key is handed to podman.

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cwrun/cwrun/attest/kbs/config"
	"github.com/cwrun/cwrun/internal/syncbuf"
	"github.com/cwrun/cwrun/internal/testimage"
	"github.com/cwrun/cwrun/launcher/oci"
	"golang.org/x/sys/unix"
)

// podmanEnv runs podman with a private store and a containers.conf
// that registers cwrun as the runtime "cwrun".
type podmanEnv struct {
	s    store
	conf string
}

func newPodmanEnv(t *testing.T, s store, caCert string) podmanEnv {
	t.Helper()
	conf := filepath.Join(t.TempDir(), "containers.conf")
	// conmon_env_vars reach conmon and so `cwrun create` and its
	// supervisor: the shared kernel cache, the broker's CA, a PATH
	// with QEMU. runtime_supports_json makes podman pass --log so it
	// can show cwrun's errors.
	body := fmt.Sprintf(`[engine]
conmon_env_vars = ["XDG_CACHE_HOME=%s", "CWRUN_KBS_CACERT=%s", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
runtime_supports_json = ["cwrun"]
runtime_supports_nocgroups = ["cwrun"]

[engine.runtimes]
cwrun = [%q]
`, filepath.Join(os.TempDir(), "cwrun-e2e-cache"), caCert, cwrunBin)
	if err := os.WriteFile(conf, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return podmanEnv{s: s, conf: conf}
}

func (p podmanEnv) run(t *testing.T, args ...string) result {
	t.Helper()
	return p.runEnv(t, nil, nil, args...)
}

// runEnv is run with extra environment variables and an input for podman.
func (p podmanEnv) runEnv(t *testing.T, env []string, stdin io.Reader, args ...string) result {
	t.Helper()
	ctx := exec.Command("podman", p.s.flags(args...)...)
	ctx.Env = append(append(os.Environ(), "CONTAINERS_CONF="+p.conf), env...)
	ctx.Stdin = stdin
	var r result
	var out, errb syncbuf.Buffer
	ctx.Stdout, ctx.Stderr = &out, &errb
	done := make(chan error, 1)
	if err := ctx.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { done <- ctx.Wait() }()
	select {
	case err := <-done:
		if ee, ok := err.(*exec.ExitError); ok {
			r.code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
	case <-time.After(3 * time.Minute):
		ctx.Process.Kill()
		t.Fatalf("podman %s: timed out\n%s", strings.Join(args, " "), errb.String())
	}
	r.stdout, r.stderr = out.String(), errb.String()
	return r
}

func (p podmanEnv) must(t *testing.T, args ...string) string {
	t.Helper()
	r := p.run(t, args...)
	if r.code != 0 {
		t.Fatalf("podman %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return strings.TrimSpace(r.stdout)
}

// noOCILeftovers checks that container id left no state, run folder
// or QEMU behind.
func noOCILeftovers(t *testing.T, id string) {
	t.Helper()
	root := oci.DefaultRoot()
	if _, err := os.Stat(filepath.Join(root, id)); err == nil {
		t.Errorf("the runtime state of %s outlived podman rm", id)
	}
	if _, err := os.Stat(filepath.Join(root, oci.VMDir, id[:12])); err == nil {
		t.Errorf("the VM run folder of %s outlived podman rm", id)
	}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		b, _ := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if strings.Contains(string(b), "qemu") && strings.Contains(string(b), id[:12]) {
			t.Errorf("QEMU (pid %s) of %s outlived podman rm", e.Name(), id)
		}
	}
}

// waitLogs polls podman logs until it shows what.
func (p podmanEnv) waitLogs(t *testing.T, name, what string) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		r := p.run(t, "logs", name)
		if strings.Contains(r.stdout+r.stderr, what) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("podman logs %s: no %q within 2 minutes:\n%s%s", name, what, r.stdout, r.stderr)
		}
		time.Sleep(300 * time.Millisecond)
	}
}

func TestPodmanRuntime(t *testing.T) {
	needVM(t)
	needRoot(t) // podman's rootful store, overlay mounts
	need(t, "podman", "conmon")
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	testimage.WriteLayout(t, src, "v1", testimage.Config{
		Cmd: []string{"/bin/sh", "-c", sealedCmd}, Env: []string{"PATH=/bin", "FOO=bar"}, WorkingDir: "/work",
	}, busyboxLayer(t))
	kdir := kbsInit(t)
	b := startBroker(t, kdir, "--tees", "sample")
	s := newStore(t)
	ca := filepath.Join(kdir, config.TLSCertFile)
	const sealedImg, openImg, plainImg = "localhost/cwrun-podman/sealed:1", "localhost/cwrun-podman/open:1", "localhost/cwrun-podman/plain:1"
	kbsFlags := []string{"--tee", "sample", "--cpus", "1", "--memory", "512", "--kbs", b.url,
		"--kbs-admin-key", filepath.Join(kdir, config.AdminKeyFile), "--kbs-cacert", ca}
	for _, c := range [][]string{
		append(append([]string{"build"}, kbsFlags...), "oci:"+src+":v1", sealedImg),
		append(append([]string{"build", "--allow-overrides"}, kbsFlags...), "oci:"+src+":v1", openImg),
	} {
		if r := s.cwrun(t, c...); r.code != 0 {
			t.Fatalf("cwrun %s: exit %d\n%s\nbroker log:\n%s", strings.Join(c, " "), r.code, r.stderr, b.log())
		}
	}
	p := newPodmanEnv(t, s, ca)
	rt := []string{"--runtime", "cwrun", "--annotation", "io.cwrun.accel=tcg"}
	t.Cleanup(func() { p.run(t, "rm", "-a", "-f") })

	t.Run("version", func(t *testing.T) {
		if out := mustRun(t, cwrunBin, "--version"); !strings.Contains(out, "e2e") {
			t.Errorf("cwrun --version: %q", out)
		}
	})

	t.Run("run-logs-wait-rm", func(t *testing.T) {
		start := time.Now()
		r := p.run(t, append(append([]string{"run", "--name", "exit3"}, rt...), sealedImg)...)
		t.Logf("podman run: exit %d after %s", r.code, time.Since(start).Round(time.Millisecond))
		if r.code != 3 || !strings.Contains(r.stdout, "hello from the guest\nFOO=bar\nPWD=/work\n") {
			t.Fatalf("podman run: exit %d (want 3)\nstdout: %s\nstderr: %s\nbroker log:\n%s", r.code, r.stdout, r.stderr, b.log())
		}
		logs := p.run(t, "logs", "exit3")
		if !strings.Contains(logs.stdout, "hello from the guest") || !strings.Contains(logs.stderr, "to-stderr") {
			t.Errorf("podman logs: stdout %q, stderr %q", logs.stdout, logs.stderr)
		}
		if got := p.must(t, "wait", "exit3"); got != "3" {
			t.Errorf("podman wait: %q, want 3", got)
		}
		if got := p.must(t, "inspect", "--format", "{{.State.ExitCode}} {{.State.Status}}", "exit3"); got != "3 exited" {
			t.Errorf("podman inspect: %q, want \"3 exited\"", got)
		}
		id := p.must(t, "inspect", "--format", "{{.Id}}", "exit3")
		p.must(t, "rm", "exit3")
		noOCILeftovers(t, id)
	})

	t.Run("overrides-refused", func(t *testing.T) {
		r := p.run(t, append(append([]string{"run", "--rm"}, rt...), sealedImg, "/bin/sh", "-c", "echo hijacked")...)
		if r.code == 0 || strings.Contains(r.stdout, "hijacked") || !strings.Contains(r.stderr, "does not allow host overrides") {
			t.Fatalf("a COMMAND for a sealed image without --allow-overrides: exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
		}
	})

	t.Run("detached-stop", func(t *testing.T) {
		id := p.must(t, append(append([]string{"run", "-d", "--name", "stopme", "-e", "FOO=from-podman"}, rt...), openImg,
			"/bin/sh", "-c", `trap 'echo got TERM; exit 42' TERM; echo "waiting FOO=$FOO"; while true; do sleep 0.1; done`)...)
		p.waitLogs(t, "stopme", "waiting FOO=from-podman")
		if st := p.must(t, "inspect", "--format", "{{.State.Status}}", "stopme"); st != "running" {
			t.Errorf("status %q while the workload runs, want running", st)
		}
		start := time.Now()
		p.must(t, "stop", "-t", "30", "stopme")
		took := time.Since(start)
		t.Logf("podman stop took %s", took.Round(time.Millisecond))
		if took > 20*time.Second {
			t.Errorf("podman stop took %s: the workload's trap should end it at once", took)
		}
		if got := p.must(t, "inspect", "--format", "{{.State.ExitCode}}", "stopme"); got != "42" {
			t.Errorf("exit code %s, want 42 (the trap)", got)
		}
		p.waitLogs(t, "stopme", "got TERM")
		p.must(t, "rm", "stopme")
		noOCILeftovers(t, id)
	})

	t.Run("stop-timeout-kills-vm", func(t *testing.T) {
		id := p.must(t, append(append([]string{"run", "-d", "--name", "stubborn"}, rt...), openImg,
			"/bin/sh", "-c", `trap '' TERM; echo waiting; while true; do sleep 0.1; done`)...)
		p.waitLogs(t, "stubborn", "waiting")
		start := time.Now()
		p.must(t, "stop", "-t", "2", "stubborn")
		took := time.Since(start)
		t.Logf("podman stop -t 2 took %s", took.Round(time.Millisecond))
		if took > 15*time.Second {
			t.Errorf("podman stop -t 2 took %s", took)
		}
		if got := p.must(t, "inspect", "--format", "{{.State.ExitCode}}", "stubborn"); got != "137" {
			t.Errorf("exit code %s, want 137 (SIGKILL)", got)
		}
		p.must(t, "rm", "stubborn")
		noOCILeftovers(t, id)
	})

	t.Run("rm-force-running", func(t *testing.T) {
		id := p.must(t, append(append([]string{"run", "-d"}, rt...), openImg, "/bin/sh", "-c", `echo waiting; sleep 1000`)...)
		p.waitLogs(t, id, "waiting")
		p.must(t, "rm", "-f", "-t", "0", id)
		noOCILeftovers(t, id)
	})

	t.Run("logs-follow", func(t *testing.T) {
		id := p.must(t, append(append([]string{"run", "-d", "--name", "follow"}, rt...), openImg,
			"/bin/sh", "-c", `for i in 1 2 3; do echo line$i; sleep 1; done; echo last >&2; exit 5`)...)
		// Follows from the boot on, and ends when the container exits.
		start := time.Now()
		r := p.run(t, "logs", "-f", "follow")
		t.Logf("podman logs -f returned after %s", time.Since(start).Round(time.Millisecond))
		if r.code != 0 || !strings.Contains(r.stdout, "line1\nline2\nline3\n") || !strings.Contains(r.stderr, "last") {
			t.Fatalf("podman logs -f: exit %d\nstdout: %q\nstderr: %q", r.code, r.stdout, r.stderr)
		}
		if got := p.must(t, "inspect", "--format", "{{.State.ExitCode}} {{.State.Status}}", "follow"); got != "5 exited" {
			t.Errorf("after podman logs -f returned: %q, want \"5 exited\"", got)
		}
		p.must(t, "rm", "follow")
		noOCILeftovers(t, id)
	})

	// podman forwards the host port into the container's network
	// namespace, where QEMU must listen: on the port that podman's DNAT
	// rules name (found by cwrun), or on the one io.cwrun.publish names.
	for _, tc := range []struct {
		name  string
		extra []string
	}{
		{"publish", nil},
		{"publish-annotated", []string{"--annotation", oci.AnnotationPublish + "=80"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			port := freePort(t)
			args := append([]string{"run", "-d", "--name", "web", "-p", fmt.Sprintf("127.0.0.1:%d:80", port)}, tc.extra...)
			r := p.run(t, append(append(args, rt...), openImg,
				"/bin/sh", "-c", `httpd -f -p 80 -h /www & echo listening; wait`)...)
			if r.code != 0 && (strings.Contains(r.stderr, "iptables") || strings.Contains(r.stderr, "CNI")) {
				t.Skipf("podman cannot publish ports here (its network backend failed): %s", r.stderr)
			}
			if r.code != 0 {
				t.Fatalf("podman run -p: exit %d\n%s", r.code, r.stderr)
			}
			id := strings.TrimSpace(r.stdout)
			p.waitLogs(t, "web", "listening")
			body, err := httpGet(fmt.Sprintf("http://127.0.0.1:%d/index.html", port), time.Minute)
			if body != "hello from the sealed guest\n" {
				logs := p.run(t, "logs", "web")
				t.Errorf("GET through podman's -p: %q, %v\nlogs: %s%s", body, err, logs.stdout, logs.stderr)
			}
			p.must(t, "rm", "-f", "-t", "0", "web")
			noOCILeftovers(t, id)
		})
	}

	t.Run("tty", func(t *testing.T) {
		// -t without -i works without a terminal on podman's side: the
		// output comes through conmon's pty (CRLF line ends).
		r := p.run(t, append(append([]string{"run", "--rm", "-t"}, rt...), openImg, "/bin/sh", "-c", `tty; stty size; echo tty-done`)...)
		if r.code != 0 || !strings.Contains(r.stdout, "/dev/pts/") || !strings.Contains(r.stdout, "tty-done") {
			t.Fatalf("podman run -t: exit %d\nstdout: %q\nstderr: %q", r.code, r.stdout, r.stderr)
		}
	})

	t.Run("tty-resize", func(t *testing.T) {
		// podman run -it at a terminal: podman passes the terminal's
		// size and its changes to conmon, conmon sets them on the pty
		// whose master cwrun handed it, and cwrun carries them into the
		// guest's pty, where the workload gets SIGWINCH.
		master, slave := openTestPTY(t, 37, 111)
		cmd := exec.Command("podman", p.s.flags(append(append([]string{"run", "--rm", "-i", "-t"}, rt...), openImg, "/bin/sh", "-c",
			`stty size; trap 'stty size; echo winch' WINCH; trap 'echo INT; exit 9' INT; echo armed; while :; do sleep 0.1; done`)...)...)
		cmd.Env = append(os.Environ(), "CONTAINERS_CONF="+p.conf)
		cmd.Stdin, cmd.Stdout, cmd.Stderr = slave, slave, slave
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		defer cmd.Process.Kill() //nolint:errcheck // gone already when the test passes
		var out syncbuf.Buffer
		go io.Copy(&out, master) //nolint:errcheck // ends when the master closes
		wait := func(what string) { t.Helper(); waitOutput(t, "podman", &out, done, what) }
		wait("armed")
		if err := unix.IoctlSetWinsize(int(master.Fd()), unix.TIOCSWINSZ, &unix.Winsize{Row: 40, Col: 120}); err != nil {
			t.Fatal(err)
		}
		wait("40 120\nwinch\n")
		if got := strings.ReplaceAll(out.String(), "\r", ""); !strings.Contains(got, "37 111\n") {
			t.Errorf("the guest's pty did not start at the terminal's size (37 111):\n%s", got)
		}
		master.Write([]byte{3}) //nolint:errcheck // Ctrl-C: the guest's pty makes it SIGINT
		select {
		case err := <-done:
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() != 9 {
				t.Errorf("podman run -it after Ctrl-C: %v, want exit 9 from the INT trap:\n%s", err, out.String())
			}
		case <-time.After(time.Minute):
			t.Fatalf("Ctrl-C did not end the workload:\n%s", out.String())
		}
	})

	t.Run("stdin", func(t *testing.T) {
		r := p.runEnv(t, nil, strings.NewReader("piped in\n"), append(append([]string{"run", "--rm", "-i"}, rt...), openImg, "/bin/sh", "-c", `read line; echo "got: $line"`)...)
		if r.code != 0 || !strings.Contains(r.stdout, "got: piped in") {
			t.Fatalf("podman run -i: exit %d\nstdout: %q\nstderr: %q", r.code, r.stdout, r.stderr)
		}
	})

	t.Run("sdnotify", func(t *testing.T) {
		dir, err := os.MkdirTemp("", "cwsd")
		if err != nil {
			t.Fatal(err)
		}
		defer os.RemoveAll(dir)
		sock := filepath.Join(dir, "notify.sock")
		conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		got := make(chan string, 16)
		go func() {
			buf := make([]byte, 4096)
			for {
				n, err := conn.Read(buf)
				if err != nil {
					close(got)
					return
				}
				got <- string(buf[:n])
			}
		}()
		r := p.runEnv(t, []string{"NOTIFY_SOCKET=" + sock}, nil, append(append([]string{"run", "-d", "--name", "notify", "--sdnotify=container"}, rt...),
			openImg, "/bin/sh", "-c", `echo up; sleep 1000`)...)
		if r.code != 0 {
			t.Fatalf("podman run --sdnotify=container: exit %d\n%s", r.code, r.stderr)
		}
		id := strings.TrimSpace(r.stdout)
		var msgs []string
		deadline := time.After(2 * time.Minute)
	wait:
		for {
			select {
			case m, ok := <-got:
				if !ok {
					break wait
				}
				msgs = append(msgs, m)
				if strings.Contains(m, "READY=1") {
					break wait
				}
			case <-deadline:
				break wait
			}
		}
		if !strings.Contains(strings.Join(msgs, "\n"), "READY=1") {
			logs := p.run(t, "logs", "notify")
			t.Errorf("no READY=1 on NOTIFY_SOCKET; got %q\nlogs: %s%s", msgs, logs.stdout, logs.stderr)
		} else if st := p.must(t, "inspect", "--format", "{{.State.Status}}", "notify"); st != "running" {
			t.Errorf("status %q at READY=1, want running", st)
		}
		p.must(t, "rm", "-f", "-t", "0", "notify")
		noOCILeftovers(t, id)
	})

	t.Run("not-sealed", func(t *testing.T) {
		mustRun(t, "skopeo", "copy", "-q", "oci:"+src+":v1", fmt.Sprintf("containers-storage:[overlay@%s+%s]%s", s.root, s.runRoot, plainImg))
		r := p.run(t, append(append([]string{"run", "--rm"}, rt...), plainImg, "/bin/true")...)
		if r.code == 0 || !strings.Contains(r.stderr, "not a sealed image") || !strings.Contains(r.stderr, "cwrun build") {
			t.Fatalf("an ordinary image under cwrun: exit %d\nstderr: %s", r.code, r.stderr)
		}
	})
}

// httpGet retries a GET until it answers or the time is up.
func httpGet(url string, within time.Duration) (string, error) {
	c := http.Client{Timeout: 5 * time.Second}
	deadline := time.Now().Add(within)
	for {
		resp, err := c.Get(url)
		if err == nil {
			b, rerr := io.ReadAll(resp.Body)
			resp.Body.Close()
			return string(b), rerr
		}
		if time.Now().After(deadline) {
			return "", err
		}
		time.Sleep(300 * time.Millisecond)
	}
}

// TestOCIRuntimeBadInput drives the runtime verbs directly, as conmon
// would, with input podman never sends.
func TestOCIRuntimeBadInput(t *testing.T) {
	root := t.TempDir()
	cw := func(args ...string) result {
		return run(t, time.Minute, cwrunBin, append([]string{"--root", root}, args...)...)
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"frobnicate", "x"}, "unknown command"},
		{[]string{"create", "--bogus", "x"}, "unknown flag"},
		{[]string{"delete", "nosuch"}, "does not exist"},
		{[]string{"kill", "nosuch", "TERM"}, "does not exist"},
		{[]string{"start", "nosuch"}, "does not exist"},
		{[]string{"state", "nosuch"}, "does not exist"},
		{[]string{"kill", "nosuch", "NOTASIGNAL"}, "unknown"},
		{[]string{"exec", "nosuch", "ls"}, "not supported"},
		{[]string{"create", "--bundle", t.TempDir(), "x"}, "config.json"},
		{[]string{"create", "--preserve-fds", "2", "--bundle", t.TempDir(), "x"}, "--preserve-fds 2"},
	} {
		r := cw(c.args...)
		if r.code == 0 || !strings.Contains(r.stderr, c.want) {
			t.Errorf("cwrun %s: exit %d, stderr %q: want a failure saying %q", strings.Join(c.args, " "), r.code, r.stderr, c.want)
		}
	}
	if r := cw("delete", "--force", "nosuch"); r.code != 0 {
		t.Errorf("delete --force of an unknown container: exit %d, %s", r.code, r.stderr)
	}

	// A bundle whose root file system is not sealed: refused at create,
	// with the reason, in --log as JSON too (podman reads it there).
	bundle := t.TempDir()
	os.MkdirAll(filepath.Join(bundle, "rootfs", "bin"), 0o755)
	os.WriteFile(filepath.Join(bundle, "config.json"), []byte(`{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"args":["/bin/sh"],"cwd":"/"}}`), 0o644)
	logf := filepath.Join(t.TempDir(), "oci-log")
	r := cw("--log", logf, "--log-format", "json", "create", "--bundle", bundle, "--pid-file", filepath.Join(bundle, "pid"), "plain")
	if r.code == 0 || !strings.Contains(r.stderr, "not a sealed image") {
		t.Fatalf("create of an unsealed bundle: exit %d, stderr %q", r.code, r.stderr)
	}
	if b, _ := os.ReadFile(logf); !strings.Contains(string(b), `"level":"error"`) || !strings.Contains(string(b), "not a sealed image") {
		t.Errorf("--log: %q", b)
	}
	if _, err := os.Stat(filepath.Join(root, "plain")); err == nil {
		t.Errorf("a refused create left state")
	}
}
