// Package kbs is cwrun's key broker: Trustee's KBS protocol 0.4.0
// (auth, attest, resource), the krun endpoints, and an admin API, over
// one Store. Sessions are sealed cookies, so any replica sharing the
// config's keys and the store answers any step.
//
// Release rules, in short (appraise.go has them in full): a workload's
// passphrase (resource cwrun/<id>/passphrase, or krun's /key/<id>) goes
// to a guest whose token names the workload's TEE, carries secure
// evidence (sample only for sample workloads), meets every reference
// value registered, and passes the workload's Rego policy and the
// broker-wide resource policy where set. Any other resource goes where
// the resource policy allows or, with none set, to any guest with
// secure evidence: Trustee's default policy, which refuses only sample.
// Every denial names the check that failed, in the answer and the log.
//
// krun's own attestation flow (protocol 0.0.0, RSA keys) is not served:
// /kbs/v0/key/<id> answers after Trustee's handshake, with the token,
// the passphrase sealed to the TEE key as a JWE.
//
// The broker never sees secrets in clear at rest: passphrases and
// resources are sealed with the at-rest key, bound to their record, and
// no log line carries them. It must never log evidence beyond the claim
// a denial names, nor answer 5xx for a client's bad input.
package kbs

import (
	"crypto"
	"crypto/ecdsa"
	"log/slog"
	"time"

	"github.com/cwrun/cwrun/attest"
	"github.com/cwrun/cwrun/attest/kbs/store"
	"github.com/prometheus/client_golang/prometheus"
)

// Options make a broker. Zero values mean the default named.
type Options struct {
	Store     store.Store       // required
	Verifiers []attest.Verifier // one per TEE served; a TEE without one is refused at /auth
	TokenKey  *ecdsa.PrivateKey // P-256, signs attestation tokens (ES256); required
	CookieKey []byte            // 32 bytes, seals session cookies (AES-256-GCM); required
	AtRestKey []byte            // 32 bytes, seals passphrases and resources in the store; required
	// PreviousCookieKeys and PreviousAtRestKeys are the keys of a
	// rotation in progress (32 bytes each): they still open the cookies
	// and records they sealed, but nothing new is sealed under them, and
	// Reseal moves every record onto AtRestKey.
	PreviousCookieKeys [][]byte
	PreviousAtRestKeys [][]byte
	AdminKeys          []crypto.PublicKey // Ed25519 or ECDSA P-256 keys whose JWTs the admin API accepts; none: admin API refused
	// AllowRegister enables krun's unauthenticated /kbs/v0/register_workload
	// (never overwriting an existing workload). Default off.
	AllowRegister bool
	SessionTTL    time.Duration         // default 5 min, as Trustee
	TokenTTL      time.Duration         // default 5 min
	Logger        *slog.Logger          // default: discard
	Metrics       prometheus.Registerer // default: none registered
	Now           func() time.Time      // default time.Now
	// Admission queues new handshakes at /auth, first come first
	// served, while the broker is saturated (see admission); `cwrun kbs
	// serve` turns it on. AdmitWait bounds a guest's wait in the queue
	// before a 503 (default DefaultAdmitWait).
	Admission bool
	AdmitWait time.Duration
}

// DefaultGCPercent is the Go garbage collector target (GOGC) that
// `cwrun kbs serve` sets unless told otherwise. A handshake allocates
// tens of KiB (hundreds for SNP evidence) and keeps almost nothing, so
// the live heap is a few MiB and Go's default of 100 collects very
// often: at 400 the broker spent about a quarter less CPU per handshake
// in BenchmarkHandshakeSplit on a 2-core machine (and its guests, at the
// same setting, a sixth less); 800 gained nothing more and 2000 lost,
// to a heap too large for the caches.
const DefaultGCPercent = 400

// Admin API (every call carries Authorization: Bearer <admin JWT>):
//
//	POST   /kbs/v0/admin/workloads            WorkloadSpec → 201; 409 if the id exists
//	GET    /kbs/v0/admin/workloads            → []WorkloadInfo
//	GET    /kbs/v0/admin/workloads/{id}       → WorkloadInfo
//	PUT    /kbs/v0/admin/workloads/{id}       WorkloadSpec → 200 (replace, keeps Created; passphrase kept when empty)
//	DELETE /kbs/v0/admin/workloads/{id}       → 204
//	POST   /kbs/v0/resource/{repo}/{type}/{tag}   raw bytes → 200 (Trustee's admin call)
//	GET    /kbs/v0/admin/resource/{repo}/{type}/{tag} → raw bytes
//	DELETE /kbs/v0/admin/resource/{repo}/{type}/{tag} → 204
//	GET    /kbs/v0/admin/resources            → ["repo/type/tag", ...] (paths only, sorted)
//	POST   /kbs/v0/resource-policy            {"policy":"<base64url Rego>"} → 200 (Trustee's shape)
//	GET    /kbs/v0/resource-policy            → {"policy":"<base64url Rego>"}
//	POST   /kbs/v0/admin/reseal               → ResealReport (every secret onto the current at-rest key)
//
// Errors are JSON {"error": "<what failed and why>"} with a 4xx/5xx code.

// WorkloadSpec registers or replaces a workload.
type WorkloadSpec struct {
	ID         string              `json:"id"`
	Tee        string              `json:"tee"`
	Passphrase string              `json:"passphrase,omitempty"` // the disk passphrase; never returned
	References map[string][]string `json:"references,omitempty"` // claim name → accepted values (attest.Claims.Values)
	Policy     string              `json:"policy,omitempty"`     // optional Rego, data.policy.allow
	CPUs       int                 `json:"cpus,omitempty"`
	MemoryMiB  int                 `json:"memory_mib,omitempty"`
}

// WorkloadInfo is a workload as the admin API shows it: no passphrase.
type WorkloadInfo struct {
	ID         string              `json:"id"`
	Tee        string              `json:"tee"`
	References map[string][]string `json:"references,omitempty"`
	Policy     string              `json:"policy,omitempty"`
	CPUs       int                 `json:"cpus,omitempty"`
	MemoryMiB  int                 `json:"memory_mib,omitempty"`
	Created    time.Time           `json:"created"`
}

// PassphrasePath is the resource path under which a workload's disk
// passphrase is released: GET /kbs/v0/resource/cwrun/<id>/passphrase.
// The workload's reference values, TEE and policy gate it.
func PassphrasePath(workloadID string) string { return "cwrun/" + workloadID + "/passphrase" }
