// Package artifact fetches VM disks that are published in OCI registries
// and publishes cwrun's sealed disks the same way.
//
// Pull understands four kinds of reference: a podman-machine style index
// (entries chosen by their "disktype" annotation and platform, each with
// one compressed disk layer), an OCI artifact whose layer is a disk, a
// "containerdisk" image (one disk file under / or /disk/ of a tar layer),
// and the referrers of an image (OCI 1.1 `subject`), found with the
// referrers API or, on registries without it, the `sha256-<hex>` tag
// schema. Disks land uncompressed in a cache keyed by layer digest, and
// are verified against that digest while they stream in.
//
// Manifests and blobs are read through c/image (DESIGN.md decision 7), so
// registries.conf, policy.json, auth.json and certs.d apply as for
// podman. c/image has no referrers API and cannot push a manifest's
// referrers index, so those two go through oras-go (see referrers.go).
//
// It never boots anything and never writes a cached disk after it is
// complete: callers boot from an overlay.
package artifact

import (
	"context"
	"io"
	"log/slog"

	digest "github.com/opencontainers/go-digest"
	"go.podman.io/image/v5/types"
)

// Disk is a VM disk in cwrun's cache, ready to boot.
type Disk struct {
	Path   string        // the uncompressed disk file in the cache (never to be written: boots use an overlay)
	Format string        // "qcow2" or "raw" (sniffed: qcow2's magic "QFI\xfb"; else raw)
	Digest digest.Digest // the digest of the layer it came from
	Ref    string        // what was pulled, for messages
}

// PullOptions says how to pull. The zero value means the defaults named
// on each field.
type PullOptions struct {
	// CacheDir holds the disks. Default $XDG_CACHE_HOME/cwrun/disks, or
	// ~/.cache/cwrun/disks.
	CacheDir string
	// DiskType chooses among the entries of a podman-machine style index
	// by their "disktype" annotation. Default "qemu".
	DiskType string
	// ReferrerOf, when set, names an image (a registry image:
	// docker://host/repo:tag or host/repo:tag); the disk pulled is the
	// newest of its referrers whose artifactType is ArtifactType
	// (default ArtifactTypeSealedDisk). Pull's ref must then be empty.
	ReferrerOf, ArtifactType string
	// Progress receives a progress bar when it is a terminal, one line
	// per download otherwise. Nil: nothing.
	Progress io.Writer
	// System is the c/image system context (auth file, registries.conf,
	// certificates, platform). Nil means the system's defaults.
	System *types.SystemContext
	// TLSVerify, when set, overrides System's TLS verification
	// (false: skip it, and allow plain HTTP, as podman's --tls-verify=false).
	TLSVerify *bool
	// AuthFile, when set, overrides System's auth.json path.
	AuthFile string
	// PolicyFile, when set, overrides System's policy.json path.
	PolicyFile string
	// Log receives debug and info messages. Nil: none.
	Log *slog.Logger
}

// Pull resolves ref (or opts.ReferrerOf) to one disk layer, downloads it
// into the cache unless it is there already, and returns the cached disk.
func Pull(ctx context.Context, ref string, opts PullOptions) (*Disk, error) {
	p, err := newPuller(opts)
	if err != nil {
		return nil, err
	}
	return p.pull(ctx, ref)
}
