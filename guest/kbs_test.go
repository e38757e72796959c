package guest

import (
	"context"
	"encoding/json"
	"errors"
	"reflect"
	"testing"

	"github.com/cwrun/cwrun/attest"
	"github.com/cwrun/cwrun/attest/sample"
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
