package build

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"path"

	"github.com/cwrun/cwrun/build/luks"
	"github.com/cwrun/cwrun/images"
	"github.com/cwrun/cwrun/sealed"
)

// ErrNotSealed says an image lacks the krun confidential-workload layout.
var ErrNotSealed = errors.New("not a sealed image")

// Inspection is what a sealed image says about itself, without a key.
type Inspection struct {
	Image         string            `json:"image"`
	SealedBy      string            `json:"sealed_by"` // "cwrun VERSION" or "buildah mkcw (or another krun tool)"
	Config        sealed.Config     `json:"config"`
	FooterConfig  sealed.Config     `json:"footer_config"` // the copy at the end of disk.img
	FooterMatches bool              `json:"footer_matches"`
	LUKS          luks.Info         `json:"luks"`
	DiskSize      int64             `json:"disk_size"`
	HasSEVChain   bool              `json:"has_sev_chain"`
	Annotations   map[string]string `json:"annotations,omitempty"`
}

// luksHeadMax bounds how much of disk.img's start inspection keeps: the
// LUKS headers and JSON areas (cryptsetup's largest is 4 MiB a copy).
const luksHeadMax = 16 << 20

// Inspect reads a sealed image's layout: krun-sev.json, the LUKS header
// and the footer of disk.img. It streams the layer once and keeps only
// the disk's head and tail.
func Inspect(ctx context.Context, sess *images.Session, ref string) (*Inspection, error) {
	img, err := sess.Open(ctx, ref)
	if err != nil {
		return nil, err
	}
	defer img.Close()
	ins := &Inspection{Image: images.Ref(img.Ref), Annotations: img.Annotations}
	var cfgJSON, head []byte
	var tail *tailBuffer
	for i := range img.Layers {
		r, err := img.Layer(ctx, i)
		if err != nil {
			return nil, err
		}
		err = scanLayer(r, func(h *tar.Header, body io.Reader) error {
			switch path.Clean("/" + h.Name) {
			case "/" + sealed.ConfigPath:
				b, err := io.ReadAll(io.LimitReader(body, sealed.MaxConfigSize+1))
				if err != nil {
					return err
				}
				cfgJSON = b
			case "/" + sealed.SEVChainPath:
				ins.HasSEVChain = true
			case "/" + sealed.DiskPath:
				ins.DiskSize = h.Size
				head = make([]byte, min(h.Size, luksHeadMax))
				if _, err := io.ReadFull(body, head); err != nil {
					return fmt.Errorf("reading disk.img: %w", err)
				}
				tail = newTailBuffer(sealed.MaxConfigSize + 64)
				if _, err := io.Copy(tail, body); err != nil {
					return fmt.Errorf("reading disk.img: %w", err)
				}
			}
			return nil
		})
		r.Close()
		if err != nil {
			return nil, fmt.Errorf("layer %d of %s: %w", i, ins.Image, err)
		}
	}
	if cfgJSON == nil || head == nil {
		return nil, fmt.Errorf("%s: %w: no /%s and /%s in its root file system; seal it first with `cwrun build %s SEALED`",
			ins.Image, ErrNotSealed, sealed.ConfigPath, sealed.DiskPath, ref)
	}
	if ins.Config, err = sealed.ParseConfig(cfgJSON); err != nil {
		return nil, fmt.Errorf("%s: /%s: %w", ins.Image, sealed.ConfigPath, err)
	}
	disk := tail.readerAt(head, ins.DiskSize)
	footer, _, err := sealed.ReadFooter(disk, ins.DiskSize)
	if err != nil {
		return nil, fmt.Errorf("%s: /%s: %w", ins.Image, sealed.DiskPath, err)
	}
	if ins.FooterConfig, err = sealed.ParseConfig(footer); err != nil {
		return nil, fmt.Errorf("%s: /%s footer: %w", ins.Image, sealed.DiskPath, err)
	}
	ins.FooterMatches = bytes.Equal(bytes.TrimSpace(footer), bytes.TrimSpace(cfgJSON))
	if ins.LUKS, err = luks.Parse(bytes.NewReader(head)); err != nil {
		return nil, fmt.Errorf("%s: /%s: %w", ins.Image, sealed.DiskPath, err)
	}
	ins.SealedBy = "buildah mkcw (or another krun tool)"
	if v, ok := img.Annotations[sealed.AnnotationVersion]; ok {
		ins.SealedBy = "cwrun " + v
	}
	return ins, nil
}

// scanLayer calls fn for each entry of a layer tar stream.
func scanLayer(r io.Reader, fn func(*tar.Header, io.Reader) error) error {
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return fmt.Errorf("reading layer: %w", err)
		}
		if err := fn(h, tr); err != nil {
			return err
		}
	}
}

// tailBuffer keeps the last n bytes written to it.
type tailBuffer struct {
	buf []byte
	n   int
}

func newTailBuffer(n int) *tailBuffer { return &tailBuffer{n: n} }

func (t *tailBuffer) Write(p []byte) (int, error) {
	if len(p) >= t.n {
		t.buf = append(t.buf[:0], p[len(p)-t.n:]...)
		return len(p), nil
	}
	t.buf = append(t.buf, p...)
	if over := len(t.buf) - t.n; over > 0 {
		t.buf = t.buf[over:]
	}
	return len(p), nil
}

// readerAt serves reads of a disk of size bytes from its head and the
// kept tail; reads of the dropped middle fail.
func (t *tailBuffer) readerAt(head []byte, size int64) io.ReaderAt {
	return sparseDisk{head: head, tail: t.buf, tailAt: size - int64(len(t.buf))}
}

type sparseDisk struct {
	head, tail []byte
	tailAt     int64
}

func (d sparseDisk) ReadAt(p []byte, off int64) (int, error) {
	if off+int64(len(p)) <= int64(len(d.head)) {
		return copy(p, d.head[off:]), nil
	}
	if off >= d.tailAt && d.tail != nil {
		n := copy(p, d.tail[off-d.tailAt:])
		if n < len(p) {
			return n, io.EOF
		}
		return n, nil
	}
	return 0, fmt.Errorf("disk bytes %d..%d were not kept", off, off+int64(len(p)))
}
