package artifact

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"strings"

	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
)

// compression is how a disk layer is compressed.
type compression string

const (
	compNone  compression = "none"
	compZstd  compression = "zstd"
	compXz    compression = "xz"
	compGzip  compression = "gzip"
	compSniff compression = "" // nothing said: look at the first bytes
)

// compressionOf decides a layer's compression from its media type, then
// from its file name (the title annotation). A compression that either
// names but cwrun cannot read is ErrUnknownCompression; when neither says
// anything, the first bytes decide (compSniff).
func compressionOf(mediaType, title string) (compression, error) {
	mt := strings.ToLower(mediaType)
	if i := strings.IndexByte(mt, ';'); i >= 0 {
		mt = strings.TrimSpace(mt[:i])
	}
	switch mt {
	case "application/zstd", "application/x-zstd":
		return compZstd, nil
	case "application/x-xz", "application/xz":
		return compXz, nil
	case "application/gzip", "application/x-gzip":
		return compGzip, nil
	case "application/x-bzip2", "application/x-bzip", "application/x-lz4", "application/x-lzma",
		"application/x-7z-compressed", "application/zip", "application/x-lzip", "application/x-compress":
		return "", fmt.Errorf("media type %q: %w (cwrun reads zstd, xz and gzip; recompress the disk with one of them)", mediaType, ErrUnknownCompression)
	}
	if i := strings.LastIndexByte(mt, '+'); i >= 0 {
		switch suf := mt[i+1:]; suf {
		case "zstd", "zst":
			return compZstd, nil
		case "xz":
			return compXz, nil
		case "gzip", "gz":
			return compGzip, nil
		case "json", "raw", "qcow2", "octet-stream":
			// not a compression suffix
		default:
			return "", fmt.Errorf("media type %q: %w %q (cwrun reads zstd, xz and gzip; recompress the disk with one of them)", mediaType, ErrUnknownCompression, suf)
		}
	}
	// Docker's tar layers say gzip with a dot.
	if strings.HasSuffix(mt, ".tar.gzip") {
		return compGzip, nil
	}
	if c, ok, err := compressionOfName(title); ok || err != nil {
		if err != nil {
			return "", fmt.Errorf("layer %q (media type %q): %w", title, mediaType, err)
		}
		return c, nil
	}
	return compSniff, nil
}

// compressionOfName reads a compression from a file name's suffix; ok is
// false when the name says nothing.
func compressionOfName(name string) (c compression, ok bool, err error) {
	n := strings.ToLower(name)
	switch {
	case n == "":
		return "", false, nil
	case strings.HasSuffix(n, ".zst"), strings.HasSuffix(n, ".zstd"):
		return compZstd, true, nil
	case strings.HasSuffix(n, ".xz"):
		return compXz, true, nil
	case strings.HasSuffix(n, ".gz"), strings.HasSuffix(n, ".gzip"):
		return compGzip, true, nil
	case strings.HasSuffix(n, ".bz2"), strings.HasSuffix(n, ".lz4"), strings.HasSuffix(n, ".lzma"),
		strings.HasSuffix(n, ".zip"), strings.HasSuffix(n, ".7z"), strings.HasSuffix(n, ".lz"):
		return "", false, fmt.Errorf("%w of %q (cwrun reads zstd, xz and gzip)", ErrUnknownCompression, name)
	case strings.HasSuffix(n, ".qcow2"), strings.HasSuffix(n, ".raw"), strings.HasSuffix(n, ".img"):
		return compNone, true, nil
	}
	return "", false, nil
}

// Magic numbers of the formats Pull knows.
var (
	magicZstd  = []byte{0x28, 0xb5, 0x2f, 0xfd}
	magicXz    = []byte{0xfd, '7', 'z', 'X', 'Z', 0x00}
	magicGzip  = []byte{0x1f, 0x8b}
	magicQcow2 = []byte{'Q', 'F', 'I', 0xfb}
)

// decompress returns the uncompressed stream of r. compSniff looks at the
// first bytes and takes anything unrecognised as uncompressed. The
// returned close function releases decoder resources; it does not close r.
func decompress(r io.Reader, c compression) (io.Reader, func(), error) {
	if c == compSniff {
		br := bufio.NewReaderSize(r, 64<<10)
		head, _ := br.Peek(8)
		switch {
		case bytes.HasPrefix(head, magicZstd):
			c = compZstd
		case bytes.HasPrefix(head, magicXz):
			c = compXz
		case bytes.HasPrefix(head, magicGzip):
			c = compGzip
		default:
			c = compNone
		}
		r = br
	}
	switch c {
	case compNone:
		return r, func() {}, nil
	case compZstd:
		d, err := zstd.NewReader(r, zstd.WithDecoderMaxWindow(1<<31))
		if err != nil {
			return nil, nil, fmt.Errorf("zstd: %w", err)
		}
		return d, d.Close, nil
	case compXz:
		d, err := xz.NewReader(r)
		if err != nil {
			return nil, nil, fmt.Errorf("xz: %w", err)
		}
		return d, func() {}, nil
	case compGzip:
		d, err := gzip.NewReader(r)
		if err != nil {
			return nil, nil, fmt.Errorf("gzip: %w", err)
		}
		return d, func() { d.Close() }, nil
	}
	return nil, nil, fmt.Errorf("%w %q", ErrUnknownCompression, c)
}

// sniffFormat names a disk's format from its first bytes.
func sniffFormat(head []byte) string {
	if bytes.HasPrefix(head, magicQcow2) {
		return "qcow2"
	}
	return "raw"
}
