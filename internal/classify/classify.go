// Package classify sorts SQL statements into the kinds the router acts on
// (read, write, DDL, transaction control, session, unknown) with the real
// PostgreSQL parser, and caches the result by statement text.
//
// It errs towards safety: anything that might change data is a write. A
// SELECT that locks rows (FOR UPDATE/SHARE) or calls a function outside the
// known-safe list is a write, so it is never shifted to the new store or
// shadowed; text that does not parse is unknown and runs on the primary.
package classify

import (
	"strings"

	pg_query "github.com/pganalyze/pg_query_go/v6"
)

// Kind is a statement's class for routing.
type Kind uint8

const (
	Unknown     Kind = iota // did not parse, or cannot be judged: runs on the primary
	Read                    // a plain, side-effect-free query
	Write                   // changes rows, or might (locking SELECT, unsafe function, CALL, DO)
	DDL                     // changes schema or other catalog state
	Transaction             // BEGIN, COMMIT, ROLLBACK, SAVEPOINT...
	Session                 // SET, RESET, SHOW, PREPARE, LISTEN, DISCARD...
)

var kindNames = [...]string{"unknown", "read", "write", "ddl", "transaction", "session"}

func (k Kind) String() string {
	if int(k) < len(kindNames) {
		return kindNames[k]
	}
	return "unknown"
}

// rank orders kinds for a multi-statement text: the text takes the kind of
// its most consequential statement.
var rank = [...]int{Unknown: 5, Read: 0, Write: 3, DDL: 4, Transaction: 2, Session: 1}

// Result is what the classifier knows about one statement text. Results are
// shared between callers and must not be modified.
type Result struct {
	Kind        Kind
	Statements  int      // statements in the text
	Tables      []string // tables named, as written (schema.table or table)
	WriteTables []string // tables written by DML (INSERT/UPDATE/DELETE/MERGE/COPY FROM targets)
	Locking     bool     // a SELECT ... FOR UPDATE/SHARE
	Unsafe      []string // called functions that are not on the safe list
	Err         error    // the parse error, for Unknown
}

// Classifier classifies statement texts, caching up to a bound. It is safe
// for concurrent use.
type Classifier struct {
	safe  map[string]bool
	limit int

	plans  textCache[*TextPlan]  // Plan's cache: two generations, bounded
	shapes textCache[*shapePlan] // plans by shape (constants elided), to plan new texts of a known shape
	quick  textCache[*quickPlan] // shape plans by quick key, to plan texts of a known shape without scanning them (quick.go)
}

// New returns a classifier that caches about limit texts (minimum 16).
// extraSafe adds functions (lower-case, optionally schema-qualified) to the
// built-in safe list, for an application's own side-effect-free functions.
func New(limit int, extraSafe ...string) *Classifier {
	c := &Classifier{safe: map[string]bool{}, limit: max(limit, 16)}
	for _, f := range strings.Fields(safeFunctions) {
		c.safe[f] = true
	}
	for _, f := range extraSafe {
		c.safe[strings.ToLower(f)] = true
	}
	return c
}

// classify is the classification of one statement's text (Plan runs it on
// each statement of a text; Plan's cache holds the results).
func (c *Classifier) classify(sql string) *Result {
	// pg_query's C parser can crash the process on pathologically nested
	// input: refuse it before parsing, as Plan does.
	if strings.IndexByte(sql, 0) >= 0 {
		return &Result{Kind: Unknown, Err: errNUL}
	}
	if sc, err := pg_query.Scan(sql); err == nil && tooDeep(sc.Tokens) {
		return &Result{Kind: Unknown, Err: errTooDeep}
	}
	sum, err := pg_query.Summary(sql, -1)
	if err != nil {
		return &Result{Kind: Unknown, Err: err}
	}
	r := &Result{Statements: len(sum.StatementTypes)}
	if r.Statements == 0 {
		r.Kind = Session // an empty query or only comments
		return r
	}
	c.addSummary(r, sum)
	kind, first := Kind(0), true
	for _, st := range sum.StatementTypes {
		k := c.statementKind(st, sql, r)
		if first || rank[k] > rank[kind] {
			kind, first = k, false
		}
	}
	r.Kind = kind
	return r
}

// addSummary adds to r the tables sum names (those written to in
// WriteTables) and the functions it calls that are not safe.
func (c *Classifier) addSummary(r *Result, sum *pg_query.SummaryResult) {
	for _, t := range sum.Tables {
		r.Tables = append(r.Tables, t.Name)
		if t.Context == pg_query.SummaryResult_DML {
			r.WriteTables = append(r.WriteTables, t.Name)
		}
	}
	for _, f := range sum.Functions {
		if !c.isSafe(f) {
			r.Unsafe = append(r.Unsafe, f.Name)
		}
	}
}

// isSafe: a function is safe when its qualified name is on the list, or
// when it is unqualified (or in pg_catalog) and its bare name is.
func (c *Classifier) isSafe(f *pg_query.SummaryResult_Function) bool {
	if c.safe[strings.ToLower(f.Name)] {
		return true
	}
	schema := strings.ToLower(f.SchemaName)
	return (schema == "" || schema == "pg_catalog") && c.safe[strings.ToLower(f.FunctionName)]
}

// statementKind classifies one statement type; sql and r give the context
// needed for SELECT (locking, functions) and COPY (direction).
func (c *Classifier) statementKind(stmtType, sql string, r *Result) Kind {
	switch stmtType {
	case "SelectStmt":
		if strings.Contains(strings.ToUpper(sql), "INTO") && selectInto(sql) {
			return DDL // SELECT ... INTO creates a table
		}
		if locking(sql) {
			r.Locking = true
			return Write
		}
		if len(r.Unsafe) > 0 || len(r.WriteTables) > 0 { // unsafe call, or DML in a WITH clause
			return Write
		}
		return Read
	case "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt", "CallStmt", "DoStmt":
		return Write
	case "CopyStmt":
		if copyFrom(sql) {
			return Write
		}
		if len(r.Unsafe) > 0 {
			return Write
		}
		return Read
	case "ExplainStmt":
		if explainAnalyze(sql) {
			return Unknown // EXPLAIN ANALYZE runs the statement, whatever it is
		}
		return Read
	case "TransactionStmt":
		return Transaction
	case "VariableSetStmt", "VariableShowStmt", "DiscardStmt", "ListenStmt", "UnlistenStmt", "NotifyStmt",
		"PrepareStmt", "DeallocateStmt", "DeclareCursorStmt", "FetchStmt", "ClosePortalStmt", "LoadStmt",
		"CheckPointStmt", "ConstraintsSetStmt":
		return Session
	case "ExecuteStmt":
		return Unknown // runs a prepared statement whose text this call cannot see
	case "LockStmt":
		return Write // takes table locks on the primary; never shifted
	}
	if strings.HasSuffix(stmtType, "Stmt") {
		return DDL // CREATE/ALTER/DROP/TRUNCATE/GRANT/COMMENT/VACUUM/... change catalog or table state
	}
	return Unknown
}

// locking reports a FOR UPDATE / FOR NO KEY UPDATE / FOR SHARE / FOR KEY
// SHARE clause anywhere in the text.
func locking(sql string) bool {
	scan, err := pg_query.Scan(sql)
	if err != nil {
		return true // cannot tell: assume the worst
	}
	toks := scan.Tokens
	for i, t := range toks {
		if t.Token != pg_query.Token_FOR || i+1 >= len(toks) {
			continue
		}
		switch toks[i+1].Token {
		case pg_query.Token_UPDATE, pg_query.Token_SHARE:
			return true
		case pg_query.Token_NO, pg_query.Token_KEY:
			if i+2 < len(toks) && (toks[i+2].Token == pg_query.Token_KEY || toks[i+2].Token == pg_query.Token_SHARE) {
				return true
			}
		}
	}
	return false
}

func parseStmts(sql string) []*pg_query.RawStmt {
	tree, err := pg_query.Parse(sql)
	if err != nil {
		return nil
	}
	return tree.Stmts
}

func selectInto(sql string) bool {
	for _, s := range parseStmts(sql) {
		if sel := s.Stmt.GetSelectStmt(); sel != nil && sel.IntoClause != nil {
			return true
		}
	}
	return false
}

func copyFrom(sql string) bool {
	stmts := parseStmts(sql)
	if stmts == nil {
		return true
	}
	for _, s := range stmts {
		if cp := s.Stmt.GetCopyStmt(); cp != nil && cp.IsFrom {
			return true
		}
	}
	return false
}

func explainAnalyze(sql string) bool {
	stmts := parseStmts(sql)
	if stmts == nil {
		return true
	}
	for _, s := range stmts {
		ex := s.Stmt.GetExplainStmt()
		if ex == nil {
			continue
		}
		for _, o := range ex.Options {
			if d := o.GetDefElem(); d != nil && d.Defname == "analyze" {
				if d.Arg == nil {
					return true
				}
				if b := d.Arg.GetBoolean(); b != nil && b.Boolval {
					return true
				}
				if s := d.Arg.GetString_(); s != nil && isTrue(s.Sval) {
					return true
				}
				if n := d.Arg.GetInteger(); n != nil && n.Ival != 0 {
					return true
				}
			}
		}
	}
	return false
}

func isTrue(s string) bool {
	switch strings.ToLower(s) {
	case "true", "on", "yes", "1":
		return true
	}
	return false
}

// safeFunctions are built-in functions without side effects. now(),
// random() and the like are safe to read (they change nothing), though
// their values differ between stores; shadow comparison handles that.
// nextval, setval, advisory locks, dblink and user functions are not here.
const safeFunctions = `
count sum avg min max every bool_and bool_or bit_and bit_or array_agg string_agg json_agg jsonb_agg
json_object_agg jsonb_object_agg stddev stddev_pop stddev_samp variance var_pop var_samp corr covar_pop
covar_samp percentile_cont percentile_disc mode rank dense_rank row_number percent_rank cume_dist ntile
lag lead first_value last_value nth_value
coalesce nullif greatest least abs ceil ceiling floor round trunc sign sqrt cbrt power pow exp ln log
log10 mod div pi degrees radians sin cos tan asin acos atan atan2 width_bucket random gen_random_uuid
length char_length character_length octet_length bit_length lower upper initcap substr substring
left right lpad rpad ltrim rtrim btrim trim replace translate concat concat_ws format position strpos
split_part regexp_replace regexp_match regexp_matches regexp_split_to_array regexp_split_to_table
starts_with reverse repeat md5 sha224 sha256 sha384 sha512 encode decode to_hex ascii chr quote_ident
quote_literal quote_nullable string_to_array array_to_string array_length array_lower array_upper
array_position array_positions array_remove array_replace array_append array_prepend array_cat
cardinality unnest generate_series generate_subscripts
now current_timestamp current_date current_time localtime localtimestamp clock_timestamp
statement_timestamp transaction_timestamp timeofday date_trunc date_part extract age make_date
make_time make_timestamp make_timestamptz make_interval justify_days justify_hours justify_interval
to_char to_date to_number to_timestamp isfinite date_bin timezone
json_build_object jsonb_build_object json_build_array jsonb_build_array to_json to_jsonb row_to_json
array_to_json json_array_length jsonb_array_length json_extract_path jsonb_extract_path
json_extract_path_text jsonb_extract_path_text json_typeof jsonb_typeof jsonb_set jsonb_insert
jsonb_pretty jsonb_strip_nulls json_each jsonb_each json_each_text jsonb_each_text json_object_keys
jsonb_object_keys json_array_elements jsonb_array_elements json_array_elements_text
jsonb_array_elements_text jsonb_path_query jsonb_path_exists jsonb_path_match
current_user session_user current_schema current_schemas current_database current_setting version
pg_backend_pid inet_client_addr inet_server_addr pg_postmaster_start_time
pg_typeof pg_column_size pg_relation_size pg_total_relation_size pg_table_size pg_size_pretty
has_table_privilege has_schema_privilege has_database_privilege col_description obj_description
format_type to_regclass to_regtype
`
