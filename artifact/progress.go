package artifact

import (
	"fmt"
	"io"
	"os"

	digest "github.com/opencontainers/go-digest"
	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"
	"golang.org/x/term"
)

// progress shows downloads and uploads: a bar on a terminal, one line
// each otherwise, nothing without a writer.
type progress struct {
	w    io.Writer
	term bool
}

func newProgress(w io.Writer) *progress {
	pr := &progress{w: w}
	if f, ok := w.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
		pr.term = true
	}
	return pr
}

// bar is one transfer's display.
type bar struct {
	p   *mpb.Progress
	b   *mpb.Bar
	off bool
}

func (pr *progress) start(name string, d digest.Digest, size int64) *bar {
	return pr.startVerb("pulling", name, d, size)
}

func (pr *progress) startVerb(verb, name string, d digest.Digest, size int64) *bar {
	if pr == nil || pr.w == nil {
		return &bar{off: true}
	}
	short := d.Encoded()
	if len(short) > 12 {
		short = short[:12]
	}
	if !pr.term {
		fmt.Fprintf(pr.w, "cwrun: %s %s layer %s (%.1f MiB)\n", verb, name, short, float64(size)/(1<<20))
		return &bar{off: true}
	}
	p := mpb.New(mpb.WithOutput(pr.w), mpb.WithWidth(32))
	b := p.New(size, mpb.BarStyle(),
		mpb.PrependDecorators(decor.Name(verb+" "+short, decor.WCSyncSpaceR)),
		mpb.AppendDecorators(decor.CountersKibiByte("% .1f / % .1f", decor.WCSyncSpace), decor.Percentage(decor.WCSyncSpace)))
	return &bar{p: p, b: b}
}

func (b *bar) wrap(r io.Reader) io.Reader {
	if b.off {
		return r
	}
	return b.b.ProxyReader(r)
}

// done ends the bar; a failed transfer's bar stays where it stopped.
func (b *bar) done(ok bool) {
	if b.off {
		return
	}
	if ok {
		b.b.SetTotal(-1, true)
	} else {
		b.b.Abort(false)
	}
	b.p.Wait()
}
