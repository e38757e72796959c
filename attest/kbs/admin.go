package kbs

import (
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/cwrun/cwrun/attest"
	"github.com/cwrun/cwrun/attest/kbs/store"
)

// The admin API (routes in api.go). Every handler here runs behind
// adminOnly. Secrets go in (passphrases, resources) and are sealed at
// once; only GET /admin/resource gives one back, to an admin.

// knownTees are the TEE names a workload may be registered for: the
// ones Trustee's protocol names. A workload for a TEE this broker has no
// verifier for can be registered (another replica may verify it), and
// the log says so.
var knownTees = []string{
	attest.TeeSample, attest.TeeSNP, attest.TeeTDX, attest.TeeTPM,
	"az-snp-vtpm", "az-tdx-vtpm", "sgx", "cca", "csv", "se", "nvidia", "sampledevice",
}

// Limits on a workload spec.
const (
	maxPassphrase      = 4096
	maxReferenceNames  = 64
	maxReferenceValues = 1024
	maxReferenceValue  = 1024
)

// checkSpec validates a spec; create says whether a passphrase is
// required.
func checkSpec(spec *WorkloadSpec, create bool) error {
	if err := checkWorkloadID(spec.ID); err != nil {
		return err
	}
	if !slices.Contains(knownTees, spec.Tee) {
		return badRequest("workload %s: tee %q unknown; use one of %s", spec.ID, truncate(spec.Tee, 32), strings.Join(knownTees, ", "))
	}
	if create && spec.Passphrase == "" {
		return badRequest("workload %s: a passphrase is required (the disk key the broker releases)", spec.ID)
	}
	if len(spec.Passphrase) > maxPassphrase {
		return badRequest("workload %s: passphrase longer than %d bytes", spec.ID, maxPassphrase)
	}
	if len(spec.References) > maxReferenceNames {
		return badRequest("workload %s: %d reference names; at most %d", spec.ID, len(spec.References), maxReferenceNames)
	}
	for name, vals := range spec.References {
		if err := checkName(name); err != nil {
			return badRequest("workload %s: reference name %q: %v", spec.ID, truncate(name, 32), err)
		}
		if len(vals) == 0 {
			return badRequest("workload %s: reference %s lists no accepted value (drop it, or list at least one)", spec.ID, name)
		}
		if len(vals) > maxReferenceValues {
			return badRequest("workload %s: reference %s lists %d values; at most %d", spec.ID, name, len(vals), maxReferenceValues)
		}
		for _, v := range vals {
			if v == "" || len(v) > maxReferenceValue {
				return badRequest("workload %s: reference %s has an empty or over-long value", spec.ID, name)
			}
			if err := store.CheckText("reference value", v); err != nil {
				return badRequest("workload %s: reference %s: value is not plain text (UTF-8 without NUL)", spec.ID, name)
			}
		}
	}
	if spec.Policy != "" {
		if err := CheckPolicy(spec.Policy); err != nil {
			return badRequest("workload %s: %v", spec.ID, err)
		}
	}
	if anchors := anchorReference[spec.Tee]; len(anchors) > 0 && spec.Policy == "" &&
		!slices.ContainsFunc(anchors, func(a string) bool { return len(spec.References[a]) > 0 }) {
		// Appraisal would deny every guest (check "reference"): say so
		// now rather than at the first boot.
		return badRequest("workload %s: a %s workload needs a reference value for %s (the claim that says which guest it is), or a policy of its own; without one no guest ever gets its key",
			spec.ID, spec.Tee, strings.Join(anchors, " or "))
	}
	if spec.CPUs < 0 || spec.CPUs > 4096 {
		return badRequest("workload %s: cpus %d out of range 0..4096", spec.ID, spec.CPUs)
	}
	if spec.MemoryMiB < 0 || spec.MemoryMiB > 64<<20 {
		return badRequest("workload %s: memory_mib %d out of range", spec.ID, spec.MemoryMiB)
	}
	return nil
}

func workloadInfo(w *store.Workload) WorkloadInfo {
	return WorkloadInfo{
		ID: w.ID, Tee: w.Tee, References: w.References, Policy: w.Policy,
		CPUs: w.CPUs, MemoryMiB: w.MemoryMiB, Created: w.Created.UTC(),
	}
}

// workloadFromSpec builds the store record, sealing the passphrase.
func (s *Server) workloadFromSpec(spec *WorkloadSpec) (store.Workload, error) {
	w := store.Workload{
		ID: spec.ID, Tee: spec.Tee, References: spec.References, Policy: spec.Policy,
		CPUs: spec.CPUs, MemoryMiB: spec.MemoryMiB,
		// Microseconds: what SQLite and PostgreSQL keep, so the answer
		// equals what a later read gives.
		Created: s.now().UTC().Truncate(time.Microsecond),
	}
	if spec.Passphrase != "" {
		sealed, err := s.sealAtRest(passphraseAAD(spec.ID), []byte(spec.Passphrase))
		if err != nil {
			return w, err
		}
		w.SealedPassphrase = sealed
	}
	return w, nil
}

// addWorkload stores a new workload; shared by the admin API and krun's
// registration.
func (s *Server) addWorkload(r *http.Request, spec *WorkloadSpec, via string) (WorkloadInfo, error) {
	if err := checkSpec(spec, true); err != nil {
		return WorkloadInfo{}, err
	}
	w, err := s.workloadFromSpec(spec)
	if err != nil {
		return WorkloadInfo{}, err
	}
	defer s.forgetWorkloads()
	if err := s.store.AddWorkload(r.Context(), w); err != nil {
		if errors.Is(err, store.ErrExists) {
			return WorkloadInfo{}, errorf(http.StatusConflict, "workload %s already exists; replace it with PUT /kbs/v0/admin/workloads/%s", spec.ID, spec.ID)
		}
		return WorkloadInfo{}, storeErr("add workload", err)
	}
	s.logWorkload(r, "workload registered", &w, via)
	return workloadInfo(&w), nil
}

func (s *Server) logWorkload(r *http.Request, msg string, w *store.Workload, via string) {
	attrs := []slog.Attr{slog.String("workload", w.ID), slog.String("tee", w.Tee), slog.String("via", via),
		slog.Int("references", len(w.References)), slog.Bool("policy", w.Policy != ""), slog.String("remote", r.RemoteAddr)}
	lvl := slog.LevelInfo
	if w.Tee == attest.TeeSample {
		lvl = slog.LevelWarn
		attrs = append(attrs, slog.Bool("insecure", true))
	}
	if _, ok := s.verifiers[w.Tee]; !ok {
		lvl = slog.LevelWarn
		attrs = append(attrs, slog.String("note", "this broker has no verifier for the workload's tee"))
	}
	s.log.LogAttrs(r.Context(), lvl, msg, attrs...)
}

func (s *Server) handleWorkloads(w http.ResponseWriter, r *http.Request, _ []string) error {
	if r.Method == http.MethodGet {
		wls, err := s.store.Workloads(r.Context())
		if err != nil {
			return storeErr("list workloads", err)
		}
		out := make([]WorkloadInfo, 0, len(wls))
		for i := range wls {
			out = append(out, workloadInfo(&wls[i]))
		}
		writeJSON(w, http.StatusOK, out)
		return nil
	}
	body, err := readBody(w, r, maxAdminBody, "workload spec")
	if err != nil {
		return err
	}
	var spec WorkloadSpec
	if err := decodeJSON(body, &spec, true, "workload spec"); err != nil {
		return err
	}
	info, err := s.addWorkload(r, &spec, "admin")
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, info)
	return nil
}

func (s *Server) handleWorkload(w http.ResponseWriter, r *http.Request, p []string) error {
	ctx := r.Context()
	id := p[0]
	if err := checkWorkloadID(id); err != nil {
		return err
	}
	switch r.Method {
	case http.MethodGet:
		wl, err := s.store.Workload(ctx, id)
		if errors.Is(err, store.ErrNotFound) {
			return errorf(http.StatusNotFound, "no workload %s registered", id)
		}
		if err != nil {
			return storeErr("read workload", err)
		}
		writeJSON(w, http.StatusOK, workloadInfo(&wl))
		return nil
	case http.MethodDelete:
		err := s.store.DeleteWorkload(ctx, id)
		s.forgetWorkloads()
		if errors.Is(err, store.ErrNotFound) {
			return errorf(http.StatusNotFound, "no workload %s registered", id)
		}
		if err != nil {
			return storeErr("delete workload", err)
		}
		s.log.LogAttrs(ctx, slog.LevelInfo, "workload deleted", slog.String("workload", id), slog.String("remote", r.RemoteAddr))
		w.WriteHeader(http.StatusNoContent)
		return nil
	}
	// PUT: replace, keeping Created, and the passphrase when none is given.
	body, err := readBody(w, r, maxAdminBody, "workload spec")
	if err != nil {
		return err
	}
	var spec WorkloadSpec
	if err := decodeJSON(body, &spec, true, "workload spec"); err != nil {
		return err
	}
	if spec.ID == "" {
		spec.ID = id
	}
	if spec.ID != id {
		return badRequest("spec id %q differs from the path's workload %s", truncate(spec.ID, 32), id)
	}
	if err := checkSpec(&spec, false); err != nil {
		return err
	}
	old, err := s.store.Workload(ctx, id)
	if errors.Is(err, store.ErrNotFound) {
		return errorf(http.StatusNotFound, "no workload %s registered; create it with POST /kbs/v0/admin/workloads", id)
	}
	if err != nil {
		return storeErr("read workload", err)
	}
	nw, err := s.workloadFromSpec(&spec)
	if err != nil {
		return err
	}
	nw.Created = old.Created
	if spec.Passphrase == "" {
		// Kept, but under the current key: a replace racing a reseal
		// must not bring back a blob that only an earlier key opens.
		if nw.SealedPassphrase, err = s.currentSeal(passphraseAAD(id), old.SealedPassphrase); err != nil {
			return err
		}
	}
	err = s.store.UpdateWorkload(ctx, nw)
	s.forgetWorkloads()
	if err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return errorf(http.StatusNotFound, "workload %s was deleted meanwhile", id)
		}
		return storeErr("update workload", err)
	}
	s.logWorkload(r, "workload replaced", &nw, "admin")
	writeJSON(w, http.StatusOK, workloadInfo(&nw))
	return nil
}

// handleSetResource is Trustee's admin call POST /kbs/v0/resource/...
func (s *Server) handleSetResource(w http.ResponseWriter, r *http.Request, p []string) error {
	if err := checkResourcePath(p); err != nil {
		return err
	}
	if p[0] == passphraseRepo && p[2] == passphraseTag {
		return errorf(http.StatusConflict, "%s/<id>/%s is where workload passphrases are released; set a passphrase with the workload (PUT /kbs/v0/admin/workloads/%s)", passphraseRepo, passphraseTag, p[1])
	}
	body, err := readBody(w, r, maxResourceBody, "resource")
	if err != nil {
		return err
	}
	defer clear(body)
	rp := strings.Join(p, "/")
	sealed, err := s.sealAtRest(resourceAAD(rp), body)
	if err != nil {
		return err
	}
	if err := s.store.SetResource(r.Context(), rp, sealed); err != nil {
		return storeErr("set resource", err)
	}
	s.log.LogAttrs(r.Context(), slog.LevelInfo, "resource set", slog.String("resource", rp),
		slog.Int("bytes", len(body)), slog.String("remote", r.RemoteAddr))
	writeJSON(w, http.StatusOK, map[string]string{"resource": rp})
	return nil
}

// handleAdminResources lists the stored resources' paths (never their
// contents).
func (s *Server) handleAdminResources(w http.ResponseWriter, r *http.Request, _ []string) error {
	paths, err := s.store.ResourcePaths(r.Context())
	if err != nil {
		return storeErr("list resources", err)
	}
	writeJSON(w, http.StatusOK, paths)
	return nil
}

func (s *Server) handleAdminResource(w http.ResponseWriter, r *http.Request, p []string) error {
	if err := checkResourcePath(p); err != nil {
		return err
	}
	rp := strings.Join(p, "/")
	ctx := r.Context()
	if r.Method == http.MethodDelete {
		err := s.store.DeleteResource(ctx, rp)
		if errors.Is(err, store.ErrNotFound) {
			return errorf(http.StatusNotFound, "no resource %s", rp)
		}
		if err != nil {
			return storeErr("delete resource", err)
		}
		s.log.LogAttrs(ctx, slog.LevelInfo, "resource deleted", slog.String("resource", rp), slog.String("remote", r.RemoteAddr))
		w.WriteHeader(http.StatusNoContent)
		return nil
	}
	sealed, err := s.store.Resource(ctx, rp)
	if errors.Is(err, store.ErrNotFound) {
		return errorf(http.StatusNotFound, "no resource %s", rp)
	}
	if err != nil {
		return storeErr("read resource", err)
	}
	pt, err := s.openAtRest(resourceAAD(rp), sealed)
	if err != nil {
		return err
	}
	defer clear(pt)
	h := w.Header()
	h.Set("Content-Type", "application/octet-stream")
	h.Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(pt)
	return nil
}

// policyBody is Trustee's resource-policy shape: Rego, base64url.
type policyBody struct {
	Policy string `json:"policy"`
}

func (s *Server) handleResourcePolicy(w http.ResponseWriter, r *http.Request, _ []string) error {
	ctx := r.Context()
	if r.Method == http.MethodGet {
		pol, err := s.resourcePolicy(ctx)
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, policyBody{Policy: base64.RawURLEncoding.EncodeToString([]byte(pol))})
		return nil
	}
	body, err := readBody(w, r, maxAdminBody, "resource policy")
	if err != nil {
		return err
	}
	var pb policyBody
	if err := decodeJSON(body, &pb, false, "resource policy"); err != nil {
		return err
	}
	text, err := decodeB64URL(pb.Policy)
	if err != nil {
		return badRequest("resource policy: %v", err)
	}
	if text != "" {
		if err := CheckPolicy(text); err != nil {
			return badRequest("resource policy: %v", err)
		}
	}
	stored := text
	if stored == "" {
		stored = clearedPolicy
	}
	err = s.store.SetPolicy(ctx, PolicyName, stored)
	s.forgetPolicy()
	if err != nil {
		return storeErr("set policy", err)
	}
	s.log.LogAttrs(ctx, slog.LevelInfo, "resource policy set", slog.Int("bytes", len(text)), slog.Bool("cleared", text == ""),
		slog.String("remote", r.RemoteAddr))
	writeJSON(w, http.StatusOK, map[string]string{"policy": "set"})
	return nil
}

// decodeB64URL takes base64url with or without padding (Trustee's
// clients send it unpadded; tools often pad).
func decodeB64URL(s string) (string, error) {
	b, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(s, "="))
	if err != nil {
		return "", fmt.Errorf("policy is not base64url: %v", err)
	}
	return string(b), nil
}
