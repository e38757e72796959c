package main

import (
	"reflect"
	"strings"
	"testing"
)

func TestParseRefs(t *testing.T) {
	got, err := parseRefs([]string{"measurement=aa", "measurement=bb", " svn = 1 ", "host_data=x=y"})
	if err != nil {
		t.Fatal(err)
	}
	want := map[string][]string{"measurement": {"aa", "bb"}, "svn": {"1"}, "host_data": {"x=y"}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("parseRefs = %v, want %v", got, want)
	}
	for _, bad := range []string{"measurement", "=aa", "measurement=", " = "} {
		if _, err := parseRefs([]string{bad}); err == nil || !strings.Contains(err.Error(), "NAME=VALUE") {
			t.Errorf("parseRefs(%q): %v, want a NAME=VALUE error", bad, err)
		}
	}
	if m, err := parseRefs(nil); m != nil || err != nil {
		t.Errorf("parseRefs(nil) = %v, %v", m, err)
	}
}

func TestReadPassphraseFrom(t *testing.T) {
	for _, tt := range []struct {
		in, want string
		ok       bool
	}{
		{"secret\n", "secret", true},
		{"secret", "secret", true},
		{"sec ret\n\n", "sec ret\n", true}, // only one newline is dropped
		{"\n", "", false},
		{"", "", false},
		{strings.Repeat("a", 4097), "", false},
	} {
		got, err := readPassphraseFrom(strings.NewReader(tt.in), "stdin")
		if (err == nil) != tt.ok || string(got) != tt.want {
			t.Errorf("readPassphraseFrom(%.20q) = %q, %v", tt.in, got, err)
		}
	}
}
