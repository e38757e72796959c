package artifact

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strings"

	digest "github.com/opencontainers/go-digest"
	imgspecv1 "github.com/opencontainers/image-spec/specs-go/v1"
	"go.podman.io/image/v5/docker/reference"
	"go.podman.io/image/v5/image"
	"go.podman.io/image/v5/manifest"
	"go.podman.io/image/v5/pkg/shortnames"
	"go.podman.io/image/v5/signature"
	"go.podman.io/image/v5/transports"
	"go.podman.io/image/v5/transports/alltransports"
	"go.podman.io/image/v5/types"
)

// puller holds one Pull's settings.
type puller struct {
	opts     PullOptions
	sys      *types.SystemContext
	cache    string
	log      *slog.Logger
	progress *progress
}

func newPuller(opts PullOptions) (*puller, error) {
	sys := systemContext(opts.System, opts.TLSVerify, opts.AuthFile, opts.PolicyFile)
	cache := opts.CacheDir
	if cache == "" {
		var err error
		if cache, err = DefaultCacheDir(); err != nil {
			return nil, err
		}
	}
	if opts.DiskType == "" {
		opts.DiskType = "qemu"
	}
	if opts.ReferrerOf != "" && opts.ArtifactType == "" {
		opts.ArtifactType = ArtifactTypeSealedDisk
	}
	log := opts.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &puller{opts: opts, sys: sys, cache: cache, log: log, progress: newProgress(opts.Progress)}, nil
}

// systemContext copies sys (nil: defaults) with the overrides applied.
func systemContext(base *types.SystemContext, tlsVerify *bool, authFile, policyFile string) *types.SystemContext {
	sys := &types.SystemContext{}
	if base != nil {
		c := *base
		sys = &c
	}
	if tlsVerify != nil {
		sys.DockerInsecureSkipTLSVerify = types.NewOptionalBool(!*tlsVerify)
		sys.OCIInsecureSkipTLSVerify = !*tlsVerify
	}
	if authFile != "" {
		sys.AuthFilePath = authFile
	}
	if policyFile != "" {
		sys.SignaturePolicyPath = policyFile
	}
	return sys
}

// DefaultCacheDir is where disks are cached when PullOptions.CacheDir is
// empty: $XDG_CACHE_HOME/cwrun/disks, else ~/.cache/cwrun/disks.
func DefaultCacheDir() (string, error) {
	if x := os.Getenv("XDG_CACHE_HOME"); x != "" {
		return filepath.Join(x, "cwrun", "disks"), nil
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "", fmt.Errorf("no cache folder for disks: %w; set XDG_CACHE_HOME or pass a cache folder", err)
	}
	return filepath.Join(home, ".cache", "cwrun", "disks"), nil
}

func (p *puller) pull(ctx context.Context, ref string) (*Disk, error) {
	if p.opts.ReferrerOf != "" {
		if ref != "" {
			return nil, fmt.Errorf("both a reference (%s) and --referrer-of (%s) given: give one, the referrer is found from the image", ref, p.opts.ReferrerOf)
		}
		r, err := p.findReferrer(ctx, p.opts.ReferrerOf, p.opts.ArtifactType)
		if err != nil {
			return nil, err
		}
		d, _, err := p.pullRef(ctx, r)
		return d, err
	}
	if ref == "" {
		return nil, errors.New("no disk reference given: name an image or artifact, or use --referrer-of IMAGE")
	}
	cands, err := p.candidates(ref)
	if err != nil {
		return nil, err
	}
	var errs []error
	for _, c := range cands {
		d, opened, err := p.pullRef(ctx, c)
		if err == nil {
			return d, nil
		}
		// Only a reference that does not open sends us to the next
		// candidate; a bad download is an answer.
		if opened || len(cands) == 1 || ctx.Err() != nil {
			return nil, err
		}
		errs = append(errs, err)
	}
	return nil, fmt.Errorf("pulling %s: no candidate worked:\n  %w", ref, errors.Join(errs...))
}

// candidates reads ref: transport:details as is; a bare name as a
// registry image, short names resolved through registries.conf.
func (p *puller) candidates(ref string) ([]types.ImageReference, error) {
	if t, _, ok := strings.Cut(ref, ":"); ok && transports.Get(t) != nil {
		r, err := alltransports.ParseImageName(ref)
		if err != nil {
			return nil, fmt.Errorf("disk reference %q: %w", ref, err)
		}
		return []types.ImageReference{r}, nil
	}
	res, err := shortnames.Resolve(p.sys, ref)
	if err != nil {
		return nil, fmt.Errorf("disk reference %q: %w", ref, err)
	}
	var out []types.ImageReference
	for _, c := range res.PullCandidates {
		r, err := alltransports.ParseImageName("docker://" + c.Value.String())
		if err != nil {
			return nil, fmt.Errorf("disk reference %q: %w", ref, err)
		}
		out = append(out, r)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("disk reference %q: registries.conf gives no registry to pull it from; use a full name (host/repo:tag)", ref)
	}
	return out, nil
}

// pullRef opens one reference and pulls its disk. opened says whether
// the reference itself was found.
func (p *puller) pullRef(ctx context.Context, ref types.ImageReference) (*Disk, bool, error) {
	name := transports.ImageName(ref)
	src, err := ref.NewImageSource(ctx, p.sys)
	if err != nil {
		return nil, false, openError(ctx, ref, err)
	}
	defer src.Close()
	raw, mime, err := src.GetManifest(ctx, nil)
	if err != nil {
		return nil, false, openError(ctx, ref, err)
	}
	if err := p.allowed(ctx, src); err != nil {
		return nil, true, err
	}
	if d := digestOfRef(ref); d != "" {
		if ok, err := manifest.MatchesDigest(raw, d); err != nil || !ok {
			return nil, true, fmt.Errorf("%s: the manifest the registry sent does not match %s: %w", name, d, ErrDigestMismatch)
		}
	}
	if manifest.MIMETypeIsMultiImage(mime) {
		var idx imgspecv1.Index
		if err := json.Unmarshal(raw, &idx); err != nil {
			return nil, true, fmt.Errorf("%s: parsing its index: %w", name, err)
		}
		e, err := p.chooseEntry(name, idx)
		if err != nil {
			return nil, true, err
		}
		p.log.Info("chose index entry", "ref", name, "digest", e.Digest, "platform", platformString(e.Platform), "disktype", e.Annotations[AnnotationDiskType])
		if raw, mime, err = src.GetManifest(ctx, &e.Digest); err != nil {
			return nil, true, fmt.Errorf("%s: reading manifest %s: %w", name, e.Digest, err)
		}
		if ok, err := manifest.MatchesDigest(raw, e.Digest); err != nil || !ok {
			return nil, true, fmt.Errorf("%s: manifest %s: the registry sent other bytes: %w", name, e.Digest, ErrDigestMismatch)
		}
	}
	if mime == manifest.DockerV2Schema1MediaType || mime == manifest.DockerV2Schema1SignedMediaType {
		return nil, true, fmt.Errorf("%s: a Docker schema 1 manifest cannot hold a disk", name)
	}
	var m imgspecv1.Manifest
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, true, fmt.Errorf("%s: parsing its manifest (%s): %w", name, mime, err)
	}
	f := &fetcher{p: p, src: src, name: name}
	if isContainerDisk(m) {
		d, err := f.containerDisk(ctx, m.Layers)
		return d, true, err
	}
	l, err := diskLayer(name, m)
	if err != nil {
		return nil, true, err
	}
	d, err := f.artifactDisk(ctx, l)
	return d, true, err
}

// allowed applies policy.json to what is pulled, as podman's pull does.
func (p *puller) allowed(ctx context.Context, src types.ImageSource) error {
	policy, err := signature.DefaultPolicy(p.sys)
	if err != nil {
		return fmt.Errorf("reading policy.json: %w (podman's /etc/containers/policy.json; Debian ships it in containers-common)", err)
	}
	pc, err := signature.NewPolicyContext(policy)
	if err != nil {
		return fmt.Errorf("policy.json: %w", err)
	}
	defer pc.Destroy()
	if ok, err := pc.IsRunningImageAllowed(ctx, image.UnparsedInstance(src, nil)); !ok {
		return fmt.Errorf("policy.json refuses %s: %w", transports.ImageName(src.Reference()), err)
	}
	return nil
}

// digestOfRef is the digest a reference pins, if any.
func digestOfRef(ref types.ImageReference) digest.Digest {
	if n := ref.DockerReference(); n != nil {
		if c, ok := n.(reference.Canonical); ok {
			return c.Digest()
		}
	}
	return ""
}

// openError says which registry failed and why, for a reference that
// did not open.
func openError(ctx context.Context, ref types.ImageReference, err error) error {
	name := transports.ImageName(ref)
	if ctx.Err() != nil {
		return fmt.Errorf("pulling %s: %w (%v)", name, context.Cause(ctx), err)
	}
	n := ref.DockerReference()
	if n == nil || ref.Transport().Name() != "docker" {
		return fmt.Errorf("opening %s: %w", name, err)
	}
	host := reference.Domain(n)
	msg := err.Error()
	switch {
	case strings.Contains(msg, "authentication required"), strings.Contains(msg, "unauthorized"), strings.Contains(msg, "denied"):
		return fmt.Errorf("reading %s from registry %s: %w (log in with podman login %s, or give the credentials file with --authfile)", name, host, err, host)
	case strings.Contains(msg, "server gave HTTP response to HTTPS client"):
		return fmt.Errorf("%w: %s speaks plain HTTP, and TLS verification is on: pass --tls-verify=false for a registry without TLS (%v)", ErrUnreachable, host, err)
	case strings.Contains(msg, "connection refused"), strings.Contains(msg, "no such host"),
		strings.Contains(msg, "i/o timeout"), strings.Contains(msg, "network is unreachable"),
		strings.Contains(msg, "connection reset"), strings.Contains(msg, "certificate"),
		strings.Contains(msg, "pinging container registry"), strings.Contains(msg, "TLS handshake"):
		return fmt.Errorf("%w: %s, for %s: %v (check the address, the network and, for a plain-HTTP registry, --tls-verify=false)", ErrUnreachable, host, name, err)
	}
	return fmt.Errorf("reading %s from registry %s: %w", name, host, err)
}

// wantPlatform is the platform whose disks this host boots.
func (p *puller) wantPlatform() imgspecv1.Platform {
	pl := imgspecv1.Platform{OS: runtime.GOOS, Architecture: runtime.GOARCH}
	if p.sys.OSChoice != "" {
		pl.OS = p.sys.OSChoice
	}
	if p.sys.ArchitectureChoice != "" {
		pl.Architecture = p.sys.ArchitectureChoice
	}
	pl.Variant = p.sys.VariantChoice
	return pl
}

// chooseEntry picks the index entry for this platform and, when the
// index's entries carry "disktype" annotations (podman machine's
// images), for the wanted disk type. With none, the error lists what
// the index holds.
func (p *puller) chooseEntry(name string, idx imgspecv1.Index) (imgspecv1.Descriptor, error) {
	want := p.wantPlatform()
	typed := false
	for _, e := range idx.Manifests {
		if _, ok := e.Annotations[AnnotationDiskType]; ok {
			typed = true
		}
	}
	var match []imgspecv1.Descriptor
	for _, e := range idx.Manifests {
		if !platformMatches(want, e.Platform) {
			continue
		}
		if typed && e.Annotations[AnnotationDiskType] != p.opts.DiskType {
			continue
		}
		match = append(match, e)
	}
	if len(match) == 0 {
		var have []string
		for _, e := range idx.Manifests {
			s := platformString(e.Platform)
			if dt, ok := e.Annotations[AnnotationDiskType]; ok {
				s += " disktype=" + dt
			}
			have = append(have, s+" "+e.Digest.String())
		}
		what := platformString(&want)
		if typed {
			what += " disktype=" + p.opts.DiskType
		}
		if len(have) == 0 {
			have = []string{"(nothing)"}
		}
		return imgspecv1.Descriptor{}, fmt.Errorf("%s: the index has no entry for %s: %w; it has:\n  %s", name, what, ErrNoMatch, strings.Join(have, "\n  "))
	}
	if len(match) > 1 {
		p.log.Warn("several index entries match; taking the first", "ref", name, "count", len(match))
	}
	return match[0], nil
}

func normArch(a string) string {
	switch a {
	case "x86_64", "x86-64":
		return "amd64"
	case "aarch64":
		return "arm64"
	}
	return a
}

// platformMatches: an entry without a platform matches any.
func platformMatches(want imgspecv1.Platform, have *imgspecv1.Platform) bool {
	if have == nil {
		return true
	}
	if have.OS != want.OS || normArch(have.Architecture) != normArch(want.Architecture) {
		return false
	}
	return want.Variant == "" || have.Variant == "" || want.Variant == have.Variant
}

func platformString(p *imgspecv1.Platform) string {
	if p == nil {
		return "any platform"
	}
	s := p.OS + "/" + p.Architecture
	if p.Variant != "" {
		s += "/" + p.Variant
	}
	return s
}

// isTarLayer: a layer of a container image (a tar stream), not a disk.
func isTarLayer(mt string) bool {
	return strings.Contains(mt, "image.layer.") || strings.Contains(mt, "image.rootfs.")
}

// isContainerDisk: an ordinary container image (tar layers, image
// config) that carries a disk file inside (KubeVirt's containerdisks).
func isContainerDisk(m imgspecv1.Manifest) bool {
	if m.ArtifactType != "" || len(m.Layers) == 0 {
		return false
	}
	if cm := m.Config.MediaType; cm != imgspecv1.MediaTypeImageConfig && cm != manifest.DockerV2Schema2ConfigMediaType {
		return false
	}
	for _, l := range m.Layers {
		if !isTarLayer(l.MediaType) {
			return false
		}
	}
	return true
}

// diskLayer picks an artifact's disk layer: its only layer, or the one
// layer whose name or media type says disk.
func diskLayer(name string, m imgspecv1.Manifest) (imgspecv1.Descriptor, error) {
	switch len(m.Layers) {
	case 0:
		return imgspecv1.Descriptor{}, fmt.Errorf("%s: the manifest has no layers: %w", name, ErrNoDisk)
	case 1:
		return m.Layers[0], nil
	}
	var disks []imgspecv1.Descriptor
	var all []string
	for _, l := range m.Layers {
		title := l.Annotations[AnnotationTitle]
		all = append(all, fmt.Sprintf("%s %q %s", l.MediaType, title, l.Digest))
		if isTarLayer(l.MediaType) {
			continue
		}
		if looksLikeDisk(title) || strings.Contains(l.MediaType, "disk") || strings.Contains(l.MediaType, "qcow2") {
			disks = append(disks, l)
		}
	}
	if len(disks) == 1 {
		return disks[0], nil
	}
	what := "no layer"
	if len(disks) > 1 {
		what = "several layers"
	}
	return imgspecv1.Descriptor{}, fmt.Errorf("%s: %s look like a disk (by title .qcow2/.raw/.img, or media type): %w; layers:\n  %s",
		name, what, ErrNoDisk, strings.Join(all, "\n  "))
}

// looksLikeDisk: a file name of a disk, maybe compressed.
func looksLikeDisk(name string) bool {
	n := strings.ToLower(name)
	for _, c := range []string{".zst", ".zstd", ".xz", ".gz", ".gzip"} {
		n = strings.TrimSuffix(n, c)
	}
	return strings.HasSuffix(n, ".qcow2") || strings.HasSuffix(n, ".raw") || strings.HasSuffix(n, ".img")
}
