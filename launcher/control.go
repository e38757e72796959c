package launcher

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime/debug"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cwrun/cwrun/guest/proto"
	"github.com/cwrun/cwrun/launcher/vm"
)

// consoleLines is how much of the serial console an error shows.
const consoleLines = 10

// runner is one VM's life, from the VMM's start to its exit.
type runner struct {
	o     Options
	spec  vm.Spec
	cfg   *proto.Config
	t     *timeline
	term  *hostTerm // with -t; nil otherwise
	relay *relay    // with a key broker; nil otherwise
}

// outcome is how a run ended.
type outcome struct {
	code int
	err  error
	set  bool
}

func (r *runner) run(ctx context.Context) (int, error) {
	r.t.start()
	m, err := r.o.VMM.Start(ctx, r.spec)
	if err != nil {
		return 0, err
	}
	vmDone := make(chan error, 1)
	go func() { vmDone <- m.Wait() }()
	vmExited := false
	defer func() {
		if !vmExited {
			m.Kill() //nolint:errcheck // it may be gone already
			<-vmDone
		}
	}()
	r.t.mark("VMM running (QEMU up, guest starts)")

	conns := make(map[string]net.Conn)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	sockets := map[string]string{}
	for _, p := range r.spec.Ports {
		c, err := net.Dial("unix", p.Socket)
		if err != nil {
			return 0, fmt.Errorf("connecting to the VM's %s port: %w", p.Name, err)
		}
		conns[p.Name] = c
		sockets[p.Name] = p.Socket
	}
	if r.relay != nil {
		stopRelay := r.relay.serve(conns[proto.PortKBS], func() (net.Conn, error) {
			return net.Dial("unix", sockets[proto.PortKBS])
		})
		defer stopRelay()
	}
	if r.term != nil {
		// Every way out of here, a panic included, gives the terminal
		// back as it was.
		defer func() {
			if err := r.term.restore(); err != nil {
				fmt.Fprintf(r.o.Warn, "cwrun: %v\n", err)
			}
		}()
	}

	var relays sync.WaitGroup
	var firstOut sync.Once
	relay := func(dst io.Writer, src net.Conn, first bool) {
		defer relays.Done()
		buf := make([]byte, 32<<10)
		for {
			n, err := src.Read(buf)
			if n > 0 {
				if first {
					firstOut.Do(func() { r.t.mark("first output on the host") })
				}
				dst.Write(buf[:n]) //nolint:errcheck // a closed terminal must not stop the VM
			}
			if err != nil {
				return
			}
		}
	}
	relays.Add(2)
	go relay(r.o.Stdout, conns[proto.PortStdout], true)
	go relay(r.o.Stderr, conns[proto.PortStderr], false)
	if c, ok := conns[proto.PortStdin]; ok {
		go func() {
			io.Copy(c, r.o.Stdin) //nolint:errcheck // the workload may stop reading
			if uc, ok := c.(*net.UnixConn); ok {
				uc.CloseWrite() //nolint:errcheck // EOF for the workload
			}
		}()
	}

	ctl := proto.NewConn(conns[proto.PortControl])
	msgs := make(chan proto.Message, 16)
	go func() {
		defer close(msgs)
		for {
			msg, err := ctl.Recv()
			if err != nil {
				return
			}
			msgs <- msg
		}
	}()

	var (
		out             outcome
		ready, started  bool
		signaled        bool
		readyTimer      = time.NewTimer(r.o.ReadyTimeout)
		stopTimer       <-chan time.Time
		shutdownStarted bool
	)
	defer readyTimer.Stop()
	stop := func() {
		if shutdownStarted {
			return
		}
		shutdownStarted = true
		go func() {
			sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			m.Shutdown(sctx) //nolint:errcheck // Shutdown kills when QMP fails
		}()
	}
	handle := func(msg proto.Message) {
		switch msg.Type {
		case proto.TypeReady:
			if ready {
				return
			}
			ready = true
			readyTimer.Stop()
			r.t.mark("host got ready")
			if r.term != nil {
				r.cfg.TTYSize = r.term.size() // it may have changed while QEMU started
			}
			if err := ctl.Send(proto.Message{Type: proto.TypeConfig, Config: r.cfg}); err != nil && !out.set {
				out = outcome{err: fmt.Errorf("sending the config to the guest: %w", err), set: true}
			}
			r.cfg.Passphrase = ""
		case proto.TypeStage:
			r.t.guest(msg.Stage, msg.MS)
		case proto.TypeStarted:
			if !started && r.o.Started != nil {
				r.o.Started()
			}
			started = true
			r.t.mark("host got started")
			// The setup's garbage (image metadata, the store's state,
			// the initrd's inputs) would otherwise stay resident, in
			// part, for the workload's whole life.
			debug.FreeOSMemory()
			// Raw only now: until the workload runs, Ctrl-C must stop
			// the boot here rather than become a byte nobody reads.
			if r.term != nil && r.o.Stdin != nil {
				if err := r.term.makeRaw(); err != nil {
					fmt.Fprintf(r.o.Warn, "cwrun: warning: %v\n", err)
				}
			}
		case proto.TypeExit:
			r.t.mark("host got the exit status")
			if out.set {
				return
			}
			switch {
			case msg.Code != nil:
				out = outcome{code: *msg.Code, set: true}
			case msg.Signal > 0:
				out = outcome{code: 128 + msg.Signal, set: true}
			default:
				out = outcome{err: errors.New("the guest reported an exit without a status"), set: true}
			}
		case proto.TypeError:
			if !out.set {
				out = outcome{err: &GuestError{Stage: msg.Stage, Message: msg.Message}, set: true}
			}
		}
	}

	var vmErr error
loop:
	for {
		select {
		case msg, ok := <-msgs:
			if !ok {
				msgs = nil // the port closed: QEMU is going away
				continue
			}
			handle(msg)
			if out.set && (msg.Type == proto.TypeExit || msg.Type == proto.TypeError) {
				break loop
			}
		case vmErr = <-vmDone:
			vmExited = true
			break loop
		case <-readyTimer.C:
			if !ready && !out.set {
				hint := "a hung guest kernel or init?"
				if r.spec.Accel == vm.AccelKVM {
					hint = "stock kernels hang under some KVMs (PVM): try --accel tcg"
				}
				out = outcome{err: fmt.Errorf("the guest did not report ready within %s (%s; --boot-timeout sets the limit)%s",
					r.o.ReadyTimeout, hint, r.consoleTail()), set: true}
				stop()
				break loop
			}
		case <-r.o.Resized:
			if r.term != nil && ready {
				if sz := r.term.size(); sz != nil {
					ctl.Send(proto.Resize(*sz)) //nolint:errcheck // a lost resize is harmless
				}
			}
		case sig := <-r.o.Signals:
			n := 15
			if s, ok := sig.(syscall.Signal); ok {
				n = int(s)
			}
			switch {
			case signaled:
				fmt.Fprintf(r.o.Warn, "cwrun: second signal: killing the VM\n")
				out = outcome{code: 128 + int(syscall.SIGKILL), set: true}
				m.Kill() //nolint:errcheck // gone is fine
				break loop
			case started:
				signaled = true
				ctl.Send(proto.Message{Type: proto.TypeSignal, Signal: int(syscall.SIGTERM)}) //nolint:errcheck // the timer stops it anyway
				stopTimer = time.After(r.o.StopTimeout)
			default:
				// Nothing runs yet that could clean up: stop at once.
				out = outcome{code: 128 + n, set: true}
				stop()
				break loop
			}
		case <-stopTimer:
			fmt.Fprintf(r.o.Warn, "cwrun: the workload did not stop within %s of SIGTERM: killing the VM\n", r.o.StopTimeout)
			out = outcome{code: 128 + int(syscall.SIGKILL), set: true}
			stop()
			break loop
		case <-ctx.Done():
			m.Kill() //nolint:errcheck // gone is fine
			<-vmDone
			vmExited = true
			return 0, context.Cause(ctx)
		}
	}

	// The guest powers off after its exit or error report; give it time
	// to, then stop it.
	if !vmExited {
		select {
		case vmErr = <-vmDone:
		case <-time.After(10 * time.Second):
			stop()
			vmErr = <-vmDone
		}
		vmExited = true
	}
	r.t.mark("VM off")
	// Messages still queued (an exit report racing QEMU's exit).
	if !out.set && msgs != nil {
		timeout := time.After(2 * time.Second)
	drain:
		for {
			select {
			case msg, ok := <-msgs:
				if !ok {
					break drain
				}
				handle(msg)
			case <-timeout:
				break drain
			}
		}
	}
	// QEMU is gone, so the stdio sockets are at EOF: let the relays
	// finish writing.
	relaysDone := make(chan struct{})
	go func() { relays.Wait(); close(relaysDone) }()
	select {
	case <-relaysDone:
	case <-time.After(5 * time.Second):
	}
	if r.o.Log.Enabled(context.Background(), slog.LevelDebug) {
		if b, err := os.ReadFile(r.spec.Console); err == nil {
			r.o.Log.Debug("the guest's serial console", "console", string(b))
		}
	}
	if !out.set {
		why := "the VM stopped before the workload reported an exit (guest kernel panic or VMM crash?)"
		if vmErr != nil {
			why = fmt.Sprintf("the VMM failed: %v", vmErr)
		}
		return 0, fmt.Errorf("%s%s", why, r.consoleTail())
	}
	return out.code, out.err
}

// consoleTail is the last lines of the serial console, for errors.
func (r *runner) consoleTail() string {
	b, err := os.ReadFile(r.spec.Console)
	if err != nil || len(strings.TrimSpace(string(b))) == 0 {
		return "; the console is empty"
	}
	lines := strings.Split(strings.TrimRight(strings.ReplaceAll(string(b), "\r", ""), "\n"), "\n")
	// A panic's first line says why; the register dump after it does not.
	var panicLine string
	for _, l := range lines {
		if strings.Contains(l, "Kernel panic - not syncing") {
			panicLine = "; the guest kernel panicked: " + strings.TrimSpace(l)
			break
		}
	}
	if len(lines) > consoleLines {
		lines = lines[len(lines)-consoleLines:]
	}
	return panicLine + "; last console lines:\n  " + strings.Join(lines, "\n  ")
}

// timeline records the host's view of a boot and the guest's stages.
type timeline struct {
	mu     sync.Mutex
	t0     time.Time // Run's start
	vmm    time.Time // the VMM's start
	events []event
}

type event struct {
	name    string
	host    time.Duration // since the VMM's start (before it: negative)
	guestMS int64         // the guest's boot clock; -1 when not a guest stage
}

func newTimeline() *timeline { return &timeline{t0: time.Now()} }

func (t *timeline) start() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.vmm = time.Now()
	t.events = append(t.events, event{"prepare (image, kernel, initrd)", t.vmm.Sub(t.t0), -1})
}

func (t *timeline) mark(name string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.vmm.IsZero() {
		return // before the VMM: folded into "prepare"
	}
	t.events = append(t.events, event{name, time.Since(t.vmm), -1})
}

// stageNames say what each guest stage covers, for --timings.
var stageNames = map[string]string{
	proto.StageModules: "guest kernel booted, modules loaded",
	proto.StagePorts:   "guest control port open",
	proto.StageConfig:  "guest got its config",
	proto.StageKey:     "guest got its key (attestation)",
	proto.StageUnlock:  "guest unlock (LUKS, dm-crypt)",
	proto.StageMount:   "guest root mounted",
	proto.StageNetwork: "guest network up",
	proto.StageStart:   "guest workload started",
}

func (t *timeline) guest(stage string, ms int64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	name, ok := stageNames[stage]
	if !ok {
		name = "guest " + stage
	}
	t.events = append(t.events, event{name, time.Since(t.vmm), ms})
}

func (t *timeline) print(w io.Writer) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.events) == 0 {
		return
	}
	fmt.Fprintf(w, "cwrun timings (left: ms since the VMM's start, on the host; guest: the guest's boot clock, from its kernel's start):\n")
	var prevGuest int64
	for i, e := range t.events {
		if i == 0 {
			fmt.Fprintf(w, "  %-38s %6d ms (before the VMM)\n", e.name, e.host.Milliseconds())
			continue
		}
		if e.guestMS >= 0 {
			fmt.Fprintf(w, "  %-38s %6d ms   guest %6d ms (+%d)\n", e.name, e.host.Milliseconds(), e.guestMS, e.guestMS-prevGuest)
			prevGuest = e.guestMS
			continue
		}
		fmt.Fprintf(w, "  %-38s %6d ms\n", e.name, e.host.Milliseconds())
	}
}
