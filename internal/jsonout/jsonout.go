// Package jsonout is how Tandem writes JSON for people and scripts: the
// CLI's --json output and the admin API's bodies. It promises the two
// habits docs/cli-json.md documents: a list is [] when empty (never null)
// and a duration is Go duration text ("1.5s"), never an integer of
// nanoseconds. It imports only the standard library, so any package whose
// types are printed may use its Duration.
package jsonout

import (
	"encoding/json"
	"fmt"
	"io"
	"reflect"
	"time"
)

// Duration is a time.Duration that is JSON text ("1m30s"), as
// time.Duration.String writes it and time.ParseDuration reads it.
type Duration time.Duration

// D returns d as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

func (d Duration) String() string { return time.Duration(d).String() }

// MarshalJSON writes d as duration text.
func (d Duration) MarshalJSON() ([]byte, error) {
	return json.Marshal(time.Duration(d).String())
}

// UnmarshalJSON reads duration text (and, for older producers, an integer
// of nanoseconds).
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		var ns int64
		if err2 := json.Unmarshal(b, &ns); err2 != nil {
			return fmt.Errorf("a duration is text like \"1.5s\": %w", err)
		}
		*d = Duration(ns)
		return nil
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return err
	}
	*d = Duration(v)
	return nil
}

// Write encodes v to w, indented, with every nil slice and nil map that
// v reaches through exported fields written as [] and {}. v itself is not
// changed: the walk works on a copy (pointers are followed, and what they
// point to is copied too).
func Write(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.SetEscapeHTML(false) // statements and reasons carry < > & as they are
	return enc.Encode(Normalize(v))
}

// Normalize returns a copy of v in which every nil slice and nil map
// reachable through exported fields is empty instead of nil. Values whose
// type marshals itself (json.Marshaler, encoding.TextMarshaler) are left
// as they are.
func Normalize(v any) any {
	if v == nil {
		return nil
	}
	return fill(reflect.ValueOf(v)).Interface()
}

var (
	marshaler     = reflect.TypeFor[json.Marshaler]()
	textMarshaler = reflect.TypeFor[interface{ MarshalText() ([]byte, error) }]()
)

// fill returns a copy of v with nil slices and maps made empty.
func fill(v reflect.Value) reflect.Value {
	t := v.Type()
	if t.Implements(marshaler) || t.Implements(textMarshaler) ||
		reflect.PointerTo(t).Implements(marshaler) || reflect.PointerTo(t).Implements(textMarshaler) {
		return v
	}
	switch v.Kind() {
	case reflect.Pointer:
		if v.IsNil() {
			return v
		}
		p := reflect.New(t.Elem())
		p.Elem().Set(fill(v.Elem()))
		return p
	case reflect.Interface:
		if v.IsNil() {
			return v
		}
		out := reflect.New(t).Elem()
		out.Set(fill(v.Elem()))
		return out
	case reflect.Struct:
		out := reflect.New(t).Elem()
		out.Set(v)
		for i := range t.NumField() {
			if !t.Field(i).IsExported() {
				continue
			}
			out.Field(i).Set(fill(v.Field(i)))
		}
		return out
	case reflect.Slice:
		if t.Elem().Kind() == reflect.Uint8 { // []byte is base64 text
			return v
		}
		out := reflect.MakeSlice(t, v.Len(), v.Len())
		for i := range v.Len() {
			out.Index(i).Set(fill(v.Index(i)))
		}
		return out
	case reflect.Map:
		out := reflect.MakeMapWithSize(t, v.Len())
		for it := v.MapRange(); it.Next(); {
			out.SetMapIndex(it.Key(), fill(it.Value()))
		}
		return out
	case reflect.Array:
		out := reflect.New(t).Elem()
		for i := range v.Len() {
			out.Index(i).Set(fill(v.Index(i)))
		}
		return out
	}
	return v
}
