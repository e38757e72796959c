package proto

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
)

func TestRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	c := NewConn(&buf)
	msgs := []Message{
		{Type: TypeConfig, Config: &Config{Passphrase: "p", Args: []string{"sh", "-c", "x\ny"}, Env: []string{"A=1"}, Network: true,
			Shares: []Share{{Tag: "v0", Path: "/data", ReadOnly: true}}, Timings: true}},
		{Type: TypeConfig, Config: &Config{TTY: true, TTYSize: &WinSize{Rows: 50, Cols: 132}, Stdin: true, KBS: true}},
		{Type: TypeSignal, Signal: 15},
		Resize(WinSize{Rows: 40, Cols: 100}),
		{Type: TypeStage, Stage: StageUnlock, MS: 1234},
		Exit(0),
		{Type: TypeExit, Signal: 9},
		{Type: TypeError, Stage: StageUnlock, Message: "wrong passphrase for the sealed disk"},
	}
	for _, m := range msgs {
		if err := c.Send(m); err != nil {
			t.Fatal(err)
		}
	}
	if n := strings.Count(buf.String(), "\n"); n != len(msgs) {
		t.Fatalf("%d lines for %d messages:\n%s", n, len(msgs), buf.String())
	}
	if !strings.Contains(buf.String(), `{"type":"exit","code":0}`) {
		t.Fatalf("exit code 0 not on the wire: %s", buf.String())
	}
	if !strings.HasPrefix(buf.String(), `{"type":"config","passphrase":"p","args":["sh","-c","x\ny"]`) {
		t.Fatalf("config is not flat on the wire: %s", buf.String())
	}
	for _, want := range []string{`"tty_size":{"rows":50,"cols":132}`, `{"type":"resize","rows":40,"cols":100}`, `"kbs":true`} {
		if !strings.Contains(buf.String(), want) {
			t.Fatalf("%s not on the wire: %s", want, buf.String())
		}
	}
	for i, want := range msgs {
		got, err := c.Recv()
		if err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
		if a, b := mustJSON(t, got), mustJSON(t, want); a != b {
			t.Errorf("message %d: got %s, want %s", i, a, b)
		}
	}
	if _, err := c.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("after the last message: %v, want EOF", err)
	}
}

func mustJSON(t *testing.T, m Message) string {
	var b bytes.Buffer
	if err := NewConn(&b).Send(m); err != nil {
		t.Fatal(err)
	}
	return b.String()
}

func TestRecvBad(t *testing.T) {
	for _, in := range []string{"not json\n", "{}\n", `{"type":"exit"` + "\n", strings.Repeat("x", MaxLine+10) + "\n", `{"type":"exit"`} {
		c := NewConn(&rw{strings.NewReader(in)})
		if m, err := c.Recv(); err == nil {
			t.Errorf("%.40q decoded as %+v", in, m)
		}
	}
	// Blank lines between messages are tolerated.
	c := NewConn(&rw{strings.NewReader("\n\n{\"type\":\"ready\"}\n")})
	if m, err := c.Recv(); err != nil || m.Type != TypeReady {
		t.Fatalf("%+v %v", m, err)
	}
}

type rw struct{ io.Reader }

func (rw) Write(p []byte) (int, error) { return len(p), nil }

func FuzzDecode(f *testing.F) {
	f.Add([]byte(`{"type":"config","passphrase":"x","shares":[{"tag":"a","path":"/b"}]}`))
	f.Add([]byte(`{"type":"signal","signal":2}`))
	f.Add([]byte(`{"type":"resize","rows":24,"cols":80}`))
	f.Add([]byte(`{"type":"config","tty":true,"tty_size":{"rows":1,"cols":2},"kbs":true}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := Decode(b)
		if err == nil && m.Type == "" {
			t.Fatal("decoded a message without a type")
		}
	})
}
