package pgwire

import "strings"

// QuoteLiteral quotes s as an SQL literal that means s whatever
// standard_conforming_strings is, as PostgreSQL's quote_literal does: a
// value with a backslash becomes an E'...' string with it doubled.
func QuoteLiteral(s string) string {
	q := strings.ReplaceAll(s, "'", "''")
	if strings.Contains(s, `\`) {
		return "E'" + strings.ReplaceAll(q, `\`, `\\`) + "'"
	}
	return "'" + q + "'"
}
