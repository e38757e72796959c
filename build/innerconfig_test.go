package build

import (
	"testing"

	"github.com/cwrun/cwrun/sealed"
	imgspecv1 "github.com/opencontainers/image-spec/specs-go/v1"
)

func TestInnerConfigOverridesLabel(t *testing.T) {
	src := &imgspecv1.Image{}
	src.Config.Labels = map[string]string{"a": "b", sealed.LabelAllowOverrides: "true"} // smuggled in by the source image
	src.Config.Cmd = []string{"/bin/sh"}

	off := innerConfig(src, false)
	if _, ok := off.Config.Labels[sealed.LabelAllowOverrides]; ok {
		t.Errorf("a label from the source image turned overrides on: %v", off.Config.Labels)
	}
	if off.Config.Labels["a"] != "b" || off.Config.Cmd[0] != "/bin/sh" {
		t.Errorf("the image's own config was lost: %+v", off.Config)
	}
	if on := innerConfig(src, true); on.Config.Labels[sealed.LabelAllowOverrides] != "true" {
		t.Errorf("--allow-overrides did not set the label: %v", on.Config.Labels)
	}
	if src.Config.Labels[sealed.LabelAllowOverrides] != "true" || len(src.Config.Labels) != 2 {
		t.Errorf("the source config was modified: %v", src.Config.Labels)
	}
	if c := innerConfig(&imgspecv1.Image{}, false); c.Config.Labels != nil {
		t.Errorf("labels appeared from nowhere: %v", c.Config.Labels)
	}
}
