package shadow

import (
	"encoding/binary"
	"math"
	"strconv"
	"strings"
)

// arrNode is one parsed array: either a sub-array (isArr) or an element.
type arrNode struct {
	isArr bool
	elems []arrNode
	null  bool
	val   string
}

// canonicalArray renders an array of elem elements: the optional dimension
// decoration verbatim, then the nested braces with every element
// canonicalised by the element rule and double-quoted.
func canonicalArray(elem uint32, bin bool, v []byte) (string, bool) {
	var (
		deco string
		root arrNode
		ok   bool
	)
	if bin {
		deco, root, ok = decodeBinaryArray(v)
	} else {
		deco, root, ok = parseArrayLiteral(string(v))
	}
	if !ok {
		return "", false
	}
	var b strings.Builder
	b.WriteString(deco)
	writeArray(&b, root, func(n arrNode) string {
		if bin {
			return Canonical(elem, 1, []byte(n.val))
		}
		return Canonical(elem, 0, []byte(n.val))
	})
	return b.String(), true
}

// writeArray serialises n deterministically: elements always quoted (with
// '"' and '\' backslash-escaped), NULL unquoted, no whitespace.
func writeArray(b *strings.Builder, n arrNode, elem func(arrNode) string) {
	if !n.isArr {
		if n.null {
			b.WriteString("NULL")
			return
		}
		s := elem(n)
		b.WriteByte('"')
		for i := 0; i < len(s); i++ {
			if s[i] == '"' || s[i] == '\\' {
				b.WriteByte('\\')
			}
			b.WriteByte(s[i])
		}
		b.WriteByte('"')
		return
	}
	b.WriteByte('{')
	for i, e := range n.elems {
		if i > 0 {
			b.WriteByte(',')
		}
		writeArray(b, e, elem)
	}
	b.WriteByte('}')
}

// parseArrayLiteral parses PostgreSQL's text array form, e.g.
// `[0:1]={"a b",NULL,c}` or `{{1,2},{3,4}}`. It returns the dimension
// decoration (including '=') verbatim and the element tree.
func parseArrayLiteral(s string) (deco string, root arrNode, ok bool) {
	i := skipSpace(s, 0)
	if i < len(s) && s[i] == '[' {
		eq := strings.IndexByte(s[i:], '=')
		if eq < 0 {
			return "", arrNode{}, false
		}
		deco = s[i : i+eq+1]
		for _, c := range []byte(deco[:len(deco)-1]) {
			if !(isDigit(c) || c == '[' || c == ']' || c == ':' || c == '-' || c == '+' || c == ' ') {
				return "", arrNode{}, false
			}
		}
		i = skipSpace(s, i+eq+1)
	}
	p := arrParser{s: s, i: i}
	root, ok = p.list(0)
	if !ok || skipSpace(s, p.i) != len(s) {
		return "", arrNode{}, false
	}
	return deco, root, true
}

func skipSpace(s string, i int) int {
	for i < len(s) && isSpace(s[i]) {
		i++
	}
	return i
}

func isSpace(c byte) bool {
	return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'
}

type arrParser struct {
	s string
	i int
}

// list parses "{...}" at p.i.
func (p *arrParser) list(depth int) (arrNode, bool) {
	if depth >= maxArrayDepth || p.i >= len(p.s) || p.s[p.i] != '{' {
		return arrNode{}, false
	}
	p.i++
	n := arrNode{isArr: true}
	p.i = skipSpace(p.s, p.i)
	if p.i < len(p.s) && p.s[p.i] == '}' {
		p.i++
		return n, true
	}
	for {
		p.i = skipSpace(p.s, p.i)
		if p.i >= len(p.s) {
			return arrNode{}, false
		}
		var (
			e  arrNode
			ok bool
		)
		switch p.s[p.i] {
		case '{':
			e, ok = p.list(depth + 1)
		case '"':
			e, ok = p.quoted()
		default:
			e, ok = p.unquoted()
		}
		if !ok {
			return arrNode{}, false
		}
		n.elems = append(n.elems, e)
		p.i = skipSpace(p.s, p.i)
		if p.i >= len(p.s) {
			return arrNode{}, false
		}
		switch p.s[p.i] {
		case ',':
			p.i++
		case '}':
			p.i++
			return n, true
		default:
			return arrNode{}, false
		}
	}
}

func (p *arrParser) quoted() (arrNode, bool) {
	p.i++ // opening quote
	var b strings.Builder
	for p.i < len(p.s) {
		c := p.s[p.i]
		switch c {
		case '\\':
			if p.i+1 >= len(p.s) {
				return arrNode{}, false
			}
			b.WriteByte(p.s[p.i+1])
			p.i += 2
		case '"':
			p.i++
			return arrNode{val: b.String()}, true
		default:
			b.WriteByte(c)
			p.i++
		}
	}
	return arrNode{}, false
}

func (p *arrParser) unquoted() (arrNode, bool) {
	var b strings.Builder
	keep := 0 // length of b up to the last character that is not trailing whitespace
	escaped := false
	for p.i < len(p.s) {
		c := p.s[p.i]
		switch {
		case c == ',' || c == '}':
			v := b.String()[:keep]
			if v == "" {
				return arrNode{}, false
			}
			if !escaped && strings.EqualFold(v, "NULL") {
				return arrNode{null: true}, true
			}
			return arrNode{val: v}, true
		case c == '{' || c == '"':
			return arrNode{}, false
		case c == '\\':
			if p.i+1 >= len(p.s) {
				return arrNode{}, false
			}
			b.WriteByte(p.s[p.i+1])
			keep = b.Len()
			escaped = true
			p.i += 2
		default:
			b.WriteByte(c)
			if !isSpace(c) {
				keep = b.Len()
			}
			p.i++
		}
	}
	return arrNode{}, false
}

// decodeBinaryArray decodes PostgreSQL's binary array form: ndim, has-null
// flag, element OID, (size, lower bound) per dimension, then each element as
// a length-prefixed value (-1 = NULL). The decoration is rendered as the text
// form shows it: only when some lower bound is not 1.
func decodeBinaryArray(v []byte) (string, arrNode, bool) {
	if len(v) < 12 {
		return "", arrNode{}, false
	}
	ndim := int32(binary.BigEndian.Uint32(v[0:]))
	if ndim < 0 || ndim > maxArrayDepth {
		return "", arrNode{}, false
	}
	v = v[12:] // has-null flag and element OID are not needed
	if ndim == 0 {
		if len(v) != 0 {
			return "", arrNode{}, false
		}
		return "", arrNode{isArr: true}, true
	}
	if len(v) < int(ndim)*8 {
		return "", arrNode{}, false
	}
	dims := make([]int, ndim)
	var deco strings.Builder
	decorate := false
	total := 1
	for d := range dims {
		size := int64(int32(binary.BigEndian.Uint32(v[8*d:])))
		lb := int64(int32(binary.BigEndian.Uint32(v[8*d+4:])))
		if size < 0 {
			return "", arrNode{}, false
		}
		// every element needs at least 4 bytes, which bounds the allocation
		if size > 0 && int64(total)*size > int64(len(v))/4+1 {
			return "", arrNode{}, false
		}
		dims[d] = int(size)
		total *= int(size)
		if lb != 1 {
			decorate = true
		}
		deco.WriteString("[" + strconv.FormatInt(lb, 10) + ":" + strconv.FormatInt(lb+size-1, 10) + "]")
	}
	v = v[8*ndim:]
	elems := make([]arrNode, 0, total)
	for range total {
		if len(v) < 4 {
			return "", arrNode{}, false
		}
		n := int32(binary.BigEndian.Uint32(v))
		v = v[4:]
		if n == -1 {
			elems = append(elems, arrNode{null: true})
			continue
		}
		if n < 0 || int64(n) > int64(len(v)) {
			return "", arrNode{}, false
		}
		elems = append(elems, arrNode{val: string(v[:n])})
		v = v[n:]
	}
	if len(v) != 0 {
		return "", arrNode{}, false
	}
	root := nest(dims, elems)
	if !decorate {
		return "", root, true
	}
	return deco.String() + "=", root, true
}

// nest builds the nested array tree from the flat element list (row-major).
func nest(dims []int, elems []arrNode) arrNode {
	if len(dims) == 1 {
		return arrNode{isArr: true, elems: elems}
	}
	n := arrNode{isArr: true}
	if dims[0] == 0 {
		return n
	}
	step := len(elems) / dims[0]
	for i := range dims[0] {
		n.elems = append(n.elems, nest(dims[1:], elems[i*step:(i+1)*step]))
	}
	return n
}

// floatArraysEqual compares two canonical float array renderings element by
// element within tolerance.
func floatArraysEqual(a, b string, tol float64) bool {
	da, na, ok1 := parseArrayLiteral(a)
	db, nb, ok2 := parseArrayLiteral(b)
	if !ok1 || !ok2 || da != db {
		return false
	}
	return floatNodesEqual(na, nb, tol)
}

func floatNodesEqual(a, b arrNode, tol float64) bool {
	if a.isArr != b.isArr || a.null != b.null || len(a.elems) != len(b.elems) {
		return false
	}
	if !a.isArr {
		return a.null || floatsEqual(a.val, b.val, tol)
	}
	for i := range a.elems {
		if !floatNodesEqual(a.elems[i], b.elems[i], tol) {
			return false
		}
	}
	return true
}

// floatsEqual compares two canonical float renderings within relative
// tolerance tol. Special values (NaN, ±Infinity) must match exactly.
func floatsEqual(a, b string, tol float64) bool {
	if a == b {
		return true
	}
	x, err1 := strconv.ParseFloat(a, 64)
	y, err2 := strconv.ParseFloat(b, 64)
	if err1 != nil || err2 != nil {
		return false
	}
	if math.IsNaN(x) || math.IsNaN(y) || math.IsInf(x, 0) || math.IsInf(y, 0) {
		return x == y
	}
	if x == y {
		return true
	}
	return math.Abs(x-y) <= tol*math.Max(math.Abs(x), math.Abs(y))
}
