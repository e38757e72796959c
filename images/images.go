// Package images finds images the way podman does and moves them
// between transports: every reference form that c/image knows
// (containers-storage:, docker://, oci:, oci-archive:, docker-archive:,
// dir:), bare names resolved against local storage first and then the
// registries of registries.conf, with policy.json and auth.json honoured.
//
// It and package artifact (VM disks and OCI artifacts, which c/image
// fetches but whose referrers it cannot list) are the only packages of
// cwrun, tests aside, that import c/image and c/storage; the guest must
// never import either.
package images

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"go.podman.io/image/v5/docker/reference"
	"go.podman.io/image/v5/pkg/shortnames"
	istorage "go.podman.io/image/v5/storage"
	"go.podman.io/image/v5/transports"
	"go.podman.io/image/v5/transports/alltransports"
	"go.podman.io/image/v5/types"
	"go.podman.io/storage"
)

// ErrNotFound says an image reference named nothing that exists.
var ErrNotFound = errors.New("image not found")

// Options says where images live. The zero value means what podman uses:
// the default store of storage.conf and the system's registries.conf,
// policy.json and auth.json.
type Options struct {
	// Root, RunRoot and Driver override storage.conf's graph root, run
	// root and driver (podman's --root, --runroot, --storage-driver).
	Root, RunRoot, Driver string
	// System is passed to c/image as is (auth file, registries.conf
	// path, TLS verification, platform choice). Nil means defaults.
	System *types.SystemContext
}

// Session holds the local store, opened on first use, and the system
// context. Close it to release the store's locks.
type Session struct {
	opts  Options
	store storage.Store
}

// NewSession returns a session; it opens nothing yet.
func NewSession(opts Options) *Session { return &Session{opts: opts} }

// System returns the c/image system context of the session (never nil).
func (s *Session) System() *types.SystemContext {
	if s.opts.System == nil {
		s.opts.System = &types.SystemContext{}
	}
	return s.opts.System
}

// Store opens the local container store podman uses, once.
func (s *Session) Store() (storage.Store, error) {
	if s.store != nil {
		return s.store, nil
	}
	so, err := storage.DefaultStoreOptions()
	if err != nil {
		return nil, fmt.Errorf("reading storage.conf: %w", err)
	}
	if s.opts.Root != "" {
		so.GraphRoot = s.opts.Root
	}
	if s.opts.RunRoot != "" {
		so.RunRoot = s.opts.RunRoot
	}
	if s.opts.Driver != "" {
		so.GraphDriverName = s.opts.Driver
	}
	st, err := storage.GetStore(so)
	if err != nil {
		return nil, fmt.Errorf("opening local image storage at %s: %w (podman's store; pass --root to use another)", so.GraphRoot, err)
	}
	s.store = st
	return st, nil
}

// Close releases the local store if it was opened.
func (s *Session) Close() error {
	if s.store == nil {
		return nil
	}
	_, err := s.store.Shutdown(false)
	s.store = nil
	return err
}

const storageTransport = "containers-storage"

// Kind tells how a user's reference string was read.
type Kind int

// How a reference string is read.
const (
	KindTransport Kind = iota // "transport:details"
	KindBare                  // a plain image name: local storage, then registries
)

// Classify splits a user's reference into its transport and the rest,
// or reports a bare image name. An unknown transport is an error that
// lists the known ones.
func Classify(ref string) (kind Kind, transport, rest string, err error) {
	if ref == "" {
		return 0, "", "", errors.New("empty image reference")
	}
	if t, r, ok := strings.Cut(ref, ":"); ok && transports.Get(t) != nil {
		return KindTransport, t, r, nil
	}
	if _, perr := reference.ParseNormalizedNamed(ref); perr == nil {
		return KindBare, "", ref, nil
	}
	if t, _, ok := strings.Cut(ref, ":"); ok && !strings.ContainsAny(t, "/.@") {
		return 0, "", "", fmt.Errorf("unknown transport %q in %q: use one of %s, or a plain image name", t, ref, strings.Join(knownTransports(), ", "))
	}
	return 0, "", "", fmt.Errorf("%q is neither an image name nor a transport:reference", ref)
}

func knownTransports() []string {
	var names []string
	for _, n := range transports.ListNames() {
		if n == "docker" {
			n = "docker://"
		} else {
			n += ":"
		}
		names = append(names, n)
	}
	return names
}

// localRef makes a containers-storage reference in the session's store.
func (s *Session) localRef(name string) (types.ImageReference, error) {
	st, err := s.Store()
	if err != nil {
		return nil, err
	}
	r, err := istorage.Transport.ParseStoreReference(st, name)
	if err != nil {
		return nil, fmt.Errorf("local image %q: %w", name, err)
	}
	return r, nil
}

// Destination parses where a sealed image goes. A bare name means local
// storage, as `podman tag` would name it.
func (s *Session) Destination(ref string) (types.ImageReference, error) {
	kind, transport, rest, err := Classify(ref)
	if err != nil {
		return nil, err
	}
	if kind == KindBare || transport == storageTransport {
		return s.localRef(rest)
	}
	r, err := alltransports.ParseImageName(ref)
	if err != nil {
		return nil, fmt.Errorf("destination %q: %w", ref, err)
	}
	return r, nil
}

// Candidates lists the references a source string may mean, in the
// order podman tries them: for a bare name, local storage first, then
// each registry that registries.conf's short-name rules give. The
// caller tries each until one opens; Describe explains an all-miss.
func (s *Session) Candidates(ref string) ([]types.ImageReference, error) {
	kind, transport, rest, err := Classify(ref)
	if err != nil {
		return nil, err
	}
	if transport == storageTransport {
		r, err := s.localRef(rest)
		if err != nil {
			return nil, err
		}
		return []types.ImageReference{r}, nil
	}
	if kind == KindTransport {
		r, err := alltransports.ParseImageName(ref)
		if err != nil {
			return nil, fmt.Errorf("image %q: %w", ref, err)
		}
		return []types.ImageReference{r}, nil
	}

	var out []types.ImageReference
	st, err := s.Store()
	if err != nil {
		return nil, err
	}
	local, err := shortnames.ResolveLocally(s.System(), rest)
	if err != nil {
		return nil, fmt.Errorf("image name %q: %w", rest, err)
	}
	for _, named := range local {
		r, err := istorage.Transport.NewStoreReference(st, named, "")
		if err != nil {
			continue
		}
		if img, err := istorage.Transport.GetStoreImage(st, r); err == nil && img != nil {
			return []types.ImageReference{r}, nil
		}
	}
	resolved, err := shortnames.Resolve(s.System(), rest)
	if err != nil {
		return nil, fmt.Errorf("image name %q: %w", rest, err)
	}
	for _, c := range resolved.PullCandidates {
		r, err := alltransports.ParseImageName("docker://" + c.Value.String())
		if err != nil {
			continue
		}
		out = append(out, r)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%q is not in local storage and registries.conf gives no registry to pull it from: %w", rest, ErrNotFound)
	}
	return out, nil
}

// Ref names a reference for messages: local images by their name alone,
// as podman shows them, others with their transport.
func Ref(r types.ImageReference) string {
	if r.Transport().Name() == storageTransport && r.DockerReference() != nil {
		return r.DockerReference().String()
	}
	return transports.ImageName(r)
}

// contextDone wraps an error with the cancellation cause when ctx ended.
func contextDone(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%w (%v)", context.Cause(ctx), err)
	}
	return err
}
