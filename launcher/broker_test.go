package launcher

import (
	"bytes"
	"context"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/cwrun/cwrun/internal/syncbuf"
	"golang.org/x/sys/unix"
)

// socketPair stands in for a virtio-serial port: the guest's end and
// the host's end of one byte stream.
func socketPair(t *testing.T) (guest, host net.Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conns := make([]net.Conn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), fmt.Sprintf("port-%d", i))
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		conns[i] = c
	}
	return conns[0], conns[1]
}

// testBroker is a key broker stand-in: a TLS server under a path
// prefix, with a session cookie as Trustee's (and cwrun's) set it.
type testBroker struct {
	srv   *httptest.Server
	mu    sync.Mutex
	paths []string
}

func newTestBroker(t *testing.T) *testBroker {
	b := &testBroker{}
	b.srv = httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b.mu.Lock()
		b.paths = append(b.paths, r.Method+" "+r.URL.Path)
		b.mu.Unlock()
		switch r.URL.Path {
		case "/broker/kbs/v0/auth":
			body, _ := io.ReadAll(r.Body)
			if !strings.Contains(string(body), `"version":"0.4.0"`) {
				http.Error(w, "bad auth body: "+string(body), http.StatusBadRequest)
				return
			}
			http.SetCookie(w, &http.Cookie{Name: "kbs-session-id", Value: "sealed-session", Path: "/broker/kbs",
				Secure: true, HttpOnly: true, Domain: "broker.example"})
			fmt.Fprint(w, `{"nonce":"bm9uY2U=","extra-params":""}`)
		case "/broker/kbs/v0/attest":
			c, err := r.Cookie("kbs-session-id")
			if err != nil || c.Value != "sealed-session" {
				http.Error(w, "no session cookie", http.StatusUnauthorized)
				return
			}
			fmt.Fprint(w, `{"token":"a.b.c"}`)
		case "/broker/kbs/v0/resource/cwrun/w1/passphrase":
			if c, err := r.Cookie("kbs-session-id"); err != nil || c.Value != "sealed-session" {
				http.Error(w, "no session cookie", http.StatusUnauthorized)
				return
			}
			fmt.Fprint(w, `{"protected":"jwe"}`)
		case "/broker/kbs/v0/resource/cwrun/w1/huge":
			w.Header().Set("Content-Length", fmt.Sprint(maxRelayResponse+1))
			w.Write(make([]byte, maxRelayResponse+1))
		default:
			http.Error(w, "the broker got "+r.URL.Path, http.StatusTeapot)
		}
	}))
	t.Cleanup(b.srv.Close)
	return b
}

func (b *testBroker) seen() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]string(nil), b.paths...)
}

// guestClient speaks HTTP over the guest's ends of the port, taken in
// order from conns, as the guest's KBS client does.
func guestClient(t *testing.T, conns <-chan net.Conn) *http.Client {
	jar, err := cookiejar.New(nil)
	if err != nil {
		t.Fatal(err)
	}
	return &http.Client{
		Jar: jar,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				select {
				case c := <-conns:
					return c, nil
				case <-ctx.Done():
					return nil, ctx.Err()
				}
			},
			MaxConnsPerHost: 1,
		},
	}
}

func TestRelay(t *testing.T) {
	b := newTestBroker(t)
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	rl, err := newRelay(Broker{URL: b.srv.URL + "/broker", Client: b.srv.Client()}, log, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	// QEMU's socket: each new connection is the next pair.
	var guests, hosts []net.Conn
	for range 3 {
		g, h := socketPair(t)
		guests, hosts = append(guests, g), append(hosts, h)
	}
	var dials atomic.Int32
	stop := rl.serve(hosts[0], func() (net.Conn, error) {
		n := int(dials.Add(1))
		if n < len(hosts) {
			return hosts[n], nil
		}
		return nil, fmt.Errorf("no more connections")
	})
	defer stop()
	guestConns := make(chan net.Conn, 3)
	guestConns <- guests[0]
	c := guestClient(t, guestConns)
	const base = "http://cwrun.kbs"

	do := func(method, path, body string, hdr ...string) (int, string) {
		t.Helper()
		req, err := http.NewRequest(method, base+path, strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i+1 < len(hdr); i += 2 {
			req.Header.Set(hdr[i], hdr[i+1])
		}
		if len(hdr) > 0 && hdr[0] == "Connection" {
			req.Close = true
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, path, err)
		}
		defer resp.Body.Close()
		rb, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(rb)
	}

	// The handshake, with the session cookie made usable over the
	// guest's plain HTTP, and a resource.
	if code, body := do("POST", "/kbs/v0/auth", `{"version":"0.4.0","tee":"sample"}`); code != 200 || !strings.Contains(body, "nonce") {
		t.Fatalf("auth: %d %s", code, body)
	}
	if code, body := do("POST", "/kbs/v0/attest", `{"tee-evidence":"SECRET-EVIDENCE"}`); code != 200 || body != `{"token":"a.b.c"}` {
		t.Fatalf("attest (is the cookie relayed both ways?): %d %s", code, body)
	}
	if code, body := do("GET", "/kbs/v0/resource/cwrun/w1/passphrase", ""); code != 200 || body != `{"protected":"jwe"}` {
		t.Fatalf("resource: %d %s", code, body)
	}
	// Refused without reaching the broker.
	before := len(b.seen())
	for _, c := range []struct {
		method, path string
		code         int
	}{
		{"GET", "/kbs/v0/admin/workloads", 404},
		{"POST", "/kbs/v0/resource/cwrun/w1/passphrase", 405},
		{"GET", "/kbs/v0/auth", 405},
		{"GET", "/kbs/v0/resource/../admin/workloads", 404},
		{"GET", "/kbs/v0/resource/", 404},
		{"GET", "/metrics", 404},
		{"POST", "/kbs/v0/auth/x", 404},
	} {
		if code, body := do(c.method, c.path, ""); code != c.code {
			t.Errorf("%s %s: %d %s, want %d", c.method, c.path, code, body, c.code)
		}
	}
	if got := b.seen(); len(got) != before {
		t.Errorf("refused requests reached the broker: %v", got[before:])
	}
	if code, _ := do("GET", "/kbs/v0/resource/cwrun/w1/huge", ""); code != http.StatusBadGateway {
		t.Errorf("an oversized answer: %d, want 502", code)
	}
	if n := dials.Load(); n != 0 {
		t.Errorf("%d redials while the guest kept its connection alive", n)
	}

	// The guest closes its connection: the relay dials QEMU's socket
	// again and serves the guest's next one.
	if code, _ := do("GET", "/kbs/v0/resource/cwrun/w1/passphrase", "", "Connection", "close"); code != 200 {
		t.Fatalf("a closing request: %d", code)
	}
	guestConns <- guests[1]
	if code, body := do("POST", "/kbs/v0/auth", `{"version":"0.4.0","tee":"sample"}`); code != 200 {
		t.Fatalf("after a reconnect: %d %s", code, body)
	}
	// An oversized request is refused unread, which ends the connection
	// (net/http will not drain a large unread body): the next request
	// goes on a new one.
	if code, _ := do("POST", "/kbs/v0/attest", strings.Repeat("x", maxRelayRequest+1)); code != http.StatusRequestEntityTooLarge {
		t.Errorf("an oversized request: %d, want 413", code)
	}
	guestConns <- guests[2]
	if code, _ := do("GET", "/kbs/v0/resource/cwrun/w1/passphrase", ""); code != 200 {
		t.Errorf("after an oversized request: %d", code)
	}
	if n := dials.Load(); n != 2 {
		t.Errorf("%d redials, want 2", n)
	}
	want := []string{"POST /broker/kbs/v0/auth", "POST /broker/kbs/v0/attest", "GET /broker/kbs/v0/resource/cwrun/w1/passphrase"}
	if got := b.seen(); len(got) < 3 || strings.Join(got[:3], ",") != strings.Join(want, ",") {
		t.Errorf("the broker saw %v, want %v first", got, want)
	}
	l := logs.String()
	if !strings.Contains(l, "path=/kbs/v0/attest") || !strings.Contains(l, "status=200") {
		t.Errorf("forwarded requests are not logged:\n%s", l)
	}
	if strings.Contains(l, "SECRET-EVIDENCE") {
		t.Errorf("a body was logged:\n%s", l)
	}
}

func TestRelayCookie(t *testing.T) {
	rl, err := newRelay(Broker{URL: "https://kbs.example:8443/broker/"}, slog.New(slog.DiscardHandler), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	resp := &http.Response{Header: http.Header{}, Body: io.NopCloser(strings.NewReader("")), ContentLength: 0}
	resp.Header.Add("Set-Cookie", "kbs-session-id=v; Path=/broker/kbs; Domain=kbs.example; Secure; HttpOnly; SameSite=Strict")
	resp.Header.Add("Set-Cookie", "other=1; Path=/elsewhere")
	if err := rl.modifyResponse(resp); err != nil {
		t.Fatal(err)
	}
	got := resp.Header.Values("Set-Cookie")
	if len(got) != 2 || got[0] != "kbs-session-id=v; Path=/kbs; HttpOnly; SameSite=Strict" || got[1] != "other=1; Path=/elsewhere" {
		t.Errorf("Set-Cookie after the relay: %q", got)
	}
}

// A broker that does not answer (down, restarting) is a 503, which
// the guest asks again after; the reason names the broker.
func TestRelayBrokerDown(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	down := "http://" + l.Addr().String()
	l.Close() // nothing listens there now
	var warned syncbuf.Buffer
	rl, err := newRelay(Broker{URL: down}, slog.New(slog.DiscardHandler), &warned)
	if err != nil {
		t.Fatal(err)
	}
	g, h := socketPair(t)
	stop := rl.serve(h, func() (net.Conn, error) { return nil, fmt.Errorf("no more connections") })
	defer stop()
	conns := make(chan net.Conn, 1)
	conns <- g
	client := guestClient(t, conns)
	// The guest asks again: the user is told why once, not each time.
	for range 3 {
		resp, err := client.Post("http://cwrun.kbs/kbs/v0/auth", "application/json", strings.NewReader(`{}`))
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(body), "could not reach the key broker at "+down) {
			t.Errorf("a broker that is down: %d %s, want 503 naming it", resp.StatusCode, body)
		}
	}
	got := warned.String()
	if n := strings.Count(got, "cwrun: warning:"); n != 1 || !strings.Contains(got, "cannot reach the key broker") || !strings.Contains(got, down) || !strings.Contains(got, "connection refused") {
		t.Errorf("%d warnings; want one naming the broker and the reason:\n%s", n, got)
	}
}

func TestNewRelayBadURL(t *testing.T) {
	for _, u := range []string{"", "kbs:8443", "ftp://kbs", "https://", "::"} {
		if _, err := newRelay(Broker{URL: u}, slog.New(slog.DiscardHandler), io.Discard); err == nil {
			t.Errorf("broker URL %q accepted", u)
		}
	}
}

func TestBrokerClient(t *testing.T) {
	b := newTestBroker(t)
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca.pem")
	os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: b.srv.Certificate().Raw}), 0o600)
	c, err := BrokerClient(ca)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := c.Post(b.srv.URL+"/broker/kbs/v0/auth", "application/json", strings.NewReader(`{"version":"0.4.0"}`))
	if err != nil {
		t.Fatalf("the CA file's broker is not trusted: %v", err)
	}
	resp.Body.Close()
	// The system roots do not know the test CA.
	sys, _ := BrokerClient("")
	if resp, err := sys.Get(b.srv.URL + "/"); err == nil {
		resp.Body.Close()
		t.Error("a broker with an unknown CA was trusted")
	}
	os.WriteFile(filepath.Join(dir, "bad.pem"), []byte("not pem"), 0o600)
	if _, err := BrokerClient(filepath.Join(dir, "bad.pem")); err == nil || !strings.Contains(err.Error(), "no PEM certificate") {
		t.Errorf("a file without certificates: %v", err)
	}
}
