package launcher

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"path"
	"strings"
	"sync"
	"time"
)

// Broker is the key broker the guest attests to. The launcher relays
// the guest's plain HTTP/1.1 requests from the cwrun.kbs port to it
// (DESIGN.md decision 3), so that workloads without a network can
// attest too. The protocol is protected end to end (the evidence binds
// the broker's nonce and the guest's key; the disk key comes back as a
// JWE to that key): the host learns nothing by relaying it.
type Broker struct {
	// URL is the broker's base URL (https://kbs.example:8443); the
	// guest's /kbs/v0/... paths are appended to its path. Empty: the
	// attestation_url of the sealed config (krun-sev.json).
	URL string
	// Client's Transport carries the requests (its TLS settings say
	// which broker certificates to trust) and its Timeout bounds each;
	// nil: Go's default transport (the system's roots), 60 s. Its Jar
	// is not used: cookies pass between the guest and the broker.
	Client *http.Client
}

// BrokerClient returns a client for Broker.Client that trusts only the
// CA certificates of the PEM file caFile (a broker with a private CA);
// caFile "" trusts the system's roots.
func BrokerClient(caFile string) (*http.Client, error) {
	if caFile == "" {
		return &http.Client{Timeout: relayTimeout}, nil
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("--kbs-cacert: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("--kbs-cacert %s: no PEM certificate in it", caFile)
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	return &http.Client{Transport: tr, Timeout: relayTimeout}, nil
}

// Bounds of the relay: a request (evidence with its certificate chain
// and event log) and a response (a token or a JWE-wrapped resource) are
// a few KiB to tens of KiB.
const (
	maxRelayRequest  = 1 << 20
	maxRelayResponse = 4 << 20
	relayTimeout     = 60 * time.Second
)

// relayPaths are what a guest asks a broker (docs/kbs-protocol.md and
// krun's key endpoint): the handshake, resources, krun's key. The
// admin API under the same prefix is not the guest's business.
var relayPaths = []struct {
	method, prefix string
	exact          bool
}{
	{http.MethodPost, "/kbs/v0/auth", true},
	{http.MethodPost, "/kbs/v0/attest", true},
	{http.MethodGet, "/kbs/v0/resource/", false},
	{http.MethodGet, "/kbs/v0/key/", false},
}

// relay is the host's HTTP server on the cwrun.kbs port.
type relay struct {
	target  *url.URL
	proxy   *httputil.ReverseProxy
	timeout time.Duration
	log     *slog.Logger
	// warn receives cwrun's warnings for the user (Options.Warn).
	warn io.Writer

	// The last "cannot reach" warning, so that a guest asking again
	// every second while the broker is down repeats it only when the
	// reason changes, or every warnEvery.
	mu       sync.Mutex
	warned   string
	warnedAt time.Time
}

// warnEvery is how often the same "cannot reach" warning repeats.
const warnEvery = 15 * time.Second

func newRelay(b Broker, log *slog.Logger, warn io.Writer) (*relay, error) {
	u, err := url.Parse(b.URL)
	if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		return nil, fmt.Errorf("key broker URL %q: want https://HOST[:PORT] (or http:// for a test broker)", b.URL)
	}
	u.RawQuery, u.Fragment = "", ""
	var tr http.RoundTripper = http.DefaultTransport
	timeout := relayTimeout
	if b.Client != nil {
		if b.Client.Transport != nil {
			tr = b.Client.Transport
		}
		if b.Client.Timeout > 0 {
			timeout = b.Client.Timeout
		}
	}
	rl := &relay{target: u, timeout: timeout, log: log, warn: warn}
	rl.proxy = &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(u) // the broker's scheme, host (and Host header) and path prefix
		},
		Transport:      tr,
		ModifyResponse: rl.modifyResponse,
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			log.Debug("key broker relay: forwarding failed", "method", r.Method, "path", r.URL.Path, "error", err)
			if errors.Is(err, errBadAnswer) {
				http.Error(w, fmt.Sprintf("cwrun's relay refused the key broker's answer: %v", err), http.StatusBadGateway)
				return
			}
			// Not answering is what a broker being restarted does: 503,
			// which the guest asks again after (until its timeout). The
			// host's log says why at once: a wrong URL or a firewall
			// would otherwise show only when the guest gives up.
			rl.warnDown(err)
			http.Error(w, fmt.Sprintf("cwrun's relay could not reach the key broker at %s: %v", u.Redacted(), err), http.StatusServiceUnavailable)
		},
	}
	return rl, nil
}

// warnDown tells the user that the broker cannot be reached, unless
// the same reason was told less than warnEvery ago.
func (rl *relay) warnDown(err error) {
	msg := err.Error()
	rl.mu.Lock()
	if msg == rl.warned && time.Since(rl.warnedAt) < warnEvery {
		rl.mu.Unlock()
		return
	}
	rl.warned, rl.warnedAt = msg, time.Now()
	rl.mu.Unlock()
	fmt.Fprintf(rl.warn, "cwrun: warning: cannot reach the key broker at %s (%s); the guest asks again until its timeout\n", rl.target.Redacted(), msg)
}

func (rl *relay) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	p := r.URL.Path
	allowed := false
	if path.Clean(p) == p {
		for _, a := range relayPaths {
			if (a.exact && p == a.prefix) || (!a.exact && strings.HasPrefix(p, a.prefix) && len(p) > len(a.prefix)) {
				if r.Method != a.method {
					w.Header().Set("Allow", a.method)
					http.Error(w, fmt.Sprintf("%s %s: the relay forwards only %s there", r.Method, p, a.method), http.StatusMethodNotAllowed)
					return
				}
				allowed = true
				break
			}
		}
	}
	if !allowed {
		rl.log.Debug("key broker relay: refused", "method", r.Method, "path", p)
		http.Error(w, "cwrun's relay forwards only the key broker's guest endpoints: POST /kbs/v0/auth, POST /kbs/v0/attest, GET /kbs/v0/resource/..., GET /kbs/v0/key/...", http.StatusNotFound)
		return
	}
	if r.ContentLength > maxRelayRequest {
		http.Error(w, fmt.Sprintf("request body of %d bytes: the relay forwards at most %d", r.ContentLength, maxRelayRequest), http.StatusRequestEntityTooLarge)
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, maxRelayRequest)
	ctx, cancel := context.WithTimeout(r.Context(), rl.timeout)
	defer cancel()
	sw := &statusWriter{ResponseWriter: w}
	rl.proxy.ServeHTTP(sw, r.WithContext(ctx))
	rl.log.Debug("key broker relay: forwarded", "method", r.Method, "path", p, "status", sw.status,
		"ms", time.Since(start).Milliseconds())
}

// modifyResponse bounds the broker's answer and makes its session
// cookie usable on the guest's side: the guest speaks plain HTTP to the
// relay, under a host name of its own, so a Secure or Domain attribute
// would make its cookie jar drop the cookie. The relay's leg to the
// broker stays TLS.
func (rl *relay) modifyResponse(resp *http.Response) error {
	if resp.ContentLength > maxRelayResponse {
		return fmt.Errorf("%w: it is %d bytes, more than the %d the relay forwards", errBadAnswer, resp.ContentLength, maxRelayResponse)
	}
	resp.Body = &limitedBody{r: io.LimitReader(resp.Body, maxRelayResponse+1), c: resp.Body, left: maxRelayResponse}
	if sc := resp.Header.Values("Set-Cookie"); len(sc) > 0 {
		resp.Header.Del("Set-Cookie")
		for _, line := range sc {
			c, err := http.ParseSetCookie(line)
			if err != nil {
				continue // the guest could not use it either
			}
			c.Secure, c.Domain = false, ""
			// A broker under a path prefix scopes its cookie to it; the
			// guest sees the paths without the prefix.
			if pre := strings.TrimSuffix(rl.target.Path, "/"); pre != "" && strings.HasPrefix(c.Path, pre+"/") {
				c.Path = strings.TrimPrefix(c.Path, pre)
			}
			resp.Header.Add("Set-Cookie", c.String())
		}
	}
	return nil
}

// errBadAnswer marks a broker answer the relay will not forward (502);
// any other failure means the broker did not answer (503).
var errBadAnswer = errors.New("the key broker's answer cannot be relayed")

// errResponseTooLarge aborts a broker answer beyond maxRelayResponse.
var errResponseTooLarge = errors.New("the key broker's answer exceeds the relay's limit")

type limitedBody struct {
	r    io.Reader
	c    io.Closer
	left int64
}

func (b *limitedBody) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	b.left -= int64(n)
	if b.left < 0 {
		return 0, errResponseTooLarge
	}
	return n, err
}

func (b *limitedBody) Close() error { return b.c.Close() }

type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(p)
}

// serve answers HTTP on the port's stream until stop is called. The
// server closes a connection when the guest asks it to (Connection:
// close) or sends garbage; the port then stays usable: dial reconnects
// to QEMU's socket for the guest's next request.
func (rl *relay) serve(first net.Conn, dial func() (net.Conn, error)) (stop func()) {
	l := newPortListener(first, dial)
	srv := &http.Server{
		Handler:           rl,
		ReadHeaderTimeout: 30 * time.Second,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(rl.log.Handler(), slog.LevelDebug),
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(l) //nolint:errcheck // ends with ErrServerClosed or the listener's close
	}()
	return func() {
		srv.Close() //nolint:errcheck // closes the listener and the connection
		<-done
	}
}

// portListener is a net.Listener over one virtio-serial port's socket:
// one connection at a time, the next dialled once the previous closed.
type portListener struct {
	mu     sync.Mutex
	first  net.Conn
	dial   func() (net.Conn, error)
	free   chan struct{} // a value when no connection is open
	closed chan struct{}
	once   sync.Once
}

func newPortListener(first net.Conn, dial func() (net.Conn, error)) *portListener {
	return &portListener{first: first, dial: dial, free: make(chan struct{}, 1), closed: make(chan struct{})}
}

func (l *portListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	c := l.first
	l.first = nil
	l.mu.Unlock()
	if c != nil {
		return &portConn{Conn: c, l: l}, nil
	}
	select {
	case <-l.closed:
		return nil, net.ErrClosed
	case <-l.free:
	}
	for {
		if c, err := l.dial(); err == nil {
			return &portConn{Conn: c, l: l}, nil
		}
		// QEMU is gone or busy; the run ends soon and closes us.
		select {
		case <-l.closed:
			return nil, net.ErrClosed
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (l *portListener) Close() error {
	l.once.Do(func() {
		close(l.closed)
		l.mu.Lock()
		if l.first != nil {
			l.first.Close()
			l.first = nil
		}
		l.mu.Unlock()
	})
	return nil
}

func (l *portListener) Addr() net.Addr { return portAddr{} }

type portAddr struct{}

func (portAddr) Network() string { return "virtio-serial" }
func (portAddr) String() string  { return "cwrun.kbs" }

// portConn tells its listener when it closed.
type portConn struct {
	net.Conn
	l    *portListener
	once sync.Once
}

func (c *portConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() {
		select {
		case c.l.free <- struct{}{}:
		default:
		}
	})
	return err
}
