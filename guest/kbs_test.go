package guest

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"reflect"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cwrun/cwrun/attest"
	"github.com/cwrun/cwrun/attest/sample"
	"github.com/cwrun/cwrun/sealed"
)

// activatingAttester has the client's optional steps.
type activatingAttester struct {
	attest.Attester
	took json.RawMessage
}

func (a *activatingAttester) AuthParams(context.Context) (map[string]json.RawMessage, error) {
	return map[string]json.RawMessage{"x": json.RawMessage(`1`)}, nil
}

func (a *activatingAttester) TakeChallenge(_ context.Context, extra json.RawMessage) error {
	a.took = extra
	return errors.New("refused")
}

func TestStagedAttester(t *testing.T) {
	ctx := context.Background()
	var stages []string
	mark := func(s string) { stages = append(stages, s) }

	inner := &activatingAttester{Attester: sample.NewAttester()}
	a := stagedAttester{Attester: inner, stage: mark}
	p, err := a.AuthParams(ctx)
	if err != nil || string(p["x"]) != "1" {
		t.Fatalf("AuthParams not passed through: %v, %v", p, err)
	}
	if err := a.TakeChallenge(ctx, json.RawMessage(`{"c":2}`)); err == nil || string(inner.took) != `{"c":2}` {
		t.Fatalf("TakeChallenge not passed through: %v, took %s", err, inner.took)
	}
	if _, err := a.Evidence(ctx, make([]byte, 64)); err != nil {
		t.Fatal(err)
	}
	want := []string{"key: auth parameters", "key: challenge received", "key: challenge answered", "key: evidence made"}
	if !reflect.DeepEqual(stages, want) {
		t.Errorf("stages %q, want %q", stages, want)
	}

	// An attester without the optional steps adds and reads nothing,
	// and reports no step it does not take.
	stages = nil
	plain := stagedAttester{Attester: sample.NewAttester(), stage: mark}
	if p, err := plain.AuthParams(ctx); p != nil || err != nil {
		t.Errorf("AuthParams of a plain attester: %v, %v", p, err)
	}
	if err := plain.TakeChallenge(ctx, json.RawMessage(`{}`)); err != nil {
		t.Errorf("TakeChallenge of a plain attester: %v", err)
	}
	if len(stages) != 0 {
		t.Errorf("a plain attester reported %q", stages)
	}
}

// A busy broker (503) is asked again with a fresh handshake until the
// timeout, a stale handshake (start_again) a few times; a refusal is
// not.
func TestBrokerKeyRetriesOnlyWhenBusy(t *testing.T) {
	for _, tc := range []struct {
		status    int
		body      string
		wantAuths int // at least
		maxAuths  int
		stage     string
	}{
		{http.StatusServiceUnavailable, `{"error":"no"}`, 2, 10, "key: broker busy, asking again"},
		{http.StatusUnauthorized, `{"error":"no"}`, 1, 1, ""},
		{http.StatusForbidden, `{"error":"measurement not among the registered"}`, 1, 1, ""},
		// A stale session: a few fresh handshakes, then the error.
		{http.StatusUnauthorized, `{"error":"session began before this broker restarted","start_again":true}`, 1 + maxStaleHandshakes, 1 + maxStaleHandshakes, "key: handshake went stale at the broker, starting again"},
	} {
		var auths atomic.Int32
		ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			auths.Add(1)
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(tc.status)
			_, _ = w.Write([]byte(tc.body))
		}))
		var stages []string
		var mu sync.Mutex
		b := BrokerKey{
			Attester: sample.NewAttester(),
			Timeout:  2500 * time.Millisecond,
			Stage:    func(s string) { mu.Lock(); stages = append(stages, s); mu.Unlock() },
			open:     func() (net.Conn, error) { return net.Dial("tcp", ts.Listener.Addr().String()) },
		}
		_, err := b.Passphrase(context.Background(), nil, sealed.Config{WorkloadID: "w", TEE: sealed.TEESample})
		ts.Close()
		var be *attest.BrokerError
		if !errors.As(err, &be) || be.Status != tc.status {
			t.Fatalf("status %d: error %v, want the broker's %d", tc.status, err, tc.status)
		}
		if n := int(auths.Load()); n < tc.wantAuths || n > tc.maxAuths {
			t.Errorf("status %d: %d handshakes began, want %d to %d", tc.status, n, tc.wantAuths, tc.maxAuths)
		}
		mu.Lock()
		retried := slices.Contains(stages, "key: broker busy, asking again") ||
			slices.Contains(stages, "key: handshake went stale at the broker, starting again")
		wantStage := tc.stage == "" || slices.Contains(stages, tc.stage)
		mu.Unlock()
		if retried != (tc.stage != "") || !wantStage {
			t.Errorf("status %d: stages %q", tc.status, stages)
		}
	}
}
