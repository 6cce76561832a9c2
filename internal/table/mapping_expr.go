package table

import (
	"errors"
	"fmt"
	"slices"

	pg_query "github.com/pganalyze/pg_query_go/v6"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// exprColumns checks that expr is one SQL value expression, safe to embed
// in parentheses in generated SQL, and returns the columns it reads, in
// order of first use. The expression must name columns unqualified: it is
// evaluated over one row, whose alias the generated SQL chooses.
func exprColumns(expr string) ([]string, error) {
	sc, err := pg_query.Scan(expr)
	if err != nil {
		return nil, fmt.Errorf("expression %q does not parse: %w", expr, err)
	}
	for _, t := range sc.Tokens {
		if t.Token == pg_query.Token_SQL_COMMENT {
			return nil, fmt.Errorf("expression %q holds a -- comment; use /* */ or none", expr)
		}
	}
	if len(sc.Tokens) > maxExprTokens {
		return nil, fmt.Errorf("expression %q is too long (%d tokens, at most %d)", expr, len(sc.Tokens), maxExprTokens)
	}
	tree, err := pg_query.Parse("SELECT (" + expr + ")")
	if err != nil {
		return nil, fmt.Errorf("expression %q does not parse: %w", expr, err)
	}
	if len(tree.Stmts) != 1 {
		return nil, fmt.Errorf("expression %q is not a single expression", expr)
	}
	sel := tree.Stmts[0].GetStmt().GetSelectStmt()
	if sel == nil || len(sel.TargetList) != 1 || len(sel.FromClause) > 0 || sel.WhereClause != nil ||
		len(sel.GroupClause) > 0 || sel.HavingClause != nil || len(sel.SortClause) > 0 || sel.LimitCount != nil ||
		sel.LimitOffset != nil || sel.Op != pg_query.SetOperation_SET_OPERATION_UNDEFINED && sel.Op != pg_query.SetOperation_SETOP_NONE ||
		len(sel.WindowClause) > 0 || len(sel.LockingClause) > 0 || sel.WithClause != nil || len(sel.DistinctClause) > 0 ||
		len(sel.ValuesLists) > 0 || sel.IntoClause != nil {
		return nil, fmt.Errorf("expression %q is not a single expression", expr)
	}
	var cols []string
	var bad error
	walkMessages(sel.TargetList[0].ProtoReflect(), func(m protoreflect.Message) {
		ref, ok := m.Interface().(*pg_query.ColumnRef)
		if !ok || bad != nil {
			return
		}
		if len(ref.Fields) != 1 || ref.Fields[0].GetString_() == nil {
			bad = fmt.Errorf("expression %q: name columns alone, without a table or *", expr)
			return
		}
		if c := ref.Fields[0].GetString_().Sval; !slices.Contains(cols, c) {
			cols = append(cols, c)
		}
	})
	if bad != nil {
		return nil, bad
	}
	return cols, nil
}

// maxExprTokens bounds an expression's length, which also keeps it far from
// the nesting depth that crashes the parser (see classify.tooDeep).
const maxExprTokens = 2000

// walkMessages calls f for m and every message nested in it.
func walkMessages(m protoreflect.Message, f func(protoreflect.Message)) {
	if !m.IsValid() {
		return
	}
	f(m)
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch {
		case fd.IsList() && fd.Message() != nil:
			l := v.List()
			for i := range l.Len() {
				walkMessages(l.Get(i).Message(), f)
			}
		case fd.IsMap():
		case fd.Message() != nil:
			walkMessages(v.Message(), f)
		}
		return true
	})
}

// errNotDerivable is wrapped when a column a statement needs cannot be
// produced from the other side's columns.
var errNotDerivable = errors.New("not derivable")

// ExprColumns returns the columns a mapping expression reads, by name, as
// the mapping itself sees them (for reports such as tandem plan).
func ExprColumns(expr string) ([]string, error) { return exprColumns(expr) }
