package kbs

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/cwrun/cwrun/attest"
	"github.com/cwrun/cwrun/attest/kbs/store"
	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/rego"
	"github.com/open-policy-agent/opa/v1/resolver"
	"github.com/open-policy-agent/opa/v1/util"
)

// Appraisal decides whether an attested guest gets a resource. For a
// workload's passphrase the checks run in this order, and the first that
// fails is the answer (403, naming the check):
//
//  1. tee: the token's TEE is the workload's;
//  2. insecure: evidence that proves nothing (sample) only for a sample
//     workload;
//  3. debug: an SNP guest whose policy allows debugging (the host can
//     read its memory) only where the workload accepts policy_debug=true;
//  4. reference: the workload names the TEE's anchor claim (SNP
//     measurement, TDX mr_td, TPM ak) or has a policy, and every
//     reference value the workload names is claimed and
//     among the accepted values;
//  5. policy: the workload's Rego policy, if any;
//  6. policy: the broker-wide resource policy, if any.
//
// Any other resource is released only if the broker-wide resource policy
// allows it or, with no policy set, if the evidence is not insecure: the
// same as Trustee's default policy, which allows every non-sample token.
//
// Policies are Rego with Trustee's inputs: `input` is the token's claims
// (EAR: input.submods.cpu0["ear.veraison.annotated-evidence"].<tee>...,
// plus cwrun's input.cwrun.{tee,insecure,values}); `data.plugin` is
// "resource", `data["resource-path"]` is "/repo/type/tag" and
// `data.query` the request's query parameters. The decision is
// data.policy.allow; undefined counts as false.

// Denial checks, as named in errors, logs and the denials metric.
const (
	checkTee       = "tee"
	checkInsecure  = "insecure"
	checkDebug     = "debug"
	checkReference = "reference"
	checkPolicy    = "policy"
)

// PolicyName is the store name of the broker-wide resource policy.
const PolicyName = "resource"

func denied(check, format string, args ...any) *apiError {
	return &apiError{status: http.StatusForbidden, msg: fmt.Sprintf(format, args...), check: check}
}

// appraiseWorkload runs the passphrase checks; payload is the token's
// claims JSON (the policies' input).
func (s *Server) appraiseWorkload(ctx context.Context, wl *store.Workload, c *tokenView, payload []byte, rp string, q url.Values) error {
	if wl.Tee != c.Cwrun.Tee {
		return denied(checkTee, "workload %s expects %s evidence, got %s", wl.ID, wl.Tee, c.Cwrun.Tee)
	}
	if c.Cwrun.Insecure && wl.Tee != attest.TeeSample {
		return denied(checkInsecure, "workload %s takes %s evidence only; the token's evidence is insecure", wl.ID, wl.Tee)
	}
	if wl.Tee == attest.TeeSNP && c.Cwrun.Values["policy_debug"] != "false" &&
		!slices.ContainsFunc(wl.References["policy_debug"], func(v string) bool { return strings.EqualFold(v, "true") }) {
		// A missing claim counts as debug allowed: fail closed.
		return denied(checkDebug, "workload %s: the SNP guest policy allows debugging, so the host can read the guest's memory; register references policy_debug=[\"true\"] to accept such guests", wl.ID)
	}
	if anchors, ok := anchorReference[wl.Tee]; ok && !slices.ContainsFunc(anchors, func(a string) bool { return len(wl.References[a]) > 0 }) && wl.Policy == "" {
		anchor := strings.Join(anchors, " or ")
		return denied(checkReference, "workload %s registers no %s reference value, so any %s guest would pass; register the expected %s (or a workload policy)", wl.ID, anchor, wl.Tee, anchor)
	}
	names := make([]string, 0, len(wl.References))
	for n := range wl.References {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		accepted := wl.References[n]
		got, ok := c.Cwrun.Values[n]
		if !ok {
			return denied(checkReference, "workload %s requires claim %s, which the %s evidence does not carry", wl.ID, n, c.Cwrun.Tee)
		}
		if !slices.ContainsFunc(accepted, func(v string) bool { return strings.EqualFold(v, got) }) {
			return denied(checkReference, "%s %s not among the %d registered for workload %s (expected %s)", n, abbrev(got), len(accepted), wl.ID, abbrevList(accepted))
		}
	}
	if wl.Policy != "" {
		if err := s.evalPolicy(ctx, "workload "+wl.ID, wl.Policy, payload, rp, q); err != nil {
			return err
		}
	}
	pol, err := s.resourcePolicy(ctx)
	if err != nil {
		return err
	}
	if pol != "" {
		return s.evalPolicy(ctx, PolicyName, pol, payload, rp, q)
	}
	return nil
}

// anchorReference is, per TEE, the claim without which evidence says
// nothing about which guest it is: the launch measurement for SNP, the
// TD measurement for TDX, and for a TPM the attestation key itself (a
// quote by an unknown key is anyone's). A workload must name it, or
// carry its own policy.
// For a TPM, "ek_ca" stands in for "ak": the AK proved by credential
// activation to live in a TPM whose EK that CA vouches for.
var anchorReference = map[string][]string{
	attest.TeeSNP: {"measurement"},
	attest.TeeTDX: {"mr_td"},
	attest.TeeTPM: {"ak", "ek_ca"},
}

// appraiseGeneric gates resources other than workload passphrases.
func (s *Server) appraiseGeneric(ctx context.Context, c *tokenView, payload []byte, rp string, q url.Values) error {
	pol, err := s.resourcePolicy(ctx)
	if err != nil {
		return err
	}
	if pol != "" {
		return s.evalPolicy(ctx, PolicyName, pol, payload, rp, q)
	}
	if c.Cwrun.Insecure {
		return denied(checkInsecure, "resource %s: no resource policy is set and the token's %s evidence is insecure; the default releases resources to secure TEEs only (set a resource policy to change that)", rp, c.Cwrun.Tee)
	}
	return nil
}

// resourcePolicy reads the broker-wide resource policy. Every release
// needs it, so it is kept for policyTTL: a policy set on this broker
// applies at once (setResourcePolicy drops the copy), one set through
// another replica within policyTTL.
func (s *Server) resourcePolicy(ctx context.Context) (string, error) {
	now := time.Now()
	s.polMu.Lock()
	if s.polAt.Add(policyTTL).After(now) && !s.polAt.After(now) {
		pol := s.pol
		s.polMu.Unlock()
		return pol, nil
	}
	s.polMu.Unlock()
	pol, err := s.store.Policy(ctx, PolicyName)
	if errors.Is(err, store.ErrNotFound) {
		pol, err = "", nil
	}
	if err != nil {
		return "", storeErr("read resource policy", err)
	}
	if pol == clearedPolicy {
		pol = ""
	}
	s.polMu.Lock()
	s.pol, s.polAt = pol, now
	s.polMu.Unlock()
	return pol, nil
}

// policyTTL is how long a replica may act on a resource policy that
// another replica has replaced.
const policyTTL = time.Second

// forgetPolicy drops the cached resource policy.
func (s *Server) forgetPolicy() {
	s.polMu.Lock()
	s.polAt = time.Time{}
	s.polMu.Unlock()
}

// clearedPolicy is stored when an admin clears the resource policy: the
// store keeps only non-empty text and has no way to delete a policy.
const clearedPolicy = "# cwrun-kbs: no resource policy is set (cleared); the default applies\n"

// abbrev shortens a claim value for a message: enough to recognise a
// measurement, not a wall of hex.
func abbrev(v string) string {
	if len(v) <= 12 {
		return v
	}
	return v[:8] + "…"
}

// abbrevList shows the first accepted values, abbreviated: reference
// values are measurements, not secrets, and the pair got/expected is
// what tells an operator which input changed.
func abbrevList(vs []string) string {
	out := make([]string, 0, 3)
	for i, v := range vs {
		if i == 3 {
			out = append(out, fmt.Sprintf("and %d more", len(vs)-3))
			break
		}
		out = append(out, abbrev(v))
	}
	return strings.Join(out, ", ")
}

// policyEvalTimeout bounds one policy evaluation; a policy that loops
// denies instead of holding the request.
const policyEvalTimeout = 2 * time.Second

func (s *Server) evalPolicy(ctx context.Context, name, text string, payload []byte, rp string, q url.Values) error {
	pq, err := s.policies.get(text)
	if err != nil {
		return denied(checkPolicy, "policy %q does not compile, so it denies resource %s: %v", name, rp, err)
	}
	var input any
	if err := util.UnmarshalJSON(payload, &input); err != nil {
		return denied(checkPolicy, "policy %q: token claims unreadable: %v", name, err)
	}
	query := ast.NewObject()
	for k, vs := range q {
		if len(vs) > 0 {
			query.Insert(ast.StringTerm(k), ast.StringTerm(vs[0]))
		}
	}
	ctx, cancel := context.WithTimeout(ctx, policyEvalTimeout)
	defer cancel()
	rs, err := pq.Eval(ctx,
		rego.EvalInput(input),
		rego.EvalTime(s.now()),
		rego.EvalResolver(refPlugin, constResolver{ast.String("resource")}),
		rego.EvalResolver(refResourcePath, constResolver{ast.String("/" + rp)}),
		rego.EvalResolver(refQuery, constResolver{query}),
	)
	if err != nil {
		return denied(checkPolicy, "policy %q failed on resource %s, so it denies: %v", name, rp, err)
	}
	if len(rs) == 0 || len(rs[0].Expressions) == 0 {
		return denied(checkPolicy, "policy %q denied resource %s (data.policy.allow is undefined)", name, rp)
	}
	if allow, ok := rs[0].Expressions[0].Value.(bool); !ok || !allow {
		return denied(checkPolicy, "policy %q denied resource %s", name, rp)
	}
	return nil
}

var (
	refPlugin       = ast.MustParseRef("data.plugin")
	refResourcePath = ast.MustParseRef(`data["resource-path"]`)
	refQuery        = ast.MustParseRef("data.query")
)

// constResolver answers one value for a data path during one
// evaluation: how per-request data reaches a policy compiled once.
type constResolver struct{ v ast.Value }

func (c constResolver) Eval(context.Context, resolver.Input) (resolver.Result, error) {
	return resolver.Result{Value: c.v}, nil
}

// policyCache holds compiled policies by the SHA-256 of their text, so a
// policy is compiled once however many requests it judges, and a changed
// policy (another text) compiles afresh on every replica.
type policyCache struct {
	mu sync.RWMutex
	m  map[[32]byte]*compiledPolicy
}

type compiledPolicy struct {
	once sync.Once
	pq   rego.PreparedEvalQuery
	err  error
}

// maxCachedPolicies bounds the cache; past it the cache starts over
// (policies are few: one per workload that has one, plus the broker's).
const maxCachedPolicies = 1024

func newPolicyCache() *policyCache { return &policyCache{m: map[[32]byte]*compiledPolicy{}} }

func (pc *policyCache) get(text string) (*rego.PreparedEvalQuery, error) {
	key := sha256.Sum256([]byte(text))
	pc.mu.RLock()
	cp := pc.m[key]
	pc.mu.RUnlock()
	if cp == nil {
		pc.mu.Lock()
		if cp = pc.m[key]; cp == nil {
			if len(pc.m) >= maxCachedPolicies {
				clear(pc.m)
			}
			cp = &compiledPolicy{}
			pc.m[key] = cp
		}
		pc.mu.Unlock()
	}
	cp.once.Do(func() { cp.pq, cp.err = compilePolicy(text) })
	if cp.err != nil {
		return nil, cp.err
	}
	return &cp.pq, nil
}

// unsafeBuiltins are refused in policies: a resource decision must not
// reach the network or leak the broker's environment.
var unsafeBuiltins = map[string]struct{}{
	"http.send":          {},
	"net.lookup_ip_addr": {},
	"opa.runtime":        {},
	"trace":              {},
}

// compilePolicy compiles Rego v1 syntax, falling back to v0 syntax so
// that policies written for Trustee's older releases still load.
func compilePolicy(text string) (rego.PreparedEvalQuery, error) {
	compile := func(v ast.RegoVersion) (rego.PreparedEvalQuery, error) {
		return rego.New(
			rego.Query("data.policy.allow"),
			rego.Module("policy.rego", text),
			rego.SetRegoVersion(v),
			rego.UnsafeBuiltins(unsafeBuiltins),
			rego.StrictBuiltinErrors(true),
		).PrepareForEval(context.Background())
	}
	pq, err := compile(ast.RegoV1)
	if err == nil {
		return pq, nil
	}
	if pq0, err0 := compile(ast.RegoV0); err0 == nil {
		return pq0, nil
	}
	return pq, compactErr(err)
}

// compactErr makes OPA's multi-line errors fit one message line.
func compactErr(err error) error {
	msg := strings.Join(strings.Fields(err.Error()), " ")
	return errors.New(truncate(msg, 400))
}

// CheckPolicy compiles a Rego resource policy and reports why it does
// not compile; it also tells that the policy defines data.policy.allow
// in package policy. Admin calls check policies with it before storing
// them.
func CheckPolicy(text string) error {
	if len(text) > maxPolicy {
		return fmt.Errorf("policy is %d bytes; at most %d", len(text), maxPolicy)
	}
	if err := store.CheckText("policy", text); err != nil {
		return errors.New("policy is not plain text (UTF-8 without NUL bytes)")
	}
	if _, err := compilePolicy(text); err != nil {
		return fmt.Errorf("policy does not compile: %w", err)
	}
	mod, err := ast.ParseModuleWithOpts("policy.rego", text, ast.ParserOptions{RegoVersion: ast.RegoV1})
	if err != nil {
		mod, err = ast.ParseModuleWithOpts("policy.rego", text, ast.ParserOptions{RegoVersion: ast.RegoV0})
	}
	if err != nil {
		return fmt.Errorf("policy does not parse: %w", compactErr(err))
	}
	if !mod.Package.Path.Equal(ast.MustParseRef("data.policy")) {
		return fmt.Errorf("policy is package %s; it must be package policy (the broker asks data.policy.allow)", strings.TrimPrefix(mod.Package.Path.String(), "data."))
	}
	for _, r := range mod.Rules {
		if r.Head.Ref().String() == "allow" {
			return nil
		}
	}
	return errors.New("policy defines no allow rule, so it would deny everything; define allow (the broker asks data.policy.allow)")
}

const maxPolicy = 64 << 10
