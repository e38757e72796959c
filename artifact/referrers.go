package artifact

// Referrers and pushes go through oras-go, not c/image: c/image (v5.41)
// has no referrers API, and pushing a manifest with a `subject` to a
// registry without that API means maintaining the `sha256-<hex>` tag
// index (fetch, merge, push) as the distribution spec describes; oras-go
// implements exactly that and is already in go.mod. What c/image gives
// for free is kept: credentials come from the same auth.json lookup
// (pkg/docker/config), TLS from registries.conf's `insecure`, certs.d and
// --tls-verify, and blocked registries stay blocked. Referrers are
// looked up where registries.conf says to pull from: its mirrors first,
// in order, then the registry (an edge box often reaches only a
// mirror). The spec scopes referrers to one repository of one registry,
// so each source is asked on its own, and the first that lists a
// referrer of the wanted type answers.

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"path/filepath"
	"sort"
	"strings"
	"time"

	digest "github.com/opencontainers/go-digest"
	imgspecv1 "github.com/opencontainers/image-spec/specs-go/v1"
	"go.podman.io/image/v5/docker"
	"go.podman.io/image/v5/docker/reference"
	"go.podman.io/image/v5/manifest"
	"go.podman.io/image/v5/pkg/docker/config"
	"go.podman.io/image/v5/pkg/sysregistriesv2"
	"go.podman.io/image/v5/pkg/tlsclientconfig"
	"go.podman.io/image/v5/types"
	"oras.land/oras-go/v2/content"
	"oras.land/oras-go/v2/registry"
	"oras.land/oras-go/v2/registry/remote"
	"oras.land/oras-go/v2/registry/remote/auth"
)

// parseRegistryRef reads a registry image reference: docker://host/repo:tag
// or host/repo[:tag|@digest]; other transports are refused with why.
func parseRegistryRef(what, s string) (reference.Named, error) {
	s = strings.TrimPrefix(s, "docker://")
	if t, _, ok := strings.Cut(s, ":"); ok && !strings.ContainsAny(t, "/.") {
		if _, err := reference.ParseNormalizedNamed(s); err != nil {
			return nil, fmt.Errorf("%s %q: only registry images (docker://host/repo:tag) have referrers", what, s)
		}
	}
	n, err := reference.ParseNormalizedNamed(s)
	if err != nil {
		return nil, fmt.Errorf("%s %q: %w", what, s, err)
	}
	return n, nil
}

// registryHost is where a domain's registry API lives.
func registryHost(domain string) string {
	if domain == "docker.io" {
		return "registry-1.docker.io"
	}
	return domain
}

// source is one place to reach a repository at: the registry itself,
// or one of its mirrors in registries.conf.
type source struct {
	ref      reference.Named // the repository there
	insecure bool            // registries.conf's insecure for it
	mirror   bool
}

// pushSource is where a push of n goes: the registry n names, never a
// mirror.
func pushSource(sys *types.SystemContext, n reference.Named) (source, error) {
	reg, err := findRegistry(sys, n)
	if err != nil || reg == nil {
		return source{ref: n}, err
	}
	return source{ref: n, insecure: reg.Insecure}, nil
}

// pullSources lists where registries.conf sends a pull of n (a
// reference by digest, so that digest-only mirrors count): its mirrors
// in order, then the registry.
func pullSources(sys *types.SystemContext, n reference.Named) ([]source, error) {
	reg, err := findRegistry(sys, n)
	if err != nil || reg == nil {
		return []source{{ref: n}}, err
	}
	ps, err := reg.PullSourcesFromReference(n)
	if err != nil {
		return nil, fmt.Errorf("registries.conf's sources for %s: %w", n, err)
	}
	out := make([]source, 0, len(ps))
	for _, p := range ps {
		out = append(out, source{ref: p.Reference, insecure: p.Endpoint.Insecure, mirror: p.Endpoint.Location != reg.Location})
	}
	return out, nil
}

// findRegistry is n's entry in registries.conf (nil: none), refused
// when blocked.
func findRegistry(sys *types.SystemContext, n reference.Named) (*sysregistriesv2.Registry, error) {
	reg, err := sysregistriesv2.FindRegistry(sys, n.Name())
	if err != nil {
		return nil, fmt.Errorf("reading registries.conf: %w", err)
	}
	if reg != nil && reg.Blocked {
		return nil, fmt.Errorf("registry %s is blocked in registries.conf", reference.Domain(n))
	}
	return reg, nil
}

// newRepository makes an oras client for src's repository with
// c/image's credentials and TLS settings.
func newRepository(ctx context.Context, sys *types.SystemContext, src source) (*remote.Repository, error) {
	n := src.ref
	domain := reference.Domain(n)
	host := registryHost(domain)
	skipVerify := sys.DockerInsecureSkipTLSVerify == types.OptionalBoolTrue || src.insecure
	tlsc := &tls.Config{InsecureSkipVerify: skipVerify} //nolint:gosec // only with --tls-verify=false or registries.conf's insecure
	for _, dir := range certDirs(sys, domain) {
		if err := tlsclientconfig.SetupCertificates(dir, tlsc); err != nil {
			return nil, fmt.Errorf("certificates for %s in %s: %w", domain, dir, err)
		}
	}
	tr := tlsclientconfig.NewTransport()
	tr.TLSClientConfig = tlsc
	hc := &http.Client{Transport: tr}
	client := &auth.Client{
		Client: hc,
		Cache:  auth.NewCache(),
		Credential: func(ctx context.Context, hostport string) (auth.Credential, error) {
			c, err := config.GetCredentialsForRef(sys, n)
			if err != nil {
				return auth.EmptyCredential, fmt.Errorf("credentials for %s from auth.json: %w", n.Name(), err)
			}
			return auth.Credential{Username: c.Username, Password: c.Password, RefreshToken: c.IdentityToken}, nil
		},
	}
	client.SetUserAgent("cwrun")
	repo := &remote.Repository{
		Client:    client,
		Reference: registry.Reference{Registry: host, Repository: reference.Path(n)},
		// Deleting the superseded referrers index needs delete rights
		// that distribution does not grant by default; a stale index is
		// harmless (the tag points at the new one).
		SkipReferrersGC: true,
	}
	if skipVerify {
		// As c/image does with TLS verification off: HTTPS when the
		// registry speaks it, plain HTTP otherwise.
		plain, err := speaksPlainHTTP(ctx, hc, host)
		if err != nil {
			return nil, err
		}
		repo.PlainHTTP = plain
	}
	return repo, nil
}

// certDirs lists the certs.d folders c/image reads for a registry.
func certDirs(sys *types.SystemContext, domain string) []string {
	if sys.DockerCertPath != "" {
		return []string{sys.DockerCertPath}
	}
	if sys.DockerPerHostCertDirPath != "" {
		return []string{filepath.Join(sys.DockerPerHostCertDirPath, domain)}
	}
	return []string{
		filepath.Join("/etc/containers/certs.d", domain),
		filepath.Join("/etc/docker/certs.d", domain),
	}
}

// speaksPlainHTTP pings the registry over HTTPS, then over HTTP.
func speaksPlainHTTP(ctx context.Context, hc *http.Client, host string) (bool, error) {
	ping := func(scheme string) error {
		ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, scheme+"://"+host+"/v2/", nil)
		if err != nil {
			return err
		}
		resp, err := hc.Do(req)
		if err != nil {
			return err
		}
		resp.Body.Close()
		return nil
	}
	errS := ping("https")
	if errS == nil {
		return false, nil
	}
	errP := ping("http")
	if errP == nil {
		return true, nil
	}
	return false, fmt.Errorf("%w: %s: over HTTPS: %v; over HTTP: %v", ErrUnreachable, host, errS, errP)
}

// referrersAPI asks the registry whether it serves the referrers API
// for subject (GET /v2/<name>/referrers/<digest>): an image index
// answer means yes, 404 means no (the fallback tag schema applies).
func referrersAPI(ctx context.Context, repo *remote.Repository, subject digest.Digest) (bool, error) {
	scheme := "https"
	if repo.PlainHTTP {
		scheme = "http"
	}
	ref := repo.Reference
	ref.Reference = subject.String()
	ctx = auth.AppendRepositoryScope(ctx, ref, auth.ActionPull)
	url := fmt.Sprintf("%s://%s/v2/%s/referrers/%s", scheme, ref.Host(), ref.Repository, subject)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return false, err
	}
	resp, err := repo.Client.Do(req)
	if err != nil {
		return false, fmt.Errorf("%w: %s: %v", ErrUnreachable, ref.Registry, err)
	}
	resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusOK && strings.HasPrefix(resp.Header.Get("Content-Type"), imgspecv1.MediaTypeImageIndex):
		return true, nil
	case resp.StatusCode == http.StatusOK, resp.StatusCode == http.StatusNotFound, resp.StatusCode == http.StatusMethodNotAllowed:
		return false, nil
	case resp.StatusCode == http.StatusUnauthorized, resp.StatusCode == http.StatusForbidden:
		return false, fmt.Errorf("registry %s refuses access to %s (%s): log in (podman login) or check --authfile", ref.Registry, ref.Repository, resp.Status)
	}
	return false, fmt.Errorf("registry %s: referrers of %s: %s", ref.Registry, subject, resp.Status)
}

// subjectOf reads an image's manifest descriptors: the one its reference
// names, and, for an index, the entry for this platform (the one a seal
// of it used, and the more specific subject).
func subjectOf(ctx context.Context, sys *types.SystemContext, n reference.Named) (top imgspecv1.Descriptor, inst *imgspecv1.Descriptor, err error) {
	ref, err := docker.NewReference(reference.TagNameOnly(n))
	if err != nil {
		return top, nil, fmt.Errorf("image %s: %w", n, err)
	}
	src, err := ref.NewImageSource(ctx, sys)
	if err != nil {
		return top, nil, openError(ctx, ref, err)
	}
	defer src.Close()
	raw, mime, err := src.GetManifest(ctx, nil)
	if err != nil {
		return top, nil, openError(ctx, ref, err)
	}
	d, err := manifest.Digest(raw)
	if err != nil {
		return top, nil, err
	}
	top = imgspecv1.Descriptor{MediaType: mime, Digest: d, Size: int64(len(raw))}
	if !manifest.MIMETypeIsMultiImage(mime) {
		return top, nil, nil
	}
	list, err := manifest.ListFromBlob(raw, mime)
	if err != nil {
		return top, nil, fmt.Errorf("image %s: parsing its index: %w", n, err)
	}
	id, err := list.ChooseInstance(sys)
	if err != nil {
		return top, nil, nil // no entry for this platform: only the index can be the subject
	}
	iraw, imime, err := src.GetManifest(ctx, &id)
	if err != nil {
		return top, nil, fmt.Errorf("image %s: reading manifest %s: %w", n, id, err)
	}
	return top, &imgspecv1.Descriptor{MediaType: imime, Digest: id, Size: int64(len(iraw))}, nil
}

// findReferrer finds the newest referrer of image with artifactType and
// returns a reference to it by digest, in image's repository (a pull of
// it goes through the same mirrors).
func (p *puller) findReferrer(ctx context.Context, image, artifactType string) (types.ImageReference, error) {
	n, err := parseRegistryRef("--referrer-of", image)
	if err != nil {
		return nil, err
	}
	top, inst, err := subjectOf(ctx, p.sys, n)
	if err != nil {
		return nil, err
	}
	byDigest, err := reference.WithDigest(reference.TrimNamed(n), top.Digest)
	if err != nil {
		return nil, err
	}
	sources, err := pullSources(p.sys, byDigest)
	if err != nil {
		return nil, err
	}
	subjects := []imgspecv1.Descriptor{top}
	if inst != nil {
		subjects = []imgspecv1.Descriptor{*inst, top}
	}
	var errs []error
	for _, src := range sources {
		r, err := p.referrerAt(ctx, src, n, subjects, artifactType)
		if err == nil {
			named, err := reference.WithDigest(reference.TrimNamed(n), r)
			if err != nil {
				return nil, err
			}
			return docker.NewReference(named)
		}
		if len(sources) == 1 {
			return nil, err
		}
		where := "registry"
		if src.mirror {
			where = "mirror"
		}
		p.log.Info("no referrer at this source", "image", n.String(), where, reference.Domain(src.ref), "error", err)
		errs = append(errs, fmt.Errorf("%s %s: %w", where, reference.Domain(src.ref), err))
	}
	return nil, fmt.Errorf("referrers of %s, looked up at its %d sources in registries.conf (mirrors first): %w", n, len(sources), errors.Join(errs...))
}

// referrerAt looks for the newest referrer with artifactType of the
// first of subjects that has one, in src's repository.
func (p *puller) referrerAt(ctx context.Context, src source, n reference.Named, subjects []imgspecv1.Descriptor, artifactType string) (digest.Digest, error) {
	top := subjects[len(subjects)-1]
	repo, err := newRepository(ctx, p.sys, src)
	if err != nil {
		return "", err
	}
	api, err := referrersAPI(ctx, repo, top.Digest)
	if err != nil {
		return "", err
	}
	repo.SetReferrersCapability(api)
	how := "the referrers API"
	if !api {
		how = "the sha256-<hex> tag schema (the registry has no referrers API)"
	}
	for _, s := range subjects {
		found, err := referrersOf(ctx, repo, s, artifactType)
		if err != nil {
			return "", fmt.Errorf("listing referrers of %s (%s) through %s: %w", src.ref, s.Digest, how, err)
		}
		if len(found) == 0 {
			continue
		}
		r := newest(found)
		p.log.Info("found referrer", "image", n.String(), "at", src.ref.Name(), "subject", s.Digest, "artifact", r.Digest, "of", len(found), "via", how)
		return r.Digest, nil
	}
	// Say what there is instead.
	var others []string
	for _, s := range subjects {
		rs, _ := referrersOf(ctx, repo, s, "")
		for _, r := range rs {
			others = append(others, fmt.Sprintf("%s (artifactType %q)", r.Digest, r.ArtifactType))
		}
	}
	have := "it has no referrers at all"
	if len(others) > 0 {
		have = "it has:\n  " + strings.Join(others, "\n  ")
	}
	return "", fmt.Errorf("%s (%s): %w with artifactType %q, looked up through %s; %s", src.ref.Name(), top.Digest, ErrNoReferrer, artifactType, how, have)
}

// maxReferrerFetches bounds the manifests read to complete referrer
// descriptors.
const maxReferrerFetches = 64

// referrersOf lists subject's referrers of artifactType, each with the
// artifactType and annotations of its manifest. The spec has registries
// copy both into the descriptors they list, but some do not (the
// go-containerregistry registry gives the config's media type and no
// annotations): a descriptor without annotations is completed from its
// manifest, so that the type filter and "newest" are right everywhere.
func referrersOf(ctx context.Context, repo *remote.Repository, subject imgspecv1.Descriptor, artifactType string) ([]imgspecv1.Descriptor, error) {
	var all []imgspecv1.Descriptor
	if err := repo.Referrers(ctx, subject, "", func(rs []imgspecv1.Descriptor) error {
		all = append(all, rs...)
		return nil
	}); err != nil {
		return nil, err
	}
	var out []imgspecv1.Descriptor
	fetched := 0
	for _, d := range all {
		if len(d.Annotations) == 0 && fetched < maxReferrerFetches {
			fetched++
			b, err := content.FetchAll(ctx, repo, d)
			if err != nil {
				return nil, fmt.Errorf("reading referrer %s: %w", d.Digest, err)
			}
			var m struct {
				ArtifactType string               `json:"artifactType"`
				Config       imgspecv1.Descriptor `json:"config"`
				Annotations  map[string]string    `json:"annotations"`
			}
			if err := json.Unmarshal(b, &m); err != nil {
				return nil, fmt.Errorf("referrer %s: %w", d.Digest, err)
			}
			d.ArtifactType, d.Annotations = m.ArtifactType, m.Annotations
			if d.ArtifactType == "" {
				d.ArtifactType = m.Config.MediaType
			}
		}
		if artifactType == "" || d.ArtifactType == artifactType {
			out = append(out, d)
		}
	}
	return out, nil
}

// newest picks the referrer created last (annotation
// org.opencontainers.image.created, RFC 3339); without dates, the last listed.
func newest(rs []imgspecv1.Descriptor) imgspecv1.Descriptor {
	idx := make([]int, len(rs))
	for i := range idx {
		idx[i] = i
	}
	created := func(i int) time.Time {
		t, _ := time.Parse(time.RFC3339Nano, rs[i].Annotations[AnnotationCreated])
		return t
	}
	sort.SliceStable(idx, func(a, b int) bool { return created(idx[a]).Before(created(idx[b])) })
	return rs[idx[len(idx)-1]]
}
