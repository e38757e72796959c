package main

import (
	"fmt"
	"io"
	"os"

	"github.com/cwrun/cwrun/build"
	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"
	"golang.org/x/term"
)

// stageNames are the seal's stages as a user reads them.
var stageNames = map[string]string{
	"read":    "flattening the image's layers",
	"measure": "sizing the disk",
	"mkfs":    "making the ext4 file system",
	"encrypt": "encrypting the disk",
	"hash":    "hashing the sealed layer",
	"write":   "writing the sealed image",
}

// progress shows the seal's stages: spinners on a terminal, one plain
// line per stage otherwise, nothing when quiet.
type progress struct {
	w     io.Writer
	quiet bool
	p     *mpb.Progress
	bar   *mpb.Bar
}

func newProgress(w io.Writer, quiet bool) *progress {
	pr := &progress{w: w, quiet: quiet}
	if f, ok := w.(*os.File); ok && !quiet && term.IsTerminal(int(f.Fd())) {
		pr.p = mpb.New(mpb.WithOutput(w), mpb.WithWidth(24))
	}
	return pr
}

func (pr *progress) event(e build.Event) {
	if pr.quiet || (e.End && pr.p == nil) {
		return
	}
	name := stageNames[e.Stage]
	if name == "" {
		name = e.Stage
	}
	if pr.p == nil {
		if e.Done == 0 {
			fmt.Fprintf(pr.w, "cwrun: %s\n", name)
		}
		return
	}
	switch {
	case e.End:
		if pr.bar != nil {
			pr.bar.SetTotal(-1, true)
			pr.bar = nil
		}
	case e.Done == 0:
		pr.bar = pr.p.New(0, mpb.SpinnerStyle(),
			mpb.PrependDecorators(decor.Name(name, decor.WCSyncSpaceR)),
			mpb.AppendDecorators(decor.Elapsed(decor.ET_STYLE_GO)),
			mpb.BarFillerClearOnComplete())
	}
}

func (pr *progress) close() {
	if pr.p != nil {
		if pr.bar != nil {
			pr.bar.Abort(false)
		}
		pr.p.Wait()
	}
}
