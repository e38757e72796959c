package guest

import (
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/cwrun/cwrun/guest/proto"
	"github.com/cwrun/cwrun/internal/syncbuf"
)

// TestPTY runs a shell on a pty as the init does (setsid, the slave as
// controlling terminal) with the host's devpts standing in for the
// guest's: the shell sees a terminal of the size given, a resize
// reaches it as SIGWINCH, typed input and the end of input arrive, and
// all output is relayed before the master reports EIO.
func TestPTY(t *testing.T) {
	if _, err := os.Stat("/dev/pts/ptmx"); err != nil {
		t.Skip("no devpts at /dev/pts")
	}
	if _, err := os.Stat("/bin/sh"); err != nil {
		t.Skip("no /bin/sh")
	}
	term, err := openPTY("/dev/pts", &proto.WinSize{Rows: 33, Cols: 101})
	if err != nil {
		if os.IsPermission(err) {
			t.Skipf("cannot open a pty here: %v", err)
		}
		t.Fatal(err)
	}
	defer term.close()
	script := `tty; stty size; echo ready; read line; echo "read: $line"; ` +
		`trap 'stty size; exit 7' WINCH; while :; do sleep 0.05; done`
	w := workload{Args: []string{"sh", "-c", script}, Env: withTerm([]string{"PATH=/usr/bin:/bin"}), Dir: "/"}
	p, err := startWorkload(w, nil, []*os.File{term.slave, term.slave, term.slave}, true)
	if err != nil {
		t.Fatal(err)
	}
	term.closeSlave()
	var out syncbuf.Buffer
	done := make(chan struct{})
	go term.relayOut(&out, done)
	waitFor := func(what string) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); !strings.Contains(out.String(), what); time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) {
				p.Kill()
				t.Fatalf("no %q in the pty's output: %q", what, out.String())
			}
		}
	}
	waitFor("ready")
	// Typed input, then the end of input: relayIn adds the EOF character.
	go term.relayIn(strings.NewReader("typed words\r"))
	waitFor("read: typed words")
	if err := term.resize(proto.WinSize{Rows: 40, Cols: 120}); err != nil {
		t.Fatal(err)
	}
	st, err := p.Wait()
	if err != nil {
		t.Fatal(err)
	}
	if !waitOutput(done, 5*time.Second) {
		t.Fatal("the master did not report the end of output")
	}
	got := strings.ReplaceAll(out.String(), "\r", "")
	if st.ExitCode() != 7 {
		t.Errorf("exit %d, want 7 (the WINCH trap)\n%s", st.ExitCode(), got)
	}
	if !regexp.MustCompile(`(?m)^/dev/pts/[0-9]+$`).MatchString(got) {
		t.Errorf("tty did not print a /dev/pts path:\n%s", got)
	}
	for _, want := range []string{"33 101\n", "40 120\n", "read: typed words\n"} {
		if !strings.Contains(got, want) {
			t.Errorf("output lacks %q:\n%s", want, got)
		}
	}
	if err := term.resize(proto.WinSize{Rows: 0, Cols: 80}); err == nil {
		t.Error("a zero-row size was accepted")
	}
}

func TestWithTerm(t *testing.T) {
	if got := withTerm([]string{"A=1"}); strings.Join(got, " ") != "A=1 TERM=xterm" {
		t.Errorf("got %q", got)
	}
	if got := withTerm([]string{"TERM=vt100", "B=2"}); strings.Join(got, " ") != "TERM=vt100 B=2" {
		t.Errorf("a sealed TERM was replaced: %q", got)
	}
}
