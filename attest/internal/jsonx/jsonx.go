// Package jsonx reads and writes the few JSON shapes on the key
// broker's hot path (JWKs, the attestation envelope, tokens, SEV-SNP
// evidence) without reflection. encoding/json scans a document once to
// validate it and again to decode it, and its reflection costs more
// than the scanning; on a handshake that moves 30 KiB of evidence
// written as integer arrays that was a millisecond per side.
//
// A Reader validates exactly what it reads, with encoding/json's rules:
// RFC 8259 grammar, no control characters in strings, nesting at most
// 10000 deep, strings decoded as encoding/json decodes them (escapes,
// surrogate pairs, invalid UTF-8 and lone surrogates as U+FFFD). Member
// names match exactly, as JOSE's and serde's decoders match them;
// encoding/json's case-insensitive matching is not reproduced.
package jsonx

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strconv"
	"unicode/utf8"
)

// maxDepth is encoding/json's nesting limit.
const maxDepth = 10000

// Reader reads one JSON text from a byte slice. The zero value is not
// usable; make one with NewReader.
type Reader struct {
	b     []byte
	i     int
	depth int
}

// NewReader reads b.
func NewReader(b []byte) *Reader { return &Reader{b: b} }

// SyntaxError says where a document stopped being what was expected.
type SyntaxError struct {
	Offset int
	Msg    string
}

func (e *SyntaxError) Error() string {
	return fmt.Sprintf("invalid JSON at offset %d: %s", e.Offset, e.Msg)
}

func (r *Reader) errorf(format string, args ...any) error {
	return &SyntaxError{Offset: r.i, Msg: fmt.Sprintf(format, args...)}
}

func (r *Reader) space() {
	for r.i < len(r.b) {
		switch r.b[r.i] {
		case ' ', '\t', '\n', '\r':
			r.i++
		default:
			return
		}
	}
}

// Peek returns the first byte of the next value ('{', '[', '"', 't',
// 'f', 'n', '-' or a digit), or 0 at the end of the input.
func (r *Reader) Peek() byte {
	r.space()
	if r.i >= len(r.b) {
		return 0
	}
	return r.b[r.i]
}

// End checks that only whitespace is left.
func (r *Reader) End() error {
	r.space()
	if r.i != len(r.b) {
		return r.errorf("data after the JSON value")
	}
	return nil
}

// Null consumes a null and reports whether there was one.
func (r *Reader) Null() bool {
	r.space()
	if len(r.b)-r.i >= 4 && string(r.b[r.i:r.i+4]) == "null" {
		r.i += 4
		return true
	}
	return false
}

// Object reads an object, calling member for each member's name with
// the reader positioned at its value, which member must consume (with
// Skip if it has no use for it). Duplicate names reach member again.
func (r *Reader) Object(member func(name string) error) error {
	if r.Peek() != '{' {
		return r.errorf("want an object")
	}
	if r.depth++; r.depth > maxDepth {
		return r.errorf("nested too deeply")
	}
	r.i++
	if r.Peek() == '}' {
		r.i++
		r.depth--
		return nil
	}
	for {
		if r.Peek() != '"' {
			return r.errorf("want a member name")
		}
		name, err := r.String()
		if err != nil {
			return err
		}
		if r.Peek() != ':' {
			return r.errorf("want ':' after member %q", name)
		}
		r.i++
		if err := member(name); err != nil {
			return err
		}
		switch r.Peek() {
		case ',':
			r.i++
		case '}':
			r.i++
			r.depth--
			return nil
		default:
			return r.errorf("want ',' or '}' after member %q", name)
		}
	}
}

// Array reads an array, calling elem with the reader positioned at each
// element, which elem must consume.
func (r *Reader) Array(elem func() error) error {
	if r.Peek() != '[' {
		return r.errorf("want an array")
	}
	if r.depth++; r.depth > maxDepth {
		return r.errorf("nested too deeply")
	}
	r.i++
	if r.Peek() == ']' {
		r.i++
		r.depth--
		return nil
	}
	for {
		if err := elem(); err != nil {
			return err
		}
		switch r.Peek() {
		case ',':
			r.i++
		case ']':
			r.i++
			r.depth--
			return nil
		default:
			return r.errorf("want ',' or ']' in an array")
		}
	}
}

// String reads a string and returns it decoded.
func (r *Reader) String() (string, error) {
	raw, plain, err := r.stringToken()
	if err != nil {
		return "", err
	}
	if plain {
		return string(raw[1 : len(raw)-1]), nil
	}
	// Escapes or non-ASCII: encoding/json decides what they mean.
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return "", r.errorf("string: %v", err)
	}
	return s, nil
}

// stringToken scans a string and returns it with its quotes; plain
// says it is printable ASCII without escapes, so its bytes are its
// value.
func (r *Reader) stringToken() (raw []byte, plain bool, err error) {
	r.space()
	start := r.i
	if r.i >= len(r.b) || r.b[r.i] != '"' {
		return nil, false, r.errorf("want a string")
	}
	r.i++
	plain = true
	for r.i < len(r.b) {
		c := r.b[r.i]
		switch {
		case c == '"':
			r.i++
			return r.b[start:r.i], plain, nil
		case c == '\\':
			plain = false
			r.i++
			if r.i >= len(r.b) {
				return nil, false, r.errorf("unterminated string")
			}
			switch r.b[r.i] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
				r.i++
			case 'u':
				if len(r.b)-r.i < 5 || !isHex(r.b[r.i+1]) || !isHex(r.b[r.i+2]) || !isHex(r.b[r.i+3]) || !isHex(r.b[r.i+4]) {
					return nil, false, r.errorf("bad \\u escape in a string")
				}
				r.i += 5
			default:
				return nil, false, r.errorf("bad escape in a string")
			}
		case c < 0x20:
			return nil, false, r.errorf("control character in a string")
		default:
			if c >= 0x80 {
				plain = false
			}
			r.i++
		}
	}
	return nil, false, r.errorf("unterminated string")
}

func isHex(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F'
}

// Bool reads true or false.
func (r *Reader) Bool() (bool, error) {
	r.space()
	switch {
	case len(r.b)-r.i >= 4 && string(r.b[r.i:r.i+4]) == "true":
		r.i += 4
		return true, nil
	case len(r.b)-r.i >= 5 && string(r.b[r.i:r.i+5]) == "false":
		r.i += 5
		return false, nil
	}
	return false, r.errorf("want true or false")
}

// Uint reads a non-negative integer of at most max, as encoding/json
// reads one into an unsigned integer type: no sign, fraction or
// exponent.
func (r *Reader) Uint(max uint64) (uint64, error) {
	r.space()
	start := r.i
	if err := r.number(); err != nil {
		return 0, err
	}
	tok := r.b[start:r.i]
	v, err := strconv.ParseUint(string(tok), 10, 64)
	if err != nil || v > max {
		return 0, &SyntaxError{Offset: start, Msg: fmt.Sprintf("number %s is not an integer 0 to %d", tok, max)}
	}
	return v, nil
}

// Int reads an integer that fits an int64.
func (r *Reader) Int() (int64, error) {
	r.space()
	start := r.i
	if err := r.number(); err != nil {
		return 0, err
	}
	tok := r.b[start:r.i]
	v, err := strconv.ParseInt(string(tok), 10, 64)
	if err != nil {
		return 0, &SyntaxError{Offset: start, Msg: fmt.Sprintf("number %s is not a 64-bit integer", tok)}
	}
	return v, nil
}

// number scans a number by RFC 8259's grammar.
func (r *Reader) number() error {
	b, i := r.b, r.i
	if i < len(b) && b[i] == '-' {
		i++
	}
	switch {
	case i < len(b) && b[i] == '0':
		i++
	case i < len(b) && b[i] >= '1' && b[i] <= '9':
		for i < len(b) && b[i] >= '0' && b[i] <= '9' {
			i++
		}
	default:
		return r.errorf("want a number")
	}
	if i < len(b) && b[i] == '.' {
		i++
		if i >= len(b) || b[i] < '0' || b[i] > '9' {
			r.i = i
			return r.errorf("want a digit after the decimal point")
		}
		for i < len(b) && b[i] >= '0' && b[i] <= '9' {
			i++
		}
	}
	if i < len(b) && (b[i] == 'e' || b[i] == 'E') {
		i++
		if i < len(b) && (b[i] == '+' || b[i] == '-') {
			i++
		}
		if i >= len(b) || b[i] < '0' || b[i] > '9' {
			r.i = i
			return r.errorf("want a digit in the exponent")
		}
		for i < len(b) && b[i] >= '0' && b[i] <= '9' {
			i++
		}
	}
	r.i = i
	return nil
}

// Bytes reads an array of integers 0-255 into bytes: how serde writes
// a Rust byte array. It scans the array itself, as the arrays are most
// of an SEV-SNP evidence document.
func (r *Reader) Bytes() ([]byte, error) {
	if r.Peek() != '[' {
		return nil, r.errorf("want an array of byte values")
	}
	b := r.b
	i := r.i + 1
	// A valid byte array holds no ']' before its end, so the first one
	// bounds it: its length bounds the element count ("0," per byte).
	n := bytes.IndexByte(b[i:], ']')
	if n < 0 {
		return nil, r.errorf("unterminated byte array")
	}
	end := i + n
	// seg ends with the ']', which is neither digit, space nor comma:
	// the loops below stop on it without checking where they are.
	seg := b[:end+1]
	out := make([]byte, 0, n/2+1)
	bad := func(at int) ([]byte, error) {
		r.i = at
		return nil, r.errorf("an element of a byte array is not an integer 0-255")
	}
	for isSpace(seg[i]) {
		i++
	}
	if i == end {
		r.i = end + 1
		return out, nil
	}
	for {
		start := i
		d := seg[i] - '0'
		if d > 9 {
			return bad(start)
		}
		v := int(d)
		i++
		// Up to three digits, no leading zero (JSON), at most 255, and
		// the number must end there: "1.5" and "1e2" are not bytes.
		if d = seg[i] - '0'; d <= 9 {
			if v == 0 {
				return bad(start)
			}
			v = v*10 + int(d)
			i++
			if d = seg[i] - '0'; d <= 9 {
				v = v*10 + int(d)
				i++
				if seg[i]-'0' <= 9 || v > 255 {
					return bad(start)
				}
			}
		}
		out = append(out, byte(v))
		for isSpace(seg[i]) {
			i++
		}
		switch {
		case seg[i] == ',':
			i++
			for isSpace(seg[i]) {
				i++
			}
			if i == end {
				return bad(i)
			}
		case i == end:
			r.i = end + 1
			return out, nil
		default:
			return bad(i)
		}
	}
}

func isSpace(c byte) bool { return c == ' ' || c == '\t' || c == '\n' || c == '\r' }

// Skip reads and validates one value of any kind.
func (r *Reader) Skip() error {
	switch c := r.Peek(); {
	case c == '{':
		return r.Object(func(string) error { return r.Skip() })
	case c == '[':
		return r.skipArray()
	case c == '"':
		_, _, err := r.stringToken()
		return err
	case c == 't' || c == 'f':
		_, err := r.Bool()
		return err
	case c == 'n':
		if !r.Null() {
			return r.errorf("want null")
		}
		return nil
	case c == '-' || c >= '0' && c <= '9':
		return r.number()
	case c == 0:
		return r.errorf("unexpected end of input")
	default:
		return r.errorf("unexpected character %q", c)
	}
}

// skipArray is Array(r.Skip) with numbers, the bulk of SNP evidence,
// scanned in line rather than through a call per element.
func (r *Reader) skipArray() error {
	if r.depth++; r.depth > maxDepth {
		return r.errorf("nested too deeply")
	}
	b := r.b
	r.i++ // '['
	if r.Peek() == ']' {
		r.i++
		r.depth--
		return nil
	}
	if n, ok := intArray(b[r.i:]); ok {
		r.i += n
		r.depth--
		return nil
	}
	for {
		i := r.i
		if i < len(b) && (b[i]-'0' <= 9 || b[i] == '-') {
			if err := r.number(); err != nil {
				return err
			}
		} else if err := r.Skip(); err != nil {
			return err
		}
		i = r.i
		for i < len(b) && isSpace(b[i]) {
			i++
		}
		if i >= len(b) {
			r.i = i
			return r.errorf("want ',' or ']' in an array")
		}
		switch b[i] {
		case ',':
			i++
			for i < len(b) && isSpace(b[i]) {
				i++
			}
			r.i = i
		case ']':
			r.i = i + 1
			r.depth--
			return nil
		default:
			r.i = i
			return r.errorf("want ',' or ']' in an array")
		}
	}
}

// intArray recognises, at the start of b (just after a '['), the rest
// of an array that holds only integers, and returns its length with the
// closing ']'. Anything else (fractions, exponents, nested values,
// errors) answers false, for the general scan to take over and to
// report.
func intArray(b []byte) (int, bool) {
	n := bytes.IndexByte(b, ']')
	if n < 0 {
		return 0, false
	}
	// seg ends with the ']', which stops every loop below.
	seg := b[:n+1]
	i := 0
	for {
		for isSpace(seg[i]) {
			i++
		}
		if seg[i] == '-' {
			i++
		}
		switch d := seg[i]; {
		case d == '0':
			i++
		case d-'1' <= 8:
			i++
			for seg[i]-'0' <= 9 {
				i++
			}
		default:
			return 0, false
		}
		for isSpace(seg[i]) {
			i++
		}
		switch {
		case seg[i] == ',':
			i++
		case i == n:
			return n + 1, true
		default:
			return 0, false
		}
	}
}

// Raw reads and validates one value and returns its bytes (a slice of
// the input, not a copy).
func (r *Reader) Raw() ([]byte, error) {
	r.space()
	start := r.i
	if err := r.Skip(); err != nil {
		return nil, err
	}
	return r.b[start:r.i], nil
}

// Valid reports whether b is one JSON value, as json.Valid does.
func Valid(b []byte) bool {
	r := NewReader(b)
	return r.Skip() == nil && r.End() == nil
}

// AppendString appends s as a JSON string, escaped as encoding/json
// escapes it (HTML-safe, U+2028 and U+2029 escaped, invalid UTF-8 as
// U+FFFD), so that output built with it reads back the same everywhere.
func AppendString(dst []byte, s string) []byte {
	dst = append(dst, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' && c != '<' && c != '>' && c != '&' {
				i++
				continue
			}
			dst = append(dst, s[start:i]...)
			switch c {
			case '"', '\\':
				dst = append(dst, '\\', c)
			case '\n':
				dst = append(dst, '\\', 'n')
			case '\r':
				dst = append(dst, '\\', 'r')
			case '\t':
				dst = append(dst, '\\', 't')
			case '\b':
				dst = append(dst, '\\', 'b')
			case '\f':
				dst = append(dst, '\\', 'f')
			default:
				dst = append(dst, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xF])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			dst = append(dst, s[start:i]...)
			dst = append(dst, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			dst = append(dst, s[start:i]...)
			dst = append(dst, '\\', 'u', '2', '0', '2', hexDigits[r&0xF])
			i += size
			start = i
			continue
		}
		i += size
	}
	dst = append(dst, s[start:]...)
	return append(dst, '"')
}

const hexDigits = "0123456789abcdef"
