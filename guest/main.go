package guest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"

	"github.com/cwrun/cwrun/guest/proto"
	"golang.org/x/sys/unix"
)

// Main is cwrun-init's whole life. It never returns: it powers the VM
// off when the workload has exited or when a step failed.
func Main() {
	if os.Getpid() != 1 {
		fmt.Fprintln(os.Stderr, "cwrun-init: this is the PID 1 of a cwrun VM; it does not run on a host")
		os.Exit(2)
	}
	i := &initProc{keys: ConfigPassphrase{}}
	i.run(context.Background())
}

// initProc is the state of one boot.
type initProc struct {
	log  *console
	conn *proto.Conn // nil until the control port is open
	cfg  *proto.Config
	keys KeySource
}

// stepError is a failure of one named stage.
type stepError struct {
	stage string
	err   error
}

func (e *stepError) Error() string { return e.stage + ": " + e.err.Error() }
func (e *stepError) Unwrap() error { return e.err }

func step(stage string, err error) error {
	if err == nil {
		return nil
	}
	return &stepError{stage, err}
}

func (i *initProc) run(ctx context.Context) {
	i.log = &console{w: os.Stderr}
	err := i.boot(ctx)
	if err != nil {
		i.fail(err)
	}
	powerOff(i.log)
}

// fail reports err on the console and, once open, the control port.
func (i *initProc) fail(err error) {
	stage := "boot"
	var se *stepError
	if errors.As(err, &se) {
		stage = se.stage
		err = se.err
	}
	i.log.Printf("%s failed: %v; powering off", stage, err)
	if i.conn != nil {
		i.conn.Send(proto.Message{Type: proto.TypeError, Stage: stage, Message: err.Error()}) //nolint:errcheck // we power off either way
	}
}

// stage records that a step ended.
func (i *initProc) stage(name string) {
	ms := bootMS()
	if i.cfg == nil || i.cfg.Timings {
		i.log.Printf("%s done at %d ms", name, ms)
	}
	if i.conn != nil {
		i.conn.Send(proto.Message{Type: proto.TypeStage, Stage: name, MS: ms}) //nolint:errcheck // a dead host shows up on the next receive
	}
}

func (i *initProc) boot(ctx context.Context) error {
	if err := mountAll(earlyMounts); err != nil {
		return step(proto.StageModules, err)
	}
	i.log = openConsole()

	t := bootMS()
	mods, err := loadModules(modulesList)
	if err != nil {
		return step(proto.StageModules, err)
	}
	modulesMS := bootMS()
	i.log.Printf("loaded %d modules in %d ms", len(mods), modulesMS-t)

	ports, err := findPorts([]string{proto.PortControl, proto.PortStdout, proto.PortStderr}, 5*time.Second)
	if err != nil {
		return step(proto.StagePorts, err)
	}
	ctl, err := os.OpenFile(ports[proto.PortControl], os.O_RDWR, 0)
	if err != nil {
		return step(proto.StagePorts, fmt.Errorf("opening the control port: %w", err))
	}
	i.conn = proto.NewConn(ctl)
	// The write blocks until the host has connected to the port's socket.
	if err := i.conn.Send(proto.Message{Type: proto.TypeReady}); err != nil {
		return step(proto.StagePorts, err)
	}
	i.conn.Send(proto.Message{Type: proto.TypeStage, Stage: proto.StageModules, MS: modulesMS}) //nolint:errcheck
	i.stage(proto.StagePorts)

	if err := i.readConfig(30 * time.Second); err != nil {
		return step(proto.StageConfig, err)
	}
	// No passphrase but a broker relay: the key comes from attestation.
	if _, dev := i.keys.(ConfigPassphrase); dev && i.cfg.KBS && i.cfg.Passphrase == "" {
		p, err := findPorts([]string{proto.PortKBS}, 5*time.Second)
		if err != nil {
			return step(proto.StageConfig, err)
		}
		i.keys = BrokerKey{Port: p[proto.PortKBS], Stage: i.stage}
	}
	i.stage(proto.StageConfig)

	keys := i.keys
	if _, dev := keys.(ConfigPassphrase); !dev {
		keys = stagedKeys{KeySource: keys, done: func() { i.stage(proto.StageKey) }}
	}
	u, err := unlock(ctx, "/dev/vda", i.cfg, keys)
	i.cfg.Passphrase = "" // a Go string cannot be wiped; at least drop it
	if err != nil {
		return step(proto.StageUnlock, err)
	}
	i.log.Printf("unlocked LUKS%d %s (%d-byte sectors)", u.Info.Version, u.Info.CipherSpec(), u.Info.SectorSize)
	i.stage(proto.StageUnlock)

	if err := mountRoot(u.Device); err != nil {
		return step(proto.StageMount, err)
	}
	if err := switchRoot(); err != nil {
		return step(proto.StageMount, err)
	}
	img, err := readImageConfig("/.krun_config.json")
	if err != nil {
		return step(proto.StageMount, err)
	}
	w, err := resolveWorkload(img, i.cfg, img.allowsOverrides())
	if err != nil {
		return step(proto.StageMount, err)
	}
	var shares []shareMount
	for _, s := range i.cfg.Shares {
		shares = append(shares, shareMount{Tag: s.Tag, Path: s.Path, FSType: s.FSType, ReadOnly: s.ReadOnly})
	}
	if err := mountShares(shares); err != nil {
		return step(proto.StageMount, err)
	}
	i.stage(proto.StageMount)

	if err := setupNetwork(i.cfg.Network, i.log); err != nil {
		return step(proto.StageNetwork, err)
	}
	i.stage(proto.StageNetwork)

	return i.runWorkload(w, ports)
}

// readConfig waits for the host's "config" message.
func (i *initProc) readConfig(timeout time.Duration) error {
	type result struct {
		m   proto.Message
		err error
	}
	ch := make(chan result, 1)
	go func() {
		for {
			m, err := i.conn.Recv()
			if err != nil || m.Type == proto.TypeConfig {
				ch <- result{m, err}
				return
			}
		}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			return fmt.Errorf("reading the host's config: %w", r.err)
		}
		if r.m.Config == nil {
			r.m.Config = &proto.Config{}
		}
		i.cfg = r.m.Config
		return nil
	case <-time.After(timeout):
		return fmt.Errorf("no config from the host within %s", timeout)
	}
}

func (i *initProc) runWorkload(w workload, ports map[string]string) error {
	cred, err := i.credential(w.User)
	if err != nil {
		return step(proto.StageStart, err)
	}
	var (
		stdio   []*os.File
		term    *pty
		outDone chan struct{}
	)
	if i.cfg.TTY {
		w.Env = withTerm(w.Env)
		if term, outDone, err = i.startPTY(ports, cred); err != nil {
			return step(proto.StageStart, err)
		}
		defer term.close()
		stdio = []*os.File{term.slave, term.slave, term.slave}
	} else if stdio, err = openStdio(i.cfg.Stdin, ports); err != nil {
		return step(proto.StageStart, err)
	}
	p, err := startWorkload(w, cred, stdio, term != nil)
	if term != nil {
		term.closeSlave() // the child has its own; EIO on the master when it is gone
	} else {
		for _, f := range stdio {
			f.Close() // the child has its own copies
		}
	}
	if err != nil {
		return step(proto.StageStart, err)
	}
	i.stage(proto.StageStart)
	if err := i.conn.Send(proto.Message{Type: proto.TypeStarted, PID: p.Pid}); err != nil {
		i.log.Printf("%v", err)
	}
	var resize func(proto.WinSize) error
	if term != nil {
		resize = term.resize
	}
	go forwardControl(i.conn, p.Pid, resize, i.log)

	ws, err := reapUntil(p.Pid)
	if err != nil {
		return step(proto.StageRun, err)
	}
	// Like a container: when its main process ends, so does the rest.
	unix.Kill(-1, unix.SIGKILL) //nolint:errcheck // nothing left is fine
	if term != nil && !waitOutput(outDone, 5*time.Second) {
		i.log.Printf("the pty's output did not drain within 5 s; some of it may be lost")
	}
	msg := exitMessage(ws)
	if msg.Code != nil {
		i.log.Printf("workload exited with code %d", *msg.Code)
	} else {
		i.log.Printf("workload killed by signal %d", msg.Signal)
	}
	unix.Sync()
	return i.conn.Send(msg)
}

// startPTY makes the workload's pty and starts relaying it: its output
// to the stdout port, and the stdin port (with -i) into it. outDone is
// closed when the output has all been relayed.
func (i *initProc) startPTY(ports map[string]string, cred *syscall.Credential) (term *pty, outDone chan struct{}, err error) {
	term, err = openPTY("/dev/pts", i.cfg.TTYSize)
	if err != nil {
		return nil, nil, err
	}
	if err := term.chown(cred); err != nil {
		term.close()
		return nil, nil, err
	}
	out, err := os.OpenFile(ports[proto.PortStdout], os.O_WRONLY, 0)
	if err != nil {
		term.close()
		return nil, nil, fmt.Errorf("opening the stdout port: %w", err)
	}
	var in *os.File
	if i.cfg.Stdin {
		if in, err = openPort(proto.PortStdin, 2*time.Second, os.O_RDONLY); err != nil {
			out.Close()
			term.close()
			return nil, nil, err
		}
	}
	outDone = make(chan struct{})
	go func() {
		defer out.Close()
		term.relayOut(out, outDone)
	}()
	if in != nil {
		go func() {
			defer in.Close()
			term.relayIn(in)
		}()
	}
	return term, outDone, nil
}

// openPort opens the virtio-serial port of that name (waiting up to
// timeout for it to appear) with the given os.OpenFile flags. A port
// is one byte stream to the host, and only one open file at a time:
// a second open fails with EBUSY until the first is closed.
func openPort(name string, timeout time.Duration, flag int) (*os.File, error) {
	ports, err := findPorts([]string{name}, timeout)
	if err != nil {
		return nil, err
	}
	f, err := os.OpenFile(ports[name], flag, 0)
	if err != nil {
		return nil, fmt.Errorf("opening the %s port %s: %w", name, ports[name], err)
	}
	return f, nil
}

func (i *initProc) credential(user string) (*syscall.Credential, error) {
	if user == "" {
		return nil, nil
	}
	return credential(user, "/etc/passwd", "/etc/group")
}

// openStdio opens the workload's stdin (the stdin port or /dev/null),
// stdout and stderr ports.
func openStdio(stdin bool, ports map[string]string) ([]*os.File, error) {
	in := "/dev/null"
	if stdin {
		p, err := findPorts([]string{proto.PortStdin}, 2*time.Second)
		if err != nil {
			return nil, err
		}
		in = p[proto.PortStdin]
	}
	var files []*os.File
	for _, o := range []struct {
		path string
		flag int
	}{{in, os.O_RDONLY}, {ports[proto.PortStdout], os.O_WRONLY}, {ports[proto.PortStderr], os.O_WRONLY}} {
		f, err := os.OpenFile(o.path, o.flag, 0)
		if err != nil {
			for _, f := range files {
				f.Close()
			}
			return nil, fmt.Errorf("opening the workload's stdio %s: %w", o.path, err)
		}
		files = append(files, f)
	}
	return files, nil
}

// powerOff ends the VM. If the power-off call fails, exiting PID 1
// panics the kernel, and the launcher's panic=-1 -no-reboot ends QEMU.
func powerOff(log *console) {
	unix.Sync()
	err := unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	log.Printf("power off: %v", err)
	os.Exit(1)
}
