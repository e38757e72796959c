package artifact

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"

	digest "github.com/opencontainers/go-digest"
	imgspecv1 "github.com/opencontainers/image-spec/specs-go/v1"
	"go.podman.io/image/v5/pkg/blobinfocache/none"
	"go.podman.io/image/v5/types"
)

// fetcher downloads the layers of one opened reference into the cache.
type fetcher struct {
	p    *puller
	src  types.ImageSource
	name string
}

// The cache: <dir>/<algorithm>/<hex> is the uncompressed disk of the
// layer with that digest, read-only once complete; <hex>.nodisk marks a
// containerdisk layer known to hold no disk; .<hex>.partial-* are
// downloads in progress (a failed one removes its own; one left by a
// crash is left alone, as another pull might own it).
func (p *puller) cachePath(d digest.Digest) string {
	return filepath.Join(p.cache, d.Algorithm().String(), d.Encoded())
}

// cached returns the disk of layer d when the cache has it.
func (f *fetcher) cached(d digest.Digest) (*Disk, bool, error) {
	path := f.p.cachePath(d)
	fd, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("reading the disk cache: %w", err)
	}
	defer fd.Close()
	head := make([]byte, 4)
	n, _ := io.ReadFull(fd, head)
	return &Disk{Path: path, Format: sniffFormat(head[:n]), Digest: d, Ref: f.name}, true, nil
}

// partial makes the file a download goes to, next to where it will be.
func (f *fetcher) partial(d digest.Digest) (*os.File, error) {
	dir := filepath.Dir(f.p.cachePath(d))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("making the disk cache %s: %w", dir, err)
	}
	tmp, err := os.CreateTemp(dir, "."+d.Encoded()+".partial-*")
	if err != nil {
		return nil, fmt.Errorf("disk cache: %w", err)
	}
	return tmp, nil
}

// commit makes a verified download the cached disk: read-only, then
// renamed into place, so a cached path is always complete.
func (f *fetcher) commit(tmp *os.File, d digest.Digest) (*Disk, error) {
	if err := tmp.Sync(); err != nil {
		return nil, fmt.Errorf("writing %s: %w", tmp.Name(), err)
	}
	if err := tmp.Chmod(0o444); err != nil {
		return nil, err
	}
	if err := tmp.Close(); err != nil {
		return nil, err
	}
	if err := os.Rename(tmp.Name(), f.p.cachePath(d)); err != nil {
		return nil, fmt.Errorf("disk cache: %w", err)
	}
	d2, ok, err := f.cached(d)
	if err != nil || !ok {
		return nil, fmt.Errorf("disk cache: %s vanished after it was written: %v", f.p.cachePath(d), err)
	}
	return d2, nil
}

// discard removes a download that failed, and says so in err.
func discard(tmp *os.File, err error) error {
	tmp.Close()
	if rerr := os.Remove(tmp.Name()); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
		return fmt.Errorf("%w; removing the partial download %s failed too: %v", err, tmp.Name(), rerr)
	}
	return fmt.Errorf("%w (the partial download was deleted)", err)
}

// artifactDisk pulls a layer that is a disk, maybe compressed.
func (f *fetcher) artifactDisk(ctx context.Context, l imgspecv1.Descriptor) (*Disk, error) {
	if err := l.Digest.Validate(); err != nil {
		return nil, fmt.Errorf("%s: layer digest %q: %w", f.name, l.Digest, err)
	}
	if d, ok, err := f.cached(l.Digest); ok || err != nil {
		if ok {
			f.p.log.Info("disk in the cache", "ref", f.name, "digest", l.Digest, "path", d.Path)
		}
		return d, err
	}
	title := l.Annotations[AnnotationTitle]
	comp, err := compressionOf(l.MediaType, title)
	if err != nil {
		return nil, fmt.Errorf("%s: layer %s: %w", f.name, l.Digest, err)
	}
	want, wantSize, err := uncompressedWant(l)
	if err != nil {
		return nil, fmt.Errorf("%s: layer %s: %w", f.name, l.Digest, err)
	}
	tmp, err := f.partial(l.Digest)
	if err != nil {
		return nil, err
	}
	err = f.download(ctx, l, func(r io.Reader) error {
		dr, done, err := decompress(r, comp)
		if err != nil {
			return err
		}
		defer done()
		var h hash.Hash
		if want != "" {
			h = want.Algorithm().Hash()
			dr = io.TeeReader(dr, h)
		}
		n, err := copySparse(tmp, dr)
		if err != nil {
			return fmt.Errorf("decompressing (%s) into %s: %w", comp, tmp.Name(), err)
		}
		if wantSize >= 0 && n != wantSize {
			return fmt.Errorf("the uncompressed disk is %d bytes, the layer's %s annotation says %d: %w", n, AnnotationDiskSize, wantSize, ErrDigestMismatch)
		}
		if h != nil {
			if got := digest.NewDigest(want.Algorithm(), h); got != want {
				return fmt.Errorf("the uncompressed disk is %s, the layer's %s annotation says %s: %w", got, AnnotationDiskDigest, want, ErrDigestMismatch)
			}
		}
		return nil
	})
	if err != nil {
		return nil, discard(tmp, err)
	}
	return f.commit(tmp, l.Digest)
}

// uncompressedWant reads the optional uncompressed digest and size
// annotations (-1: no size given).
func uncompressedWant(l imgspecv1.Descriptor) (digest.Digest, int64, error) {
	size := int64(-1)
	if s, ok := l.Annotations[AnnotationDiskSize]; ok {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil || n < 0 {
			return "", 0, fmt.Errorf("annotation %s=%q is not a size", AnnotationDiskSize, s)
		}
		size = n
	}
	d := digest.Digest(l.Annotations[AnnotationDiskDigest])
	if d != "" {
		if err := d.Validate(); err != nil {
			return "", 0, fmt.Errorf("annotation %s: %w", AnnotationDiskDigest, err)
		}
	}
	return d, size, nil
}

// containerDisk pulls the disk file out of a containerdisk image: the
// topmost layer with a disk under / or /disk/ holds it.
func (f *fetcher) containerDisk(ctx context.Context, layers []imgspecv1.Descriptor) (*Disk, error) {
	for i := len(layers) - 1; i >= 0; i-- {
		l := layers[i]
		if err := l.Digest.Validate(); err != nil {
			return nil, fmt.Errorf("%s: layer digest %q: %w", f.name, l.Digest, err)
		}
		if d, ok, err := f.cached(l.Digest); ok || err != nil {
			return d, err
		}
		if _, err := os.Stat(f.p.cachePath(l.Digest) + ".nodisk"); err == nil {
			continue
		}
		d, err := f.containerDiskLayer(ctx, l)
		if err != nil || d != nil {
			return d, err
		}
		if err := os.WriteFile(f.p.cachePath(l.Digest)+".nodisk", nil, 0o444); err != nil {
			f.p.log.Warn("cannot mark a layer without disk in the cache", "err", err)
		}
	}
	return nil, fmt.Errorf("%s: a container image with no disk file (*.qcow2, *.raw, *.img in / or any file in /disk/): %w", f.name, ErrNoDisk)
}

// containerDiskLayer extracts the one disk file of a tar layer; nil
// when the layer has none.
func (f *fetcher) containerDiskLayer(ctx context.Context, l imgspecv1.Descriptor) (*Disk, error) {
	comp, err := compressionOf(l.MediaType, "")
	if err != nil {
		return nil, fmt.Errorf("%s: layer %s: %w", f.name, l.Digest, err)
	}
	tmp, err := f.partial(l.Digest)
	if err != nil {
		return nil, err
	}
	var found string
	err = f.download(ctx, l, func(r io.Reader) error {
		tr, done, err := decompress(r, comp)
		if err != nil {
			return err
		}
		defer done()
		t := tar.NewReader(tr)
		for {
			h, err := t.Next()
			if errors.Is(err, io.EOF) {
				return nil
			}
			if err != nil {
				return fmt.Errorf("reading the layer's tar: %w", err)
			}
			if h.Typeflag != tar.TypeReg || !diskEntry(h.Name) {
				continue
			}
			if found != "" {
				return fmt.Errorf("two disk files, /%s and /%s: a containerdisk holds one: %w", found, cleanEntry(h.Name), ErrNoDisk)
			}
			found = cleanEntry(h.Name)
			c, known, err := compressionOfName(found)
			if err != nil {
				return err
			}
			if !known || c == "" {
				c = compNone
			}
			dr, ddone, err := decompress(t, c)
			if err != nil {
				return fmt.Errorf("/%s: %w", found, err)
			}
			_, err = copySparse(tmp, dr)
			ddone()
			if err != nil {
				return fmt.Errorf("extracting /%s into %s: %w", found, tmp.Name(), err)
			}
		}
	})
	if err != nil {
		return nil, discard(tmp, err)
	}
	if found == "" {
		tmp.Close()
		os.Remove(tmp.Name())
		return nil, nil
	}
	f.p.log.Info("containerdisk", "ref", f.name, "file", "/"+found, "layer", l.Digest)
	return f.commit(tmp, l.Digest)
}

func cleanEntry(name string) string {
	return strings.TrimPrefix(path.Clean("/"+name), "/")
}

// diskEntry: a containerdisk's disk: any file in /disk/, or a file in /
// named like a disk.
func diskEntry(name string) bool {
	n := cleanEntry(name)
	if dir, file, ok := strings.Cut(n, "/"); ok {
		return dir == "disk" && !strings.Contains(file, "/")
	}
	return looksLikeDisk(n)
}

// download streams layer l to consume, counting and hashing what the
// registry sends, and then checks size and digest. A mismatch or a short
// stream is the error even when consume failed first: a corrupt stream
// usually makes the decompressor fail before the digest can be checked.
func (f *fetcher) download(ctx context.Context, l imgspecv1.Descriptor, consume func(io.Reader) error) error {
	if !l.Digest.Algorithm().Available() {
		return fmt.Errorf("%s: layer %s: digest algorithm %q is not supported", f.name, l.Digest, l.Digest.Algorithm())
	}
	body, _, err := f.src.GetBlob(ctx, types.BlobInfo{Digest: l.Digest, Size: l.Size, MediaType: l.MediaType, URLs: l.URLs, Annotations: l.Annotations}, none.NoCache)
	if err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("%s: fetching layer %s: %w", f.name, l.Digest, context.Cause(ctx))
		}
		return fmt.Errorf("%s: fetching layer %s: %w", f.name, l.Digest, err)
	}
	defer body.Close()
	bar := f.p.progress.start(f.name, l.Digest, l.Size)
	// One byte past the size is enough to know the registry sent too much.
	var lim io.Reader = body
	if l.Size > 0 {
		lim = io.LimitReader(body, l.Size+1)
	}
	vr := &verifier{r: bar.wrap(lim), h: l.Digest.Algorithm().Hash()}
	cerr := consume(vr)
	if vr.err == nil {
		// Read what consume left (tar padding, a zstd frame's end) so the
		// digest covers the whole blob.
		io.Copy(io.Discard, vr)
	}
	err = f.verify(ctx, l, vr, cerr)
	bar.done(err == nil)
	return err
}

func (f *fetcher) verify(ctx context.Context, l imgspecv1.Descriptor, vr *verifier, cerr error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%s: layer %s: %w", f.name, l.Digest, context.Cause(ctx))
	}
	if l.Size > 0 && vr.n < l.Size {
		why := "the stream ended"
		if vr.err != nil {
			why = vr.err.Error()
		}
		return fmt.Errorf("%s: layer %s: %w after %d of %d bytes (%s); pull again, and if it persists the registry or a proxy is at fault",
			f.name, l.Digest, ErrTruncated, vr.n, l.Size, why)
	}
	if vr.err != nil {
		return fmt.Errorf("%s: reading layer %s: %w", f.name, l.Digest, vr.err)
	}
	if l.Size > 0 && vr.n > l.Size {
		return fmt.Errorf("%s: layer %s: the registry sent more than the manifest's %d bytes: %w; refusing it", f.name, l.Digest, l.Size, ErrDigestMismatch)
	}
	if got := digest.NewDigest(l.Digest.Algorithm(), vr.h); got != l.Digest {
		return fmt.Errorf("%s: layer %s: %w: the registry sent %d bytes with digest %s; refusing them (the registry's storage or a proxy is corrupting data)",
			f.name, l.Digest, ErrDigestMismatch, vr.n, got)
	}
	if cerr != nil {
		return fmt.Errorf("%s: layer %s: %w", f.name, l.Digest, cerr)
	}
	return nil
}

// verifier counts and hashes what passes through it and keeps the first
// read error other than EOF.
type verifier struct {
	r   io.Reader
	h   hash.Hash
	n   int64
	err error
}

func (v *verifier) Read(b []byte) (int, error) {
	if v.err != nil {
		return 0, v.err
	}
	n, err := v.r.Read(b)
	v.h.Write(b[:n])
	v.n += int64(n)
	if err != nil && !errors.Is(err, io.EOF) {
		v.err = err
	}
	return n, err
}

// copySparse copies r to f from f's start, seeking over blocks of zeros
// so that raw disks take only the room their data needs, and returns
// the bytes copied.
func copySparse(f *os.File, r io.Reader) (int64, error) {
	const block = 64 << 10
	buf := make([]byte, 1<<20)
	var off int64
	for {
		n, rerr := fill(r, buf)
		for i := 0; i < n; i += block {
			b := buf[i:min(i+block, n)]
			if !allZero(b) {
				if _, err := f.WriteAt(b, off); err != nil {
					return off, err
				}
			}
			off += int64(len(b))
		}
		if errors.Is(rerr, io.EOF) {
			break
		}
		if rerr != nil {
			return off, rerr
		}
	}
	return off, f.Truncate(off)
}

// fill reads into b until it is full or r fails; io.EOF only at a clean
// end (io.ReadFull would turn a short stream into io.ErrUnexpectedEOF,
// which a decompressor also returns for a cut-off input).
func fill(r io.Reader, b []byte) (int, error) {
	n := 0
	for n < len(b) {
		m, err := r.Read(b[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

func allZero(b []byte) bool {
	for len(b) >= 8 {
		if b[0]|b[1]|b[2]|b[3]|b[4]|b[5]|b[6]|b[7] != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
