package artifact

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path"
	"strconv"
	"strings"
	"time"

	"github.com/cwrun/cwrun/images"
	"github.com/cwrun/cwrun/sealed"
	"github.com/klauspost/compress/zstd"
	digest "github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	imgspecv1 "github.com/opencontainers/image-spec/specs-go/v1"
	"go.podman.io/image/v5/docker/reference"
	"oras.land/oras-go/v2/content"
	"oras.land/oras-go/v2/registry/remote"
)

// PushOptions says how to publish a sealed disk. The zero value means
// the defaults named on each field.
type PushOptions struct {
	// Subject names the image the disk was sealed from (a registry image
	// in the destination's repository). Default: the sealed image's
	// org.opencontainers.image.base.name (and .base.digest) annotations.
	Subject string
	// ArtifactType of the pushed manifest. Default ArtifactTypeSealedDisk.
	ArtifactType string
	// TmpDir holds the compressed disk while it is pushed. Default $TMPDIR.
	TmpDir string
	// Created is the artifact's creation time. Default now.
	Created time.Time
	// Progress: as PullOptions.Progress.
	Progress io.Writer
	// Log receives debug and info messages. Nil: none.
	Log *slog.Logger
}

// PushResult says what was pushed.
type PushResult struct {
	Ref          string               // where, as given
	Digest       digest.Digest        // the artifact manifest's digest
	Subject      imgspecv1.Descriptor // the manifest it refers to
	Layer        imgspecv1.Descriptor // the compressed disk
	DiskSize     int64                // bytes of the uncompressed disk
	ReferrersAPI bool                 // false: the sha256-<hex> tag index was updated too
}

// PushSealed publishes the disk of a sealed image (its /disk.img) to the
// registry repository dest as an OCI 1.1 artifact whose subject is the
// image it was sealed from, so that Pull with ReferrerOf finds it. The
// session gives the sealed image's transports (local storage included)
// and the registry settings (auth.json, TLS, registries.conf).
func PushSealed(ctx context.Context, sess *images.Session, sealedRef, dest string, opts PushOptions) (*PushResult, error) {
	log := opts.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if opts.ArtifactType == "" {
		opts.ArtifactType = ArtifactTypeSealedDisk
	}
	if opts.Created.IsZero() {
		opts.Created = time.Now()
	}
	sys := sess.System()
	dn, err := parseRegistryRef("destination", dest)
	if err != nil {
		return nil, err
	}
	if _, ok := dn.(reference.Digested); ok {
		return nil, fmt.Errorf("destination %s names a digest: give a repository, with a tag or without", dest)
	}

	src, err := sess.Open(ctx, sealedRef)
	if err != nil {
		return nil, err
	}
	defer src.Close()
	if src.Annotations[sealed.AnnotationSealed] != "true" {
		log.Warn("the image lacks cwrun's sealed annotation; looking for /disk.img anyway", "image", sealedRef)
	}

	subj, err := subjectName(src.Annotations, opts.Subject, sealedRef)
	if err != nil {
		return nil, err
	}
	if reference.TrimNamed(subj).Name() != reference.TrimNamed(dn).Name() {
		return nil, fmt.Errorf("the artifact must go to the repository of its subject %s, not %s: registries list referrers per repository (push to %s:TAG, or copy the source image to %s first)",
			subj, reference.TrimNamed(dn).Name(), reference.TrimNamed(subj).Name(), reference.TrimNamed(dn).Name())
	}
	top, inst, err := subjectOf(ctx, sys, subj)
	if err != nil {
		return nil, fmt.Errorf("the subject %s: %w", subj, err)
	}
	subject := top
	if inst != nil {
		subject = *inst
	}
	subject.Annotations, subject.Platform, subject.ArtifactType, subject.Data = nil, nil, "", nil

	disk, err := compressDisk(ctx, src, opts.TmpDir)
	if err != nil {
		return nil, err
	}
	defer os.Remove(disk.path)
	log.Info("disk compressed", "size", disk.size, "compressed", disk.desc.Size)

	dst, err := pushSource(sys, dn)
	if err != nil {
		return nil, err
	}
	repo, err := newRepository(ctx, sys, dst)
	if err != nil {
		return nil, err
	}
	api, err := referrersAPI(ctx, repo, subject.Digest)
	if err != nil {
		return nil, err
	}
	// Set before the push so oras neither guesses from the push's answer
	// nor skips the fallback index.
	repo.SetReferrersCapability(api)

	config := imgspecv1.DescriptorEmptyJSON
	if err := pushBlob(ctx, repo, config, func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(config.Data)), nil }, nil); err != nil {
		return nil, fmt.Errorf("pushing the empty config to %s: %w", dn.Name(), err)
	}
	pr := newProgress(opts.Progress)
	if err := pushBlob(ctx, repo, disk.desc, func() (io.ReadCloser, error) { return os.Open(disk.path) }, pr); err != nil {
		return nil, fmt.Errorf("pushing the disk to %s: %w", dn.Name(), err)
	}

	ann := map[string]string{AnnotationCreated: opts.Created.UTC().Format(time.RFC3339)}
	for k, v := range src.Annotations {
		if strings.HasPrefix(k, "io.cwrun.") {
			ann[k] = v
		}
	}
	m := imgspecv1.Manifest{
		Versioned:    specs.Versioned{SchemaVersion: 2},
		MediaType:    imgspecv1.MediaTypeImageManifest,
		ArtifactType: opts.ArtifactType,
		Config:       config,
		Layers:       []imgspecv1.Descriptor{disk.desc},
		Subject:      &subject,
		Annotations:  ann,
	}
	raw, err := json.Marshal(m)
	if err != nil {
		return nil, err
	}
	md := content.NewDescriptorFromBytes(m.MediaType, raw)
	if t, ok := dn.(reference.Tagged); ok {
		err = repo.PushReference(ctx, md, bytes.NewReader(raw), t.Tag())
	} else {
		err = repo.Push(ctx, md, bytes.NewReader(raw))
	}
	if err != nil {
		return nil, fmt.Errorf("pushing the artifact manifest to %s: %w", dest, err)
	}
	return &PushResult{Ref: dest, Digest: md.Digest, Subject: subject, Layer: disk.desc, DiskSize: disk.size, ReferrersAPI: api}, nil
}

// subjectName is the image the disk was sealed from: given, or named by
// the sealed image's base annotations.
func subjectName(ann map[string]string, given, sealedRef string) (reference.Named, error) {
	if given != "" {
		return parseRegistryRef("--subject", given)
	}
	name := ann[AnnotationBaseName]
	if name == "" {
		return nil, fmt.Errorf("%s does not say which image it was sealed from (no %s annotation): give --subject IMAGE, the source image in the destination repository", sealedRef, AnnotationBaseName)
	}
	n, err := parseRegistryRef("the sealed image's "+AnnotationBaseName, name)
	if err != nil {
		return nil, err
	}
	if d := digest.Digest(ann[AnnotationBaseDigest]); d != "" {
		if err := d.Validate(); err != nil {
			return nil, fmt.Errorf("the sealed image's %s: %w", AnnotationBaseDigest, err)
		}
		return reference.WithDigest(reference.TrimNamed(n), d)
	}
	return n, nil
}

// pushBlob uploads a blob unless the repository has it.
func pushBlob(ctx context.Context, repo *remote.Repository, d imgspecv1.Descriptor, open func() (io.ReadCloser, error), pr *progress) error {
	ok, err := repo.Exists(ctx, d)
	if err != nil {
		return err
	}
	if ok {
		return nil
	}
	r, err := open()
	if err != nil {
		return err
	}
	defer r.Close()
	b := pr.startVerb("pushing", repo.Reference.Repository, d.Digest, d.Size)
	err = repo.Push(ctx, d, b.wrap(r))
	b.done(err == nil)
	return err
}

type compressedDisk struct {
	path string
	desc imgspecv1.Descriptor
	size int64
}

// compressDisk finds /disk.img in the sealed image's layers (the top
// one that has it) and writes it zstd-compressed to a temporary file,
// hashing both forms on the way.
func compressDisk(ctx context.Context, src *images.Source, tmpDir string) (_ *compressedDisk, err error) {
	for i := len(src.Layers) - 1; i >= 0; i-- {
		cd, err := compressDiskFromLayer(ctx, src, i, tmpDir)
		if err != nil || cd != nil {
			return cd, err
		}
	}
	return nil, fmt.Errorf("%s is not a sealed image: no /%s in its layers: %w", images.Ref(src.Ref), sealed.DiskPath, ErrNoDisk)
}

func compressDiskFromLayer(ctx context.Context, src *images.Source, i int, tmpDir string) (*compressedDisk, error) {
	layer, err := src.Layer(ctx, i)
	if err != nil {
		return nil, err
	}
	defer layer.Close()
	t := tar.NewReader(layer)
	for {
		h, err := t.Next()
		if errors.Is(err, io.EOF) {
			return nil, nil
		}
		if err != nil {
			return nil, fmt.Errorf("reading layer %d of %s: %w", i, images.Ref(src.Ref), err)
		}
		if h.Typeflag != tar.TypeReg || strings.TrimPrefix(path.Clean("/"+h.Name), "/") != sealed.DiskPath {
			continue
		}
		return compressStream(t, h.Size, tmpDir)
	}
}

func compressStream(r io.Reader, size int64, tmpDir string) (_ *compressedDisk, err error) {
	f, err := os.CreateTemp(tmpDir, "cwrun-disk-*.zst")
	if err != nil {
		return nil, fmt.Errorf("temporary file for the compressed disk: %w (set --tmpdir or TMPDIR)", err)
	}
	defer func() {
		f.Close()
		if err != nil {
			os.Remove(f.Name())
		}
	}()
	ch := sha256.New()
	zw, err := zstd.NewWriter(io.MultiWriter(f, ch))
	if err != nil {
		return nil, err
	}
	uh := sha256.New()
	n, err := io.Copy(zw, io.TeeReader(r, uh))
	if err != nil {
		zw.Close()
		return nil, fmt.Errorf("compressing the disk: %w", err)
	}
	if n != size {
		zw.Close()
		return nil, fmt.Errorf("the disk is %d bytes, its tar entry says %d", n, size)
	}
	if err := zw.Close(); err != nil {
		return nil, fmt.Errorf("compressing the disk: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	return &compressedDisk{
		path: f.Name(),
		size: n,
		desc: imgspecv1.Descriptor{
			MediaType: MediaTypeSealedDiskZstd,
			Digest:    digest.NewDigest(digest.SHA256, ch),
			Size:      st.Size(),
			Annotations: map[string]string{
				AnnotationTitle:      sealed.DiskPath + ".zst",
				AnnotationDiskDigest: digest.NewDigest(digest.SHA256, uh).String(),
				AnnotationDiskSize:   strconv.FormatInt(n, 10),
			},
		},
	}, nil
}
