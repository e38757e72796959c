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

// sealedImage makes the config and manifest around the sealed layer.
type sealedImage struct {
	arch    string
	created time.Time
	tee     sealed.TEE
	ann     map[string]string
}

func newSealedImage(src *images.Source, res *Result, opts Options, created time.Time) sealedImage {
	arch := src.Config.Architecture
	if arch == "" {
		arch = "amd64"
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
	// OCI's base-image annotations name the source, so that `cwrun push
	// --artifact` can hang the disk on it as a referrer. Only a registry
	// name says where that is; an oci: folder has none.
	if src.Ref != nil {
		if named := src.Ref.DockerReference(); named != nil {
			ann[imgspecv1.AnnotationBaseImageName] = named.String()
			if len(src.Manifest) > 0 {
				ann[imgspecv1.AnnotationBaseImageDigest] = digest.FromBytes(src.Manifest).String()
			}
		}
	}
	return sealedImage{arch: arch, created: created, tee: opts.TEE, ann: ann}
}

// blobs returns the image config and manifest for a layer of the given
// digest (uncompressed, so also its diff ID) and size.
func (si sealedImage) blobs(layer digest.Digest, size int64) (config, manifest []byte, err error) {
	cfg := imgspecv1.Image{
		Created:  &si.created,
		Platform: imgspecv1.Platform{Architecture: si.arch, OS: "linux"},
		// Everything of the workload's own config stays inside the
		// encrypted disk; the outside says only how to refuse to run.
		Config: imgspecv1.ImageConfig{Entrypoint: []string{"/" + sealed.EntrypointPath}},
		RootFS: imgspecv1.RootFS{Type: "layers", DiffIDs: []digest.Digest{layer}},
		History: []imgspecv1.History{{
			Created:   &si.created,
			CreatedBy: fmt.Sprintf("cwrun build: sealed for %s", si.tee),
		}},
	}
	if config, err = json.Marshal(cfg); err != nil {
		return nil, nil, err
	}
	m := imgspecv1.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: imgspecv1.MediaTypeImageManifest,
		Config: imgspecv1.Descriptor{
			MediaType: imgspecv1.MediaTypeImageConfig, Digest: digest.FromBytes(config), Size: int64(len(config)),
		},
		Layers: []imgspecv1.Descriptor{{
			MediaType: imgspecv1.MediaTypeImageLayer, Digest: layer, Size: size,
		}},
		Annotations: si.ann,
	}
	if manifest, err = json.Marshal(m); err != nil {
		return nil, nil, err
	}
	return config, manifest, nil
}

// stageLayout makes an OCI layout folder holding the sealed image, with
// the layer file moved (not copied) in as its only blob.
func stageLayout(dir string, lf *os.File, layerPath string, si sealedImage) error {
	blobs := filepath.Join(dir, "blobs", "sha256")
	if err := os.MkdirAll(blobs, 0o700); err != nil {
		return err
	}
	if _, err := lf.Seek(0, io.SeekStart); err != nil {
		return err
	}
	h := sha256.New()
	size, err := io.Copy(h, lf)
	if err != nil {
		return fmt.Errorf("hashing the sealed layer: %w", err)
	}
	layerDigest := digest.NewDigest(digest.SHA256, h)
	if err := os.Rename(layerPath, filepath.Join(blobs, layerDigest.Encoded())); err != nil {
		return err
	}
	cfgBlob, mBlob, err := si.blobs(layerDigest, size)
	if err != nil {
		return err
	}
	if _, err := writeBlob(blobs, cfgBlob); err != nil {
		return err
	}
	md, err := writeBlob(blobs, mBlob)
	if err != nil {
		return err
	}
	index := imgspecv1.Index{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: imgspecv1.MediaTypeImageIndex,
		Manifests: []imgspecv1.Descriptor{{MediaType: imgspecv1.MediaTypeImageManifest, Digest: md, Size: int64(len(mBlob))}},
	}
	iBlob, err := json.Marshal(index)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "index.json"), iBlob, 0o600); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, imgspecv1.ImageLayoutFile), []byte(`{"imageLayoutVersion":"1.0.0"}`), 0o600); err != nil {
		return err
	}
	return nil
}

func writeBlob(dir string, b []byte) (digest.Digest, error) {
	d := digest.FromBytes(b)
	return d, os.WriteFile(filepath.Join(dir, d.Encoded()), b, 0o600)
}
