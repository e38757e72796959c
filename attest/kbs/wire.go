package kbs

import (
	"bytes"
	"fmt"
	"net/http"
	"slices"
	"strconv"

	"github.com/cwrun/cwrun/attest"
	"github.com/cwrun/cwrun/attest/internal/jsonx"
)

// The handshake's messages, read and written without reflection: every
// handshake passes through these, and encoding/json's reflection (and,
// for an attestation carrying 30 KiB of SNP evidence, its second scan
// of the whole body) cost more than the rest of the broker's parsing.
// Member names match exactly, as Trustee's serde-based KBS matches them;
// unknown members are skipped, as serde skips them; a null leaves a
// member at its zero value, as encoding/json does.

// decodeAuthRequest reads the body of POST /auth.
func decodeAuthRequest(b []byte) (attest.Request, error) {
	var req attest.Request
	r := jsonx.NewReader(b)
	err := r.Object(func(name string) error {
		var err error
		switch name {
		case "version":
			err = readString(r, &req.Version)
		case "tee":
			err = readString(r, &req.Tee)
		case "extra-params":
			req.ExtraParams, err = r.Raw()
		default:
			err = r.Skip()
		}
		return err
	})
	if err == nil {
		err = r.End()
	}
	if err != nil {
		return req, badRequest("auth request is not valid JSON of the expected shape: %v", err)
	}
	return req, nil
}

// decodeAttestation reads the body of POST /attest. The evidence and
// the TEE key are slices of b, not copies.
func decodeAttestation(b []byte) (attest.Attestation, error) {
	var at attest.Attestation
	r := jsonx.NewReader(b)
	err := r.Object(func(name string) error {
		switch name {
		case "init-data":
			if r.Null() {
				at.InitData = nil
				return nil
			}
			id := &attest.InitData{}
			at.InitData = id
			return r.Object(func(name string) error {
				switch name {
				case "format":
					return readString(r, &id.Format)
				case "body":
					return readString(r, &id.Body)
				}
				return r.Skip()
			})
		case "runtime-data":
			if r.Null() {
				return nil
			}
			return r.Object(func(name string) error {
				switch name {
				case "nonce":
					return readString(r, &at.RuntimeData.Nonce)
				case "tee-pubkey":
					return readRaw(r, (*[]byte)(&at.RuntimeData.TeePubKey))
				}
				return r.Skip()
			})
		case "tee-evidence":
			if r.Null() {
				return nil
			}
			return r.Object(func(name string) error {
				switch name {
				case "primary_evidence":
					return readRaw(r, (*[]byte)(&at.TeeEvidence.Primary))
				case "additional_evidence":
					return readString(r, &at.TeeEvidence.Additional)
				}
				return r.Skip()
			})
		}
		return r.Skip()
	})
	if err == nil {
		err = r.End()
	}
	if err != nil {
		return at, badRequest("attestation is not valid JSON of the expected shape: %v", err)
	}
	return at, nil
}

// readString reads a string or null (which leaves *dst alone).
func readString(r *jsonx.Reader, dst *string) error {
	if r.Null() {
		return nil
	}
	s, err := r.String()
	if err != nil {
		return err
	}
	*dst = s
	return nil
}

// readRaw reads any value; null leaves *dst nil, as encoding/json
// leaves a json.RawMessage holding "null" (which the callers treat as
// absent either way).
func readRaw(r *jsonx.Reader, dst *[]byte) error {
	v, err := r.Raw()
	if err != nil {
		return err
	}
	*dst = v
	return nil
}

// appendChallenge writes the answer to /auth.
func appendChallenge(dst []byte, nonce string) []byte {
	dst = append(dst, `{"nonce":`...)
	dst = jsonx.AppendString(dst, nonce)
	return append(dst, `,"extra-params":""}`...)
}

// appendAttestResponse writes the answer to /attest.
func appendAttestResponse(dst []byte, token string) []byte {
	dst = append(dst, `{"token":`...)
	dst = jsonx.AppendString(dst, token)
	return append(dst, '}')
}

// writeRawJSON answers 200 with a body already encoded.
func writeRawJSON(w http.ResponseWriter, body []byte) {
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(body)
}

// appendJSON writes the token's claims as encoding/json would (same
// members and order, map keys sorted), without reflection.
func (c *tokenClaims) appendJSON(dst []byte) ([]byte, error) {
	dst = append(dst, `{"eat_profile":`...)
	dst = jsonx.AppendString(dst, c.Profile)
	dst = append(dst, `,"iat":`...)
	dst = strconv.AppendInt(dst, c.IssuedAt, 10)
	dst = append(dst, `,"nbf":`...)
	dst = strconv.AppendInt(dst, c.NotBefore, 10)
	dst = append(dst, `,"exp":`...)
	dst = strconv.AppendInt(dst, c.Expires, 10)
	dst = append(dst, `,"ear.verifier-id":{"developer":`...)
	dst = jsonx.AppendString(dst, c.VerifierID.Developer)
	dst = append(dst, `,"build":`...)
	dst = jsonx.AppendString(dst, c.VerifierID.Build)
	dst = append(dst, `},"submods":`...)
	if c.Submods == nil {
		dst = append(dst, "null"...)
	} else {
		dst = append(dst, '{')
		for i, name := range sortedKeys(c.Submods) {
			if i > 0 {
				dst = append(dst, ',')
			}
			sm := c.Submods[name]
			dst = jsonx.AppendString(dst, name)
			dst = append(dst, `:{"ear.status":`...)
			dst = jsonx.AppendString(dst, sm.Status)
			dst = append(dst, `,"ear.veraison.annotated-evidence":`...)
			if sm.Evidence == nil {
				dst = append(dst, "null"...)
			} else {
				dst = append(dst, '{')
				for j, k := range sortedKeys(sm.Evidence) {
					if j > 0 {
						dst = append(dst, ',')
					}
					dst = jsonx.AppendString(dst, k)
					dst = append(dst, ':')
					v := sm.Evidence[k]
					if len(v) == 0 {
						dst = append(dst, "null"...)
						continue
					}
					// Raw claims must be one JSON value, as encoding/json
					// insists when it marshals a RawMessage; they are
					// copied as they are (encoding/json would also strip
					// their inner whitespace, which changes nothing).
					if !jsonx.Valid(v) {
						return nil, fmt.Errorf("token claims: %s evidence is not one JSON value", k)
					}
					dst = append(dst, bytes.TrimSpace(v)...)
				}
				dst = append(dst, '}')
			}
			dst = append(dst, '}')
		}
		dst = append(dst, '}')
	}
	dst = append(dst, `,"cwrun":`...)
	dst = c.Cwrun.appendJSON(dst)
	return append(dst, '}'), nil
}

func (c *cwrunClaims) appendJSON(dst []byte) []byte {
	dst = append(dst, `{"tee":`...)
	dst = jsonx.AppendString(dst, c.Tee)
	dst = append(dst, `,"insecure":`...)
	dst = strconv.AppendBool(dst, c.Insecure)
	dst = append(dst, `,"values":`...)
	dst = appendStringMap(dst, c.Values)
	return append(dst, '}')
}

// appendStringMap writes a map[string]string as encoding/json does.
func appendStringMap(dst []byte, m map[string]string) []byte {
	if m == nil {
		return append(dst, "null"...)
	}
	dst = append(dst, '{')
	for i, k := range sortedKeys(m) {
		if i > 0 {
			dst = append(dst, ',')
		}
		dst = jsonx.AppendString(dst, k)
		dst = append(dst, ':')
		dst = jsonx.AppendString(dst, m[k])
	}
	return append(dst, '}')
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// decodeTokenView reads what the broker needs of a token's claims. The
// claims are the broker's own (their signature or the cookie's AEAD was
// checked before), so only their shape is checked here.
func decodeTokenView(payload []byte) (*tokenView, error) {
	var c tokenView
	r := jsonx.NewReader(payload)
	int64Member := func(dst *int64) error {
		if r.Null() {
			return nil
		}
		v, err := r.Int()
		*dst = v
		return err
	}
	err := r.Object(func(name string) error {
		switch name {
		case "iat":
			return int64Member(&c.IssuedAt)
		case "exp":
			return int64Member(&c.Expires)
		case "submods":
			return objectOrNull(r, func(name string) error {
				if name != earSubmod {
					return r.Skip()
				}
				return objectOrNull(r, func(name string) error {
					if name != "ear.veraison.annotated-evidence" {
						return r.Skip()
					}
					return objectOrNull(r, func(name string) error {
						if name != runtimeDataKey {
							return r.Skip()
						}
						return objectOrNull(r, func(name string) error {
							if name != "tee-pubkey" {
								return r.Skip()
							}
							return readRaw(r, (*[]byte)(&c.Submods.CPU0.Evidence.RuntimeData.TeePubKey))
						})
					})
				})
			})
		case "cwrun":
			return objectOrNull(r, func(name string) error {
				switch name {
				case "tee":
					return readString(r, &c.Cwrun.Tee)
				case "insecure":
					if r.Null() {
						return nil
					}
					v, err := r.Bool()
					c.Cwrun.Insecure = v
					return err
				case "values":
					if r.Null() {
						return nil
					}
					if c.Cwrun.Values == nil {
						c.Cwrun.Values = map[string]string{}
					}
					return r.Object(func(name string) error {
						var v string
						if err := readString(r, &v); err != nil {
							return err
						}
						c.Cwrun.Values[name] = v
						return nil
					})
				}
				return r.Skip()
			})
		}
		return r.Skip()
	})
	if err == nil {
		err = r.End()
	}
	if err != nil {
		return nil, err
	}
	return &c, nil
}

func objectOrNull(r *jsonx.Reader, member func(name string) error) error {
	if r.Null() {
		return nil
	}
	return r.Object(member)
}
