package images

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"

	digest "github.com/opencontainers/go-digest"
	imgspecv1 "github.com/opencontainers/image-spec/specs-go/v1"
	"go.podman.io/image/v5/image"
	"go.podman.io/image/v5/manifest"
	"go.podman.io/image/v5/pkg/blobinfocache/none"
	"go.podman.io/image/v5/pkg/compression"
	"go.podman.io/image/v5/types"
)

// Source is one opened image: its manifest, config and layers, for the
// platform the session's system context selects from a manifest list.
type Source struct {
	Ref          types.ImageReference
	Manifest     []byte
	ManifestMIME string
	ConfigBlob   []byte           // the image config exactly as stored
	Config       *imgspecv1.Image // the same, parsed (OCI form, converted from Docker's if needed)
	Layers       []types.BlobInfo // in order, lowest first
	Annotations  map[string]string

	src types.ImageSource
}

// Open tries each candidate of ref (see Candidates) and opens the first
// that exists. The error of an all-miss names every place looked.
func (s *Session) Open(ctx context.Context, ref string) (*Source, error) {
	cands, err := s.Candidates(ref)
	if err != nil {
		return nil, err
	}
	var errs []string
	for _, c := range cands {
		src, err := s.openRef(ctx, c)
		if err == nil {
			return src, nil
		}
		if ctx.Err() != nil {
			return nil, contextDone(ctx, err)
		}
		errs = append(errs, fmt.Sprintf("%s: %v", Ref(c), err))
	}
	return nil, fmt.Errorf("image %q: %w; tried:\n  %s", ref, ErrNotFound, strings.Join(errs, "\n  "))
}

func (s *Session) openRef(ctx context.Context, ref types.ImageReference) (_ *Source, err error) {
	src, err := ref.NewImageSource(ctx, s.System())
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			src.Close()
		}
	}()
	raw, mime, err := src.GetManifest(ctx, nil)
	if err != nil {
		return nil, fmt.Errorf("reading manifest: %w", err)
	}
	var instance *digest.Digest
	if manifest.MIMETypeIsMultiImage(mime) {
		list, err := manifest.ListFromBlob(raw, mime)
		if err != nil {
			return nil, fmt.Errorf("parsing manifest list: %w", err)
		}
		d, err := list.ChooseInstance(s.System())
		if err != nil {
			return nil, fmt.Errorf("choosing from manifest list: %w", err)
		}
		instance = &d
		if raw, mime, err = src.GetManifest(ctx, instance); err != nil {
			return nil, fmt.Errorf("reading manifest %s: %w", d, err)
		}
	}
	unparsed := image.UnparsedInstance(src, instance)
	// An image already in local storage passed the policy when it was
	// pulled; anything else is checked now, as a pull would be.
	if ref.Transport().Name() != storageTransport {
		if err := s.allowed(ctx, unparsed); err != nil {
			return nil, err
		}
	}
	img, err := image.FromUnparsedImage(ctx, s.System(), unparsed)
	if err != nil {
		return nil, fmt.Errorf("reading image: %w", err)
	}
	cfgBlob, err := img.ConfigBlob(ctx)
	if err != nil {
		return nil, fmt.Errorf("reading image config: %w", err)
	}
	cfg, err := img.OCIConfig(ctx)
	if err != nil {
		return nil, fmt.Errorf("parsing image config: %w", err)
	}
	var ann map[string]string
	if m, err := manifest.FromBlob(raw, mime); err == nil {
		if oci, ok := m.(*manifest.OCI1); ok {
			ann = oci.Annotations
		}
	}
	return &Source{
		Ref: ref, Manifest: raw, ManifestMIME: mime, ConfigBlob: cfgBlob, Config: cfg,
		Layers: img.LayerInfos(), Annotations: ann, src: src,
	}, nil
}

// Layer returns layer i's uncompressed tar stream.
func (s *Source) Layer(ctx context.Context, i int) (io.ReadCloser, error) {
	if i < 0 || i >= len(s.Layers) {
		return nil, fmt.Errorf("layer %d of an image with %d layers", i, len(s.Layers))
	}
	blob, _, err := s.src.GetBlob(ctx, s.Layers[i], none.NoCache)
	if err != nil {
		return nil, fmt.Errorf("reading layer %d (%s) of %s: %w", i, s.Layers[i].Digest, Ref(s.Ref), err)
	}
	r, _, err := compression.AutoDecompress(blob)
	if err != nil {
		blob.Close()
		return nil, fmt.Errorf("decompressing layer %d (%s): %w", i, s.Layers[i].Digest, err)
	}
	return &closeBoth{ReadCloser: r, under: blob}, nil
}

type closeBoth struct {
	io.ReadCloser
	under io.Closer
}

func (c *closeBoth) Close() error {
	return errors.Join(c.ReadCloser.Close(), c.under.Close())
}

// Close releases the image source.
func (s *Source) Close() error { return s.src.Close() }
