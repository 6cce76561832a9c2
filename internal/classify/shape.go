package classify

import (
	"strconv"
	"strings"

	pg_query "github.com/pganalyze/pg_query_go/v6"
)

// Texts that differ only in their constants (the usual case for clients
// that inline values, e.g. pgbench -M simple) parse to trees that differ
// only in those constants, so everything a plan says about them is the same
// except the statements' byte ranges. The shape cache keys plans by the
// token stream with constants and comments reduced to their token type, and
// instantiates a cached shape for a new text from that text's own tokens:
// one scan instead of the several parses a plan costs.

// shapePlan is a plan that can be re-instantiated for another text of the
// same shape.
type shapePlan struct {
	tp          *TextPlan
	first, last []int    // per statement: indexes of its first and last token
	suffix      []string // per statement with an Image: Image.SQL minus SQL
}

func isConstToken(t pg_query.Token) bool {
	switch t {
	case pg_query.Token_ICONST, pg_query.Token_FCONST, pg_query.Token_SCONST, pg_query.Token_USCONST,
		pg_query.Token_BCONST, pg_query.Token_XCONST:
		return true
	}
	return false
}

func isCommentToken(t pg_query.Token) bool {
	return t == pg_query.Token_SQL_COMMENT || t == pg_query.Token_C_COMMENT
}

// shapeKey returns sql's shape, or "" when it has no tokens.
func shapeKey(sql string, toks []*pg_query.ScanToken) string {
	if len(toks) == 0 {
		return ""
	}
	var b strings.Builder
	b.Grow(len(sql) + 2*len(toks))
	for _, t := range toks {
		b.WriteString(strconv.Itoa(int(t.Token)))
		if !isConstToken(t.Token) && !isCommentToken(t.Token) && t.Start >= 0 && int(t.End) <= len(sql) && t.Start <= t.End {
			b.WriteByte(':')
			b.WriteString(sql[t.Start:t.End])
		}
		b.WriteByte(0)
	}
	return b.String()
}

// newShapePlan makes tp reusable for texts of its shape, or returns nil
// when some part of it depends on more than the shape.
func newShapePlan(tp *TextPlan, toks []*pg_query.ScanToken) *shapePlan {
	if tp.Err != nil || len(tp.Stmts) == 0 {
		return nil
	}
	sp := &shapePlan{tp: tp, first: make([]int, len(tp.Stmts)), last: make([]int, len(tp.Stmts)), suffix: make([]string, len(tp.Stmts))}
	for i, st := range tp.Stmts {
		switch st.Tx {
		case TxPrepare, TxCommitPrepared, TxRollbackPrepared:
			return nil // the transaction id is a constant
		}
		sp.first[i], sp.last[i] = -1, -1
		for j, t := range toks {
			if int(t.Start) == st.Start && sp.first[i] < 0 {
				sp.first[i] = j
			}
			if int(t.End) == st.End {
				sp.last[i] = j
			}
		}
		if sp.first[i] < 0 || sp.last[i] < sp.first[i] {
			return nil
		}
		if st.Image != nil {
			if !strings.HasPrefix(st.Image.SQL, st.SQL) {
				return nil // the rewrite was deparsed, not appended
			}
			sp.suffix[i] = st.Image.SQL[len(st.SQL):]
		}
	}
	return sp
}

// instantiate returns the plan of sql, a text of sp's shape with tokens toks.
func (sp *shapePlan) instantiate(sql string, toks []*pg_query.ScanToken) *TextPlan {
	return sp.build(sql, func(i int) (int, int) { return int(toks[sp.first[i]].Start), int(toks[sp.last[i]].End) })
}

// build returns the plan of sql, a text of sp's shape whose statement i
// spans bounds(i).
func (sp *shapePlan) build(sql string, bounds func(i int) (int, int)) *TextPlan {
	tp := &TextPlan{SQL: sql, Stmts: make([]StmtPlan, len(sp.tp.Stmts))}
	var out strings.Builder
	last, spliced := 0, false
	for i, orig := range sp.tp.Stmts {
		st := orig
		start, end := bounds(i)
		st.Start, st.End, st.SQL = start, end, sql[start:end]
		if orig.Image != nil {
			img := *orig.Image
			img.SQL = st.SQL + sp.suffix[i]
			st.Image = &img
			out.WriteString(sql[last:start])
			out.WriteString(img.SQL)
			last, spliced = end, true
		}
		tp.Stmts[i] = st
	}
	if spliced {
		out.WriteString(sql[last:])
		tp.SQL = out.String()
	}
	return tp
}
