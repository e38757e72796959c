package build

import (
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/cwrun/cwrun/images"
	"github.com/cwrun/cwrun/sealed"
	digest "github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	imgspecv1 "github.com/opencontainers/image-spec/specs-go/v1"
)

// stageLayout makes an OCI layout folder holding the sealed image, with
// the layer file moved (not copied) in as its only blob.
func stageLayout(dir string, lf *os.File, layerPath string, src *images.Source, res *Result, opts Options, created time.Time) (int64, error) {
	blobs := filepath.Join(dir, "blobs", "sha256")
	if err := os.MkdirAll(blobs, 0o700); err != nil {
		return 0, err
	}
	if _, err := lf.Seek(0, io.SeekStart); err != nil {
		return 0, err
	}
	h := sha256.New()
	size, err := io.Copy(h, lf)
	if err != nil {
		return 0, fmt.Errorf("hashing the sealed layer: %w", err)
	}
	layerDigest := digest.NewDigest(digest.SHA256, h)
	if err := os.Rename(layerPath, filepath.Join(blobs, layerDigest.Encoded())); err != nil {
		return 0, err
	}

	arch := src.Config.Architecture
	if arch == "" {
		arch = "amd64"
	}
	cfg := imgspecv1.Image{
		Created:  &created,
		Platform: imgspecv1.Platform{Architecture: arch, OS: "linux"},
		// Everything of the workload's own config stays inside the
		// encrypted disk; the outside says only how to refuse to run.
		Config: imgspecv1.ImageConfig{Entrypoint: []string{"/" + sealed.EntrypointPath}},
		RootFS: imgspecv1.RootFS{Type: "layers", DiffIDs: []digest.Digest{layerDigest}},
		History: []imgspecv1.History{{
			Created:   &created,
			CreatedBy: fmt.Sprintf("cwrun build: sealed for %s", opts.TEE),
		}},
	}
	cfgBlob, err := json.Marshal(cfg)
	if err != nil {
		return 0, err
	}
	cfgDesc, err := writeBlob(blobs, imgspecv1.MediaTypeImageConfig, cfgBlob)
	if err != nil {
		return 0, err
	}
	ann := map[string]string{
		sealed.AnnotationSealed:  "true",
		sealed.AnnotationVersion: opts.Version,
		sealed.AnnotationTEE:     string(opts.TEE),
		sealed.AnnotationLUKS:    strconv.Itoa(opts.LUKS),
		sealed.AnnotationWID:     res.WorkloadID,
		sealed.AnnotationDiskSz:  strconv.FormatInt(res.DiskSize, 10),
	}
	if opts.TEE == sealed.TEESNP {
		ann[sealed.KrunVariant] = "sev" // crun picks libkrun-sev by it
	}
	m := imgspecv1.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: imgspecv1.MediaTypeImageManifest,
		Config:    cfgDesc,
		Layers: []imgspecv1.Descriptor{{
			MediaType: imgspecv1.MediaTypeImageLayer, Digest: layerDigest, Size: size,
		}},
		Annotations: ann,
	}
	mBlob, err := json.Marshal(m)
	if err != nil {
		return 0, err
	}
	mDesc, err := writeBlob(blobs, imgspecv1.MediaTypeImageManifest, mBlob)
	if err != nil {
		return 0, err
	}
	index := imgspecv1.Index{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: imgspecv1.MediaTypeImageIndex,
		Manifests: []imgspecv1.Descriptor{mDesc},
	}
	iBlob, err := json.Marshal(index)
	if err != nil {
		return 0, err
	}
	if err := os.WriteFile(filepath.Join(dir, "index.json"), iBlob, 0o600); err != nil {
		return 0, err
	}
	if err := os.WriteFile(filepath.Join(dir, imgspecv1.ImageLayoutFile), []byte(`{"imageLayoutVersion":"1.0.0"}`), 0o600); err != nil {
		return 0, err
	}
	return size, nil
}

func writeBlob(dir, mediaType string, b []byte) (imgspecv1.Descriptor, error) {
	d := digest.FromBytes(b)
	if err := os.WriteFile(filepath.Join(dir, d.Encoded()), b, 0o600); err != nil {
		return imgspecv1.Descriptor{}, err
	}
	return imgspecv1.Descriptor{MediaType: mediaType, Digest: d, Size: int64(len(b))}, nil
}
