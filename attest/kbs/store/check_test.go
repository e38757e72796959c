package store

import (
	"strings"
	"testing"
	"time"
)

func TestCheckText(t *testing.T) {
	for _, c := range []struct {
		in   string
		want string // "" for no error
	}{
		{"default/key/one", ""},
		{"ünïcode ✓", ""},
		{"", "is empty"},
		{"a\x00b", "NUL"},
		{"bad \xff utf8", "UTF-8"},
	} {
		err := CheckText("thing", c.in)
		switch {
		case c.want == "" && err != nil:
			t.Errorf("CheckText(%q) = %v, want nil", c.in, err)
		case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), "thing")):
			t.Errorf("CheckText(%q) = %v, want an error naming the thing and mentioning %q", c.in, err, c.want)
		}
	}
}

func TestCheckWorkload(t *testing.T) {
	good := Workload{ID: "w", Tee: "snp", References: map[string][]string{"m": {"", "aa"}}, CPUs: 1, MemoryMiB: 512}
	if err := CheckWorkload(good); err != nil {
		t.Fatalf("CheckWorkload(good) = %v", err)
	}
	for name, mutate := range map[string]func(w *Workload){
		"empty id":        func(w *Workload) { w.ID = "" },
		"empty tee":       func(w *Workload) { w.Tee = "" },
		"NUL policy":      func(w *Workload) { w.Policy = "p\x00" },
		"empty claim":     func(w *Workload) { w.References = map[string][]string{"": {"x"}} },
		"NUL value":       func(w *Workload) { w.References = map[string][]string{"m": {"a\x00"}} },
		"invalid utf8 id": func(w *Workload) { w.ID = "\xfe" },
		"negative cpus":   func(w *Workload) { w.CPUs = -1 },
		"negative memory": func(w *Workload) { w.MemoryMiB = -512 },
	} {
		w := good
		mutate(&w)
		if err := CheckWorkload(w); err == nil {
			t.Errorf("%s: CheckWorkload accepted %+v", name, w)
		}
	}
}

func TestCheckExpiry(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	if err := CheckExpiry(now.Add(time.Nanosecond), now); err != nil {
		t.Errorf("future expiry refused: %v", err)
	}
	for _, exp := range []time.Time{now, now.Add(-time.Hour), {}} {
		if err := CheckExpiry(exp, now); err == nil {
			t.Errorf("CheckExpiry(%s) accepted an expiry not after now", exp)
		}
	}
}

func TestCreated(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 123456789, time.FixedZone("X", 7200))
	got := Created(Workload{}, now)
	if !got.Equal(now.Truncate(time.Microsecond)) || got.Location() != time.UTC {
		t.Errorf("Created(zero) = %s, want now in UTC to the µs", got)
	}
	set := now.Add(-48 * time.Hour)
	got = Created(Workload{Created: set}, now)
	if !got.Equal(set.Truncate(time.Microsecond)) || got.Nanosecond()%1000 != 0 {
		t.Errorf("Created(set) = %s, want %s to the µs", got, set)
	}
}
