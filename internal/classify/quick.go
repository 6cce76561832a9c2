package classify

import (
	"strings"
	"unicode/utf8"

	pg_query "github.com/pganalyze/pg_query_go/v6"
)

// The quick shape: a shape hit without pg_query's scanner. Finding a text's
// shape (shape.go) costs a pg_query.Scan, a cgo call whose tokens come back
// as protobuf: about 10% of the proxy's CPU in dual-write with clients that
// inline their values (pgbench -M simple; issue 15). quickShape recognises a
// conservative subset of SQL in Go: texts whose only constants are short
// integers and plain single-quoted strings, with nothing (comments, dollar
// quotes, escapes, prefixed strings, fractional numbers) whose lexing is not
// plain. Two such texts with the same quick key differ only in the contents
// of those constants, so pg_query scans them into the same tokens except the
// constants' values (an integer of at most 9 digits is always ICONST, a plain
// quoted string always SCONST): they have the same shape key. A quick key is
// therefore bound to the shape plan its first text got the slow way, and a
// later text of the same quick key is instantiated from it directly, its
// statements' byte ranges moved by the lengths of the constants before them.
// A text outside the subset takes the slow path, unchanged.

// quickShape returns sql's quick key and the end offset of each of its
// constants, or ok false when sql is outside the subset.
func quickShape(sql string) (key string, lits []quickLit, ok bool) {
	if !utf8.ValidString(sql) {
		return "", nil, false
	}
	var b strings.Builder
	b.Grow(len(sql))
	n := len(sql)
	for i := 0; i < n; {
		c := sql[i]
		switch {
		case isIdentStart(c):
			j := i + 1
			for j < n && isIdentChar(sql[j]) {
				j++
			}
			if j < n && (sql[j] == '\'' || sql[j] == '&') {
				return "", nil, false // E'..', B'..', X'..', N'..', U&'..': not plain strings
			}
			b.WriteString(sql[i:j])
			i = j
		case c >= '0' && c <= '9':
			j := i + 1
			for j < n && sql[j] >= '0' && sql[j] <= '9' {
				j++
			}
			if j-i > 9 || j < n && (isIdentChar(sql[j]) || sql[j] == '.') {
				return "", nil, false // may overflow int32 (FCONST), or 1e5, 0x1F, 1_000, 1.5
			}
			b.WriteByte(quickInt)
			lits = append(lits, quickLit{start: i, end: j})
			i = j
		case c == '\'':
			j := i + 1
			for j < n && sql[j] != '\'' {
				if sql[j] == '\\' {
					return "", nil, false
				}
				j++
			}
			if j >= n || j+1 < n && sql[j+1] == '\'' {
				return "", nil, false // unterminated, or a doubled quote
			}
			j++
			b.WriteByte(quickString)
			lits = append(lits, quickLit{start: i, end: j})
			i = j
		case c == '"':
			j := strings.IndexByte(sql[i+1:], '"')
			if j < 0 {
				return "", nil, false
			}
			j += i + 2
			b.WriteString(sql[i:j])
			i = j
		case c == '$':
			j := i + 1
			for j < n && sql[j] >= '0' && sql[j] <= '9' {
				j++
			}
			if j == i+1 || j < n && (isIdentChar(sql[j]) || sql[j] == '$') {
				return "", nil, false // a dollar quote, not a parameter
			}
			b.WriteString(sql[i:j])
			i = j
		case c == '-' && i+1 < n && sql[i+1] == '-', c == '/' && i+1 < n && sql[i+1] == '*':
			return "", nil, false // comments
		case c == '.' && i+1 < n && sql[i+1] >= '0' && sql[i+1] <= '9':
			return "", nil, false // .5
		case c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || strings.IndexByte("()[],;=<>+-*/:%^|~!@#?.", c) >= 0:
			b.WriteByte(c)
			i++
		default:
			return "", nil, false // control characters, backslash, backquote, braces, &
		}
	}
	return b.String(), lits, true
}

// The bytes that stand for a constant in a quick key: control characters,
// which never appear in a key otherwise (quickShape refuses them outside
// strings).
const (
	quickInt    = 0x01
	quickString = 0x02
)

func isIdentStart(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c == '_' || c >= 0x80
}

func isIdentChar(c byte) bool {
	return isIdentStart(c) || c >= '0' && c <= '9' || c == '$'
}

// quickLit is a constant's byte range in a text.
type quickLit struct{ start, end int }

// quickBound is a byte offset in a text of a quick shape, as the number of
// constants that end at or before it and the distance from the end of the
// last of them (from the start of the text when none does).
type quickBound struct{ lits, rel int }

func boundOf(off int, lits []quickLit) (quickBound, bool) {
	k, base := 0, 0
	for _, l := range lits {
		if l.end > off {
			if l.start < off {
				return quickBound{}, false // inside a constant: not a token boundary
			}
			break
		}
		k, base = k+1, l.end
	}
	return quickBound{lits: k, rel: off - base}, true
}

func (qb quickBound) in(lits []quickLit) int {
	if qb.lits == 0 {
		return qb.rel
	}
	return lits[qb.lits-1].end + qb.rel
}

// quickPlan is a shape plan bound to a quick key: the statements' first and
// last token offsets, as quickBounds.
type quickPlan struct {
	sp         *shapePlan
	start, end []quickBound
}

// newQuickPlan binds sp, the shape plan of sql (tokens toks, constants
// lits), to sql's quick key; nil when a bound falls inside a constant.
func newQuickPlan(sp *shapePlan, sql string, toks []*pg_query.ScanToken, lits []quickLit) *quickPlan {
	qp := &quickPlan{sp: sp, start: make([]quickBound, len(sp.first)), end: make([]quickBound, len(sp.last))}
	for i := range sp.first {
		s, ok1 := boundOf(int(toks[sp.first[i]].Start), lits)
		e, ok2 := boundOf(int(toks[sp.last[i]].End), lits)
		if !ok1 || !ok2 {
			return nil
		}
		qp.start[i], qp.end[i] = s, e
	}
	return qp
}

// instantiate returns the plan of sql, a text of qp's quick key with
// constants lits.
func (qp *quickPlan) instantiate(sql string, lits []quickLit) *TextPlan {
	return qp.sp.build(sql, func(i int) (int, int) { return qp.start[i].in(lits), qp.end[i].in(lits) })
}
