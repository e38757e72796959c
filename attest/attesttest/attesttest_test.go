package attesttest_test

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/cwrun/cwrun/attest"
	"github.com/cwrun/cwrun/attest/attesttest"
	"github.com/cwrun/cwrun/attest/sample"
)

// broken verifiers, each violating one part of the contract.
type lax struct{ attest.Verifier }

func (lax) Verify(context.Context, json.RawMessage, []byte) (*attest.Claims, error) {
	return &attest.Claims{Tee: attest.TeeSample, Values: map[string]string{}}, nil
}

type plainErrors struct{ attest.Verifier }

func (p plainErrors) Verify(ctx context.Context, ev json.RawMessage, rd []byte) (*attest.Claims, error) {
	c, err := p.Verifier.Verify(ctx, ev, rd)
	if err != nil {
		return nil, errors.New("bad evidence") // does not wrap ErrEvidence
	}
	return c, nil
}

type panics struct{ attest.Verifier }

func (p panics) Verify(ctx context.Context, ev json.RawMessage, rd []byte) (*attest.Claims, error) {
	if string(ev) == "null" {
		panic("nil map")
	}
	return p.Verifier.Verify(ctx, ev, rd)
}

type wrongTee struct{ attest.Verifier }

func (wrongTee) Tee() string { return "snp" }

// constant ignores the report data it is given.
type constant struct{ attest.Attester }

func (c constant) Evidence(ctx context.Context, _ []byte) (json.RawMessage, error) {
	return c.Attester.Evidence(ctx, make([]byte, 64))
}

var children = map[string]struct {
	run  func(t *testing.T)
	want string
}{
	"lax": {want: "want an error wrapping attest.ErrEvidence", run: func(t *testing.T) {
		attesttest.VerifierSuite(t, verifierCase(lax{sample.NewVerifier()}))
	}},
	"plain errors": {want: "want it to wrap attest.ErrEvidence", run: func(t *testing.T) {
		attesttest.VerifierSuite(t, verifierCase(plainErrors{sample.NewVerifier()}))
	}},
	"panics": {want: "panicked", run: func(t *testing.T) {
		attesttest.VerifierSuite(t, verifierCase(panics{sample.NewVerifier()}))
	}},
	"wrong tee": {want: "Claims.Tee", run: func(t *testing.T) {
		attesttest.VerifierSuite(t, verifierCase(wrongTee{sample.NewVerifier()}))
	}},
	"constant attester": {want: "Verify(attester's evidence)", run: func(t *testing.T) {
		attesttest.AttesterSuite(t, attesttest.AttesterCase{Attester: constant{sample.NewAttester()}, Verifier: sample.NewVerifier()})
	}},
}

func verifierCase(v attest.Verifier) attesttest.VerifierCase {
	return attesttest.VerifierCase{
		Verifier: v,
		Evidence: func(t *testing.T, rd []byte) json.RawMessage {
			ev, err := sample.NewAttester().Evidence(context.Background(), rd)
			if err != nil {
				t.Fatal(err)
			}
			return ev
		},
	}
}

const childEnv = "ATTESTTEST_CHILD"

// TestChild runs one suite against a broken implementation; it does
// something only as a child of TestSuitesCatchBrokenImplementations.
func TestChild(t *testing.T) {
	name := os.Getenv(childEnv)
	if name == "" {
		t.Skip("runs only as a child of TestSuitesCatchBrokenImplementations")
	}
	children[name].run(t)
}

// TestSuitesCatchBrokenImplementations checks the suites can fail: each
// broken implementation, run in a child test process, must fail for
// the expected reason.
func TestSuitesCatchBrokenImplementations(t *testing.T) {
	if os.Getenv(childEnv) != "" {
		t.Skip("in a child")
	}
	for name, c := range children {
		t.Run(name, func(t *testing.T) {
			cmd := exec.Command(os.Args[0], "-test.run=^TestChild$", "-test.v")
			cmd.Env = append(os.Environ(), childEnv+"="+name)
			out, err := cmd.CombinedOutput()
			if err == nil {
				t.Fatalf("the suite passed a broken implementation (%s):\n%s", name, out)
			}
			if !strings.Contains(string(out), c.want) {
				t.Errorf("the suite failed, but not with %q:\n%s", c.want, out)
			}
		})
	}
}
