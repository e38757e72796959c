package guest

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/cwrun/cwrun/attest"
	"github.com/cwrun/cwrun/attest/sample"
	"github.com/cwrun/cwrun/attest/snp"
	"github.com/cwrun/cwrun/attest/tdx"
	"github.com/cwrun/cwrun/attest/tpm"
	"github.com/cwrun/cwrun/guest/proto"
	"github.com/cwrun/cwrun/sealed"
	"golang.org/x/sys/unix"
)

// BrokerKey is the attested KeySource: the guest proves what it runs
// to the key broker (Trustee's RCAR handshake) and receives the disk
// passphrase as a JWE sealed to a key it made for this boot. The bytes
// travel through the launcher's relay port; the host relays them but
// can neither read the passphrase nor forge the evidence that binds the
// handshake's nonce and key.
type BrokerKey struct {
	// Port is the relay's virtio-serial device (/dev/vportNpM).
	Port string
	// Attester makes the evidence; nil: chosen by the sealed TEE.
	Attester attest.Attester
	// Timeout bounds the whole handshake; 0: one minute.
	Timeout time.Duration
	// Stage, when set, is told as each step of the release ends (the
	// TEE's device opened, each attester step), for --timings.
	Stage func(name string)
	// open opens the relay stream; nil: open Port. Tests replace it.
	open func() (net.Conn, error)
}

// brokerBase is the URL the guest speaks to; the relay forwards it to
// the broker it was given, so the host part means nothing.
const brokerBase = "http://kbs.relay"

// Passphrase runs the handshake and returns the workload's passphrase.
func (b BrokerKey) Passphrase(ctx context.Context, _ *proto.Config, sc sealed.Config) ([]byte, error) {
	if sc.WorkloadID == "" {
		return nil, errors.New("the sealed config names no workload_id: the broker cannot know which key to release; seal the image again with --kbs")
	}
	if b.Stage != nil {
		// The handshake's first random bytes wait for the kernel's
		// random pool (getrandom blocks until it is seeded), which in a
		// fresh TCG guest takes about a second: shown as its own step
		// so that it is not taken for the TEE's cost.
		var one [1]byte
		if _, err := rand.Read(one[:]); err != nil {
			return nil, fmt.Errorf("the kernel's random pool: %w", err)
		}
		b.Stage("key: random pool seeded")
	}
	att := b.Attester
	if att == nil {
		var err error
		if att, err = attesterFor(sc.TEE); err != nil {
			return nil, err
		}
		if c, ok := att.(io.Closer); ok {
			defer c.Close()
		}
	}
	if b.Stage != nil {
		b.Stage("key: " + att.Tee() + " attester ready")
		att = stagedAttester{Attester: att, stage: b.Stage}
	}
	timeout := b.Timeout
	if timeout == 0 {
		timeout = time.Minute
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	open := b.open
	if open == nil {
		open = func() (net.Conn, error) { return openPortConn(b.Port) }
	}
	client := &attest.Client{BaseURL: brokerBase, HTTP: relayHTTPClient(open), Attester: att}
	pass, err := client.Resource(ctx, "cwrun/"+sc.WorkloadID+"/passphrase")
	// A broker that is busy (503: its queue of handshakes did not reach
	// this one in time) or not answering (the relay's 503: down,
	// restarting) is asked again, a fresh handshake each time, until the
	// timeout. So is one that says the handshake went stale under it
	// (start_again: it restarted, or its keys were rotated, between two
	// steps), a few times. Nothing else is retried: a refusal is final.
	stale := 0
	for {
		var wait time.Duration
		switch {
		case busy(err):
			wait = time.Second
			if b.Stage != nil {
				b.Stage("key: broker busy, asking again")
			}
		case startAgain(err) && stale < maxStaleHandshakes:
			stale++
			wait = 100 * time.Millisecond
			if b.Stage != nil {
				b.Stage("key: handshake went stale at the broker, starting again")
			}
		}
		if wait == 0 {
			break
		}
		select {
		case <-ctx.Done():
		case <-time.After(wait):
			pass, err = client.Resource(ctx, "cwrun/"+sc.WorkloadID+"/passphrase")
			continue
		}
		break
	}
	if err != nil {
		return nil, fmt.Errorf("attested key release for workload %q (%s evidence): %w", sc.WorkloadID, att.Tee(), err)
	}
	return pass, nil
}

// maxStaleHandshakes bounds the fresh handshakes begun after a
// start_again answer: one or two cover a restart or a key rotation;
// more would mean brokers that never agree (replicas with different
// keys), which retrying only hides.
const maxStaleHandshakes = 3

// startAgain says whether the broker answered that a fresh handshake
// may succeed.
func startAgain(err error) bool {
	var be *attest.BrokerError
	return errors.As(err, &be) && be.StartAgain
}

// busy says whether err is the broker's 503.
func busy(err error) bool {
	var be *attest.BrokerError
	return errors.As(err, &be) && be.Status == http.StatusServiceUnavailable
}

// attesterFor picks the attester of the TEE the disk was sealed for.
func attesterFor(t sealed.TEE) (attest.Attester, error) {
	switch t {
	case sealed.TEESample:
		return sample.NewAttester(), nil
	case sealed.TEESNP:
		return snp.NewAttester(snp.AttesterOptions{})
	case sealed.TEETDX:
		return tdx.NewAttester(tdx.AttesterOptions{})
	case sealed.TEETPM:
		// The firmware's event log, which the broker replays against
		// the quoted PCRs, is read from securityfs.
		if err := mountSecurityfs(); err != nil {
			return nil, err
		}
		return tpm.NewAttester(tpm.AttesterOptions{})
	}
	return nil, fmt.Errorf("no attester for TEE %q in this guest init (it attests with sample, snp, tdx and tpm evidence)", t)
}

// mountSecurityfs mounts securityfs on /sys/kernel/security unless it
// is there already.
func mountSecurityfs() error {
	err := doMount(mount{"securityfs", "/sys/kernel/security", "securityfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""})
	if errors.Is(err, unix.EBUSY) {
		return nil
	}
	return err
}

// stagedAttester reports the end of each attester step. It offers the
// client's optional steps whatever its attester does: absent, they add
// and read nothing.
type stagedAttester struct {
	attest.Attester
	stage func(string)
}

func (a stagedAttester) AuthParams(ctx context.Context) (map[string]json.RawMessage, error) {
	ap, ok := a.Attester.(attest.AuthParamser)
	if !ok {
		return nil, nil
	}
	p, err := ap.AuthParams(ctx)
	a.stage("key: auth parameters")
	return p, err
}

func (a stagedAttester) TakeChallenge(ctx context.Context, extra json.RawMessage) error {
	ct, ok := a.Attester.(attest.ChallengeTaker)
	if !ok {
		return nil
	}
	a.stage("key: challenge received")
	err := ct.TakeChallenge(ctx, extra)
	a.stage("key: challenge answered")
	return err
}

func (a stagedAttester) Evidence(ctx context.Context, rd []byte) (json.RawMessage, error) {
	ev, err := a.Attester.Evidence(ctx, rd)
	a.stage("key: evidence made")
	return ev, err
}

// relayHTTPClient speaks HTTP/1.1 over the relay stream: one
// connection at a time (a port opens once), kept alive between the
// handshake's three requests.
func relayHTTPClient(open func() (net.Conn, error)) *http.Client {
	var mu sync.Mutex // a port opens only once: serialize dials
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			mu.Lock()
			c, err := open()
			if err != nil {
				mu.Unlock()
				return nil, err
			}
			return &onceClosed{Conn: c, unlock: mu.Unlock}, nil
		},
		MaxConnsPerHost:     1,
		MaxIdleConnsPerHost: 1,
		DisableCompression:  true,
		ForceAttemptHTTP2:   false,
	}
	return &http.Client{Transport: tr}
}

// onceClosed releases the dial lock when its connection closes.
type onceClosed struct {
	net.Conn
	once   sync.Once
	unlock func()
}

func (c *onceClosed) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.unlock)
	return err
}

// openPortConn opens a virtio-serial port as a net.Conn.
func openPortConn(port string) (net.Conn, error) {
	f, err := os.OpenFile(port, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("opening the broker relay port %s: %w", port, err)
	}
	return portConn{f}, nil
}

// portConn is a virtio-serial port as a net.Conn; *os.File supplies
// Read, Write, Close and the deadlines.
type portConn struct{ *os.File }

func (c portConn) LocalAddr() net.Addr  { return portAddr(c.Name()) }
func (c portConn) RemoteAddr() net.Addr { return portAddr("kbs-relay") }

type portAddr string

func (a portAddr) Network() string { return "virtio-serial" }
func (a portAddr) String() string  { return string(a) }
