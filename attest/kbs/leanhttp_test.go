package kbs

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
)

// leanTransport is the load generator's HTTP/1.1 transport: one
// keep-alive connection per guest, requests written and answers read
// on the calling goroutine. net/http's Transport pools connections
// across goroutines and hands every request to a connection's reader
// and writer goroutines: worth it for a real client, but with 64 guests
// sharing the broker's two cores that bookkeeping cost about as much
// CPU as the guests' own cryptography, and it is not what a broker is
// measured by. The broker sees the same requests either way (the
// guests still run attest.Client over HTTP/1.1 with keep-alive).
//
// One leanTransport serves one goroutine at a time.
type leanTransport struct {
	addr string // host:port
	conn net.Conn
	br   *bufio.Reader
	bw   *bufio.Writer
	buf  []byte
}

func newLeanTransport(base string) (*leanTransport, error) {
	u, err := url.Parse(base)
	if err != nil || u.Scheme != "http" {
		return nil, fmt.Errorf("lean transport: %q is not an http:// URL", base)
	}
	return &leanTransport{addr: u.Host}, nil
}

func (t *leanTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.URL.Scheme != "http" || req.URL.Host != t.addr {
		return nil, fmt.Errorf("lean transport: only http://%s, not %s", t.addr, req.URL)
	}
	var body []byte
	if req.Body != nil {
		var err error
		body, err = io.ReadAll(req.Body)
		req.Body.Close()
		if err != nil {
			return nil, err
		}
	}
	for attempt := 0; ; attempt++ {
		fresh := t.conn == nil
		if fresh {
			c, err := net.Dial("tcp", t.addr)
			if err != nil {
				return nil, err
			}
			t.conn, t.br, t.bw = c, bufio.NewReaderSize(c, 16<<10), bufio.NewWriterSize(c, 16<<10)
		}
		resp, err := t.exchange(req, body)
		if err == nil {
			return resp, nil
		}
		t.close()
		// A kept-alive connection the server closed meanwhile: once more
		// on a new one.
		if fresh || attempt > 0 {
			return nil, err
		}
	}
}

func (t *leanTransport) exchange(req *http.Request, body []byte) (*http.Response, error) {
	b := t.buf[:0]
	b = append(b, req.Method...)
	b = append(b, ' ')
	b = append(b, req.URL.RequestURI()...)
	b = append(b, " HTTP/1.1\r\nHost: "...)
	b = append(b, t.addr...)
	b = append(b, "\r\n"...)
	for k, vs := range req.Header {
		for _, v := range vs {
			b = append(b, k...)
			b = append(b, ": "...)
			b = append(b, v...)
			b = append(b, "\r\n"...)
		}
	}
	if body != nil {
		b = append(b, "Content-Length: "...)
		b = strconv.AppendInt(b, int64(len(body)), 10)
		b = append(b, "\r\n"...)
	}
	b = append(b, "\r\n"...)
	t.buf = b
	if _, err := t.bw.Write(b); err != nil {
		return nil, err
	}
	if _, err := t.bw.Write(body); err != nil {
		return nil, err
	}
	if err := t.bw.Flush(); err != nil {
		return nil, err
	}
	resp, err := http.ReadResponse(t.br, req)
	if err != nil {
		return nil, err
	}
	if resp.Close {
		resp.Body = &closeAfter{ReadCloser: resp.Body, t: t}
		return resp, nil
	}
	resp.Body = &drainOnClose{ReadCloser: resp.Body, t: t}
	return resp, nil
}

func (t *leanTransport) close() {
	if t.conn != nil {
		t.conn.Close()
		t.conn = nil
	}
}

// CloseIdleConnections lets http.Client.CloseIdleConnections end the
// connection.
func (t *leanTransport) CloseIdleConnections() { t.close() }

// drainOnClose reads what the caller left of a body, so that the
// connection is ready for the next request; a body that does not end
// cleanly takes the connection with it.
type drainOnClose struct {
	io.ReadCloser
	t *leanTransport
}

func (d *drainOnClose) Close() error {
	if _, err := io.Copy(io.Discard, d.ReadCloser); err != nil {
		d.t.close()
	}
	return d.ReadCloser.Close()
}

type closeAfter struct {
	io.ReadCloser
	t *leanTransport
}

func (c *closeAfter) Close() error {
	err := c.ReadCloser.Close()
	c.t.close()
	return err
}

var _ http.RoundTripper = (*leanTransport)(nil)
