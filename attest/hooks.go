package attest

import (
	"context"
	"encoding/json"
)

// Optional powers of an Attester, found by type assertion: a TEE whose
// evidence answers a question of the broker (a TPM's credential
// activation) adds members to the /auth request's extra-params and reads
// the challenge's.

// AuthParamser adds members to the /auth request's extra-params
// (beside "supported-hash-algorithms").
type AuthParamser interface {
	AuthParams(ctx context.Context) (map[string]json.RawMessage, error)
}

// ChallengeTaker reads the challenge's extra-params before Evidence is
// asked for.
type ChallengeTaker interface {
	TakeChallenge(ctx context.Context, extraParams json.RawMessage) error
}
