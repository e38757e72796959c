package kbs

import (
	"context"
	"encoding/json"

	"github.com/cwrun/cwrun/attest"
	"github.com/cwrun/cwrun/attest/internal/jsonx"
)

// Optional powers of a Verifier, found by type assertion, for TEEs whose
// check is a question asked at /auth and answered in the evidence (a
// TPM's credential activation). Sessions stay stateless: the question is
// derived from the nonce, which the sealed cookie carries to /attest.

// challenger adds the challenge's extra-params for a guest's /auth
// request. nil: none ("").
type challenger interface {
	Challenge(ctx context.Context, nonce string, extraParams json.RawMessage) (json.RawMessage, error)
}

// sessionVerifier is Verify given the session's nonce.
type sessionVerifier interface {
	VerifySession(ctx context.Context, evidence json.RawMessage, reportData []byte, nonce string) (*attest.Claims, error)
}

// verify runs v's check, with the nonce where v asks for it.
func verify(ctx context.Context, v attest.Verifier, evidence json.RawMessage, reportData []byte, nonce string) (*attest.Claims, error) {
	if sv, ok := v.(sessionVerifier); ok {
		return sv.VerifySession(ctx, evidence, reportData, nonce)
	}
	return v.Verify(ctx, evidence, reportData)
}

// appendChallengeExtra writes the answer to /auth with extra-params (a
// JSON value); empty extra is appendChallenge's "".
func appendChallengeExtra(dst []byte, nonce string, extra json.RawMessage) []byte {
	if len(extra) == 0 {
		return appendChallenge(dst, nonce)
	}
	dst = append(dst, `{"nonce":`...)
	dst = jsonx.AppendString(dst, nonce)
	dst = append(dst, `,"extra-params":`...)
	dst = append(dst, extra...)
	return append(dst, '}')
}
