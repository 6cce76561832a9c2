package proxy

import (
	"strings"

	"github.com/tandemdb/tandem/internal/pgwire"
)

// CodeInsufficientPrivilege is PostgreSQL's SQLSTATE for a permission
// denied, which the proxy sends for a client statement that would change
// the control schema.
const CodeInsufficientPrivilege = "42501"

// controlTable returns the first of tables (as written) that is in the
// control schema "tandem", or "". It sees only schema-qualified names: an
// unqualified name reached through a search_path that includes tandem is
// not recognised, which is why the control schema should also belong to a
// role the application cannot use (README, Security).
func controlTable(tables []string) string {
	for _, t := range tables {
		schema, _, ok := strings.Cut(t, ".")
		if ok && strings.EqualFold(strings.Trim(schema, `"`), "tandem") {
			return t
		}
	}
	return ""
}

// refuseControlWrite answers a unit with a statement that would write the
// control schema (issue 12): the routing state, replicas, drift ledger and
// history are changed only through Tandem, where the gates, the write fence
// and the ledger's rules apply. Nothing of the unit runs. Outside a
// transaction the client gets 42501 and may carry on; inside one, where
// PostgreSQL would abort the transaction, the session ends with it and the
// store rolls the transaction back.
func (rs *routedSession) refuseControlWrite(un *unit, table string) error {
	e := pgwire.Fatal(CodeInsufficientPrivilege, "permission denied: %s is in Tandem's control schema, which clients of the proxy cannot change", table).
		WithHint("Change the routing with 'tandem route' or the admin API; run the control schema's maintenance as its own role, not through the proxy.")
	rs.ss.log.Warn("refused a client statement that writes the control schema", "table", table)
	if rs.txState != pgwire.TxIdle || rs.extOpen {
		return e
	}
	e.Severity = "ERROR"
	return rs.refuseUnit(un, e)
}
