package jsonx

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

// The reader must agree with encoding/json on everything it accepts:
// these tests compare the two, and the fuzz targets keep comparing.

var seeds = []string{
	`{}`, `[]`, `""`, `0`, `-0`, `1.5e-3`, `true`, `false`, `null`,
	`{"a":[1,2,{"b":null}],"c":"d\u00e9\n"}`, ` [ 1 , 2 ] `, `"\ud83d\ude00"`, `"\ud800"`,
	`"\u2028<>&"`, "\"\xff\xfe\"", `01`, `1.`, `.5`, `1e`, `+1`, `[1,]`, `{"a":1,}`, `{"a" 1}`,
	`{1:2}`, `"a` + "\x01" + `"`, `"\x"`, `[` + strings.Repeat("[", 10) + strings.Repeat("]", 11),
	`nul`, `tru`, `[1 2]`, `{"a":1}{}`, "\t\n\r 7 \t", `[0,255,256]`, `[ 1 ,2]`, `"\/"`, `1E+2`,
}

func FuzzValid(f *testing.F) {
	for _, s := range seeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if got, want := Valid(b), json.Valid(b); got != want {
			t.Fatalf("Valid(%q) = %v, encoding/json says %v", b, got, want)
		}
	})
}

func TestDepthLimit(t *testing.T) {
	deep := strings.Repeat("[", maxDepth) + strings.Repeat("]", maxDepth)
	if !Valid([]byte(deep)) || !json.Valid([]byte(deep)) {
		t.Errorf("nesting of %d refused", maxDepth)
	}
	deeper := "[" + deep + "]"
	if Valid([]byte(deeper)) || json.Valid([]byte(deeper)) {
		t.Errorf("nesting of %d accepted (encoding/json: %v)", maxDepth+1, json.Valid([]byte(deeper)))
	}
}

func FuzzString(f *testing.F) {
	for _, s := range seeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		r := NewReader(b)
		got, err := r.String()
		if err == nil {
			err = r.End()
		}
		var want string
		werr := json.Unmarshal(b, &want)
		if bytes.Equal(bytes.TrimSpace(b), []byte("null")) {
			// encoding/json leaves a null alone; the reader wants a string.
			if err == nil {
				t.Fatal("String(null) succeeded")
			}
			return
		}
		if (err == nil) != (werr == nil) {
			t.Fatalf("String(%q): err %v, encoding/json: %v", b, err, werr)
		}
		if err == nil && got != want {
			t.Fatalf("String(%q) = %q, encoding/json: %q", b, got, want)
		}
	})
}

func FuzzAppendString(f *testing.F) {
	for _, s := range []string{"", "abc", "a\"b\\c", "\x00\x1f\x7f", "<a&b>", "\u2028\u2029", "\xff", "é日本\U0001F600", "\b\f\n\r\t"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		want, _ := json.Marshal(s)
		if got := AppendString(nil, s); !bytes.Equal(got, want) {
			t.Fatalf("AppendString(%q) = %s, encoding/json: %s", s, got, want)
		}
	})
}

func FuzzNumbers(f *testing.F) {
	for _, s := range []string{"0", "255", "256", "-1", "1.0", "1e2", "18446744073709551615", "18446744073709551616", "-9223372036854775808", "007", " 5 "} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		r := NewReader(b)
		got, err := r.Uint(255)
		if err == nil {
			err = r.End()
		}
		var want uint8
		werr := json.Unmarshal(b, &want)
		if (err == nil) != (werr == nil) || (err == nil && got != uint64(want)) {
			// encoding/json leaves a null alone; the reader wants a number.
			if !(bytes.Equal(bytes.TrimSpace(b), []byte("null")) && err != nil) {
				t.Fatalf("Uint(%q) = %d, %v; encoding/json: %d, %v", b, got, err, want, werr)
			}
		}
		r = NewReader(b)
		gi, err := r.Int()
		if err == nil {
			err = r.End()
		}
		var wi int64
		werr = json.Unmarshal(b, &wi)
		if (err == nil) != (werr == nil) || (err == nil && gi != wi) {
			if !(bytes.Equal(bytes.TrimSpace(b), []byte("null")) && err != nil) {
				t.Fatalf("Int(%q) = %d, %v; encoding/json: %d, %v", b, gi, err, wi, werr)
			}
		}
	})
}

func FuzzBytes(f *testing.F) {
	for _, s := range []string{"[]", "[0]", "[0,1,255]", " [ 1 , 2 ] ", "[256]", "[01]", "[1.0]", "[1e1]", "[-1]", "[1,]", "[", "[1", `["1"]`, "[0255]", "[1000]"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		r := NewReader(b)
		got, err := r.Bytes()
		if err == nil {
			err = r.End()
		}
		var ints []int
		werr := json.Unmarshal(b, &ints)
		if werr == nil {
			if ints == nil {
				werr = json.Unmarshal([]byte("x"), &ints) // null: not a byte array
			}
			for _, v := range ints {
				if v < 0 || v > 255 {
					werr = json.Unmarshal([]byte("x"), &ints)
				}
			}
		}
		// encoding/json refuses fractions and exponents for integer
		// types, as the reader does; it takes -0 for 0, which serde's
		// byte arrays never hold and the reader refuses.
		if err == nil && werr != nil || err != nil && werr == nil && !bytes.Contains(b, []byte("-")) {
			t.Fatalf("Bytes(%q): err %v; encoding/json: %v (%v)", b, err, werr, ints)
		}
		if err == nil {
			if len(got) != len(ints) {
				t.Fatalf("Bytes(%q) = %v, encoding/json: %v", b, got, ints)
			}
			for i := range got {
				if int(got[i]) != ints[i] {
					t.Fatalf("Bytes(%q) = %v, encoding/json: %v", b, got, ints)
				}
			}
		}
	})
}

func TestObject(t *testing.T) {
	doc := `{"a":"x","b":[1,2],"c":{"d":true},"a":"y","e":null,"f":-12}`
	r := NewReader([]byte(doc))
	var a string
	var n int64
	var names []string
	err := r.Object(func(name string) error {
		names = append(names, name)
		switch name {
		case "a":
			s, err := r.String()
			a = s
			return err
		case "f":
			v, err := r.Int()
			n = v
			return err
		case "e":
			if !r.Null() {
				t.Error("e is not null")
			}
			return nil
		}
		return r.Skip()
	})
	if err != nil || r.End() != nil {
		t.Fatal(err)
	}
	if a != "y" || n != -12 || strings.Join(names, ",") != "a,b,c,a,e,f" {
		t.Errorf("a=%q n=%d names=%v", a, n, names)
	}
	for _, bad := range []string{`{"a":1`, `{"a":1,}`, `{"a"}`, `{a:1}`, `[1]`, `{"a":1 "b":2}`} {
		r := NewReader([]byte(bad))
		if err := r.Object(func(string) error { return r.Skip() }); err == nil && r.End() == nil {
			t.Errorf("Object(%s) accepted", bad)
		}
	}
	r = NewReader([]byte(`{"a":1}  x`))
	if err := r.Object(func(string) error { return r.Skip() }); err != nil {
		t.Fatal(err)
	}
	if err := r.End(); err == nil || !strings.Contains(err.Error(), "offset 9") {
		t.Errorf("End = %v, want trailing data at offset 9", err)
	}
}

// byteDoc is an SNP-evidence-like document: mostly integer arrays.
func byteDoc() []byte {
	var b bytes.Buffer
	b.WriteString(`{"report":{"data":[`)
	for i := range 5000 {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(strconvItoa(i % 256))
	}
	b.WriteString(`]},"name":"x"}`)
	return b.Bytes()
}

func strconvItoa(i int) string {
	out, _ := json.Marshal(i)
	return string(out)
}

func BenchmarkSkip(b *testing.B) {
	doc := byteDoc()
	b.SetBytes(int64(len(doc)))
	b.Run("jsonx", func(b *testing.B) {
		for b.Loop() {
			if !Valid(doc) {
				b.Fatal("invalid")
			}
		}
	})
	b.Run("encoding-json", func(b *testing.B) {
		for b.Loop() {
			if !json.Valid(doc) {
				b.Fatal("invalid")
			}
		}
	})
}
