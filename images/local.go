package images

import (
	"context"
	"encoding/json"
	"fmt"
	"os"

	digest "github.com/opencontainers/go-digest"
	imgspecv1 "github.com/opencontainers/image-spec/specs-go/v1"
	"go.podman.io/image/v5/types"
	"go.podman.io/storage"
)

// LocalName returns the name an image gets in local storage when dst is
// a named containers-storage reference, else "".
func LocalName(dst types.ImageReference) string {
	if dst.Transport().Name() != storageTransport || dst.DockerReference() == nil {
		return ""
	}
	return dst.DockerReference().String()
}

// BlobsFunc makes an image's config and manifest once its only layer's
// (uncompressed) digest and size are known.
type BlobsFunc func(layer digest.Digest, size int64) (config, manifest []byte, err error)

// WriteLocal stores a one-layer image in local storage directly: the
// layer is unpacked once, straight from layerPath, and local storage's
// own digest of it names the layer in the config. c/image's copy would
// first stage a second full copy of the blob and hash it twice more,
// which for a sealed disk is most of a seal's write time. The records
// written are the ones c/image's storage destination writes (config and
// manifest big data, names), so podman and c/image read the image as
// any other. On failure nothing is left in storage.
func (s *Session) WriteLocal(ctx context.Context, name, layerPath string, blobs BlobsFunc) (_ digest.Digest, err error) {
	st, err := s.Store()
	if err != nil {
		return "", err
	}
	f, err := os.Open(layerPath)
	if err != nil {
		return "", err
	}
	layer, size, err := st.PutLayer("", "", nil, "", false, nil, f)
	f.Close()
	if err != nil {
		return "", fmt.Errorf("storing the sealed layer in local storage: %w", err)
	}
	defer func() {
		if err != nil {
			st.DeleteLayer(layer.ID)
		}
	}()
	if err := ctx.Err(); err != nil {
		return "", context.Cause(ctx)
	}
	cBlob, mBlob, err := blobs(layer.UncompressedDigest, size)
	if err != nil {
		return "", err
	}
	var m imgspecv1.Manifest
	if err := json.Unmarshal(mBlob, &m); err != nil {
		return "", fmt.Errorf("manifest: %w", err)
	}
	var cfg imgspecv1.Image
	if err := json.Unmarshal(cBlob, &cfg); err != nil {
		return "", fmt.Errorf("config: %w", err)
	}
	mDigest := digest.FromBytes(mBlob)
	opts := &storage.ImageOptions{
		Metadata: "{}",
		BigData: []storage.ImageBigDataOption{
			{Key: m.Config.Digest.String(), Data: cBlob, Digest: m.Config.Digest},
			{Key: storage.ImageDigestManifestBigDataNamePrefix + "-" + mDigest.String(), Data: mBlob, Digest: mDigest},
			{Key: storage.ImageDigestBigDataKey, Data: mBlob, Digest: mDigest},
		},
	}
	if cfg.Created != nil {
		opts.CreationDate = *cfg.Created
	}
	img, err := st.CreateImage(m.Config.Digest.Encoded(), nil, layer.ID, "", opts)
	if err != nil {
		return "", fmt.Errorf("creating the image in local storage: %w", err)
	}
	// AddNames moves the name from any image that had it, as a pull does.
	if err := st.AddNames(img.ID, []string{name}); err != nil {
		st.DeleteImage(img.ID, true)
		return "", fmt.Errorf("naming the image %s: %w", name, err)
	}
	return mDigest, nil
}
