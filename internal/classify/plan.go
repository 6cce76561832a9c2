package classify

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"unicode/utf8"

	pg_query "github.com/pganalyze/pg_query_go/v6"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// ImageMarker is the column name that separates the client's RETURNING
// columns from the row image in a rewritten statement's result: the first
// column with this name is the marker, every column before it belongs to
// the client and every column after it to the row image. A statement whose
// text already contains the name is not rewritten, so the first one is
// always the marker.
const ImageMarker = "?tandem_image?"

// TxOp is the transaction-control operation of a Transaction statement.
type TxOp uint8

const (
	TxNone             TxOp = iota
	TxBegin                 // BEGIN, START TRANSACTION
	TxCommit                // COMMIT, END
	TxRollback              // ROLLBACK, ABORT
	TxSavepoint             // SAVEPOINT name
	TxRelease               // RELEASE [SAVEPOINT] name
	TxRollbackTo            // ROLLBACK TO [SAVEPOINT] name
	TxPrepare               // PREPARE TRANSACTION 'gid'
	TxCommitPrepared        // COMMIT PREPARED 'gid'
	TxRollbackPrepared      // ROLLBACK PREPARED 'gid'
)

var txOpNames = [...]string{"none", "begin", "commit", "rollback", "savepoint", "release",
	"rollback to", "prepare transaction", "commit prepared", "rollback prepared"}

func (o TxOp) String() string {
	if int(o) < len(txOpNames) {
		return txOpNames[o]
	}
	return fmt.Sprintf("TxOp(%d)", o)
}

// StmtPlan is what the router needs to know about one statement of a query
// text. Plans are shared between callers and must not be modified.
type StmtPlan struct {
	Kind        Kind     // as Classify would classify this statement alone, except that PREPARE is Session
	SQL         string   // the statement's original text, without surrounding whitespace, comments and ';'
	Start, End  int      // SQL is text[Start:End] of the planned text (byte offsets)
	Fingerprint string   // pg_query fingerprint (hex) of SQL
	Tables      []string // tables this statement names, as written (schema.table or table)
	Unsafe      []string // functions it calls that are not on the safe list (a DML may still have an Image)

	Tx        TxOp   // for Kind == Transaction
	Chain     bool   // COMMIT/ROLLBACK AND CHAIN
	Savepoint string // for TxSavepoint, TxRelease, TxRollbackTo: the savepoint name, unquoted
	GID       string // for TxPrepare, TxCommitPrepared, TxRollbackPrepared: the transaction identifier

	// Replay marks a session statement that must also run on the secondary's
	// session to keep it in step: SET, RESET, DISCARD, PREPARE, DEALLOCATE,
	// SET ROLE, SET SESSION AUTHORIZATION, SET TRANSACTION, SET SESSION
	// CHARACTERISTICS, SET CONSTRAINTS. Not SHOW, LISTEN, UNLISTEN, NOTIFY,
	// cursors, LOAD, CHECKPOINT, nor SET TRANSACTION SNAPSHOT (a snapshot id
	// names a snapshot of one server only).
	Replay bool
	// Local marks a replayed statement whose effect ends with the
	// transaction: SET LOCAL, SET TRANSACTION, SET CONSTRAINTS.
	Local bool

	Image   *Rewrite // non-nil for a DML statement that can be row-image mirrored
	NoImage string   // when Kind == Write and Image == nil: why not

	// Creates names the relation a CREATE TABLE, CREATE TABLE AS, SELECT
	// INTO, CREATE VIEW or CREATE SEQUENCE makes, as written, and Temp
	// says whether it is temporary (TEMP, or created in pg_temp).
	Creates string
	Temp    bool
}

// Rewrite says how a DML statement runs on the primary so that it also
// returns its row images: SQL returns the client's RETURNING columns (if
// any), then a NULL column named ImageMarker, then every column of the
// target table for each affected row (the new row for INSERT and UPDATE,
// the old row for DELETE; for ON CONFLICT DO NOTHING, only inserted rows).
type Rewrite struct {
	Op              string   // "insert", "update" or "delete"
	Schema          string   // target table's schema as written, "" when unqualified
	Table           string   // target table's name as the parser gives it (unquoted)
	Alias           string   // target's alias, "" when none
	SQL             string   // the rewritten statement: the client's text with the image appended to RETURNING; same $n parameters
	ClientReturning bool     // the client's statement had its own RETURNING list
	SetColumns      []string // UPDATE SET / ON CONFLICT DO UPDATE SET columns, in order, without repeats
	OnConflict      string   // "", "nothing" or "update"
}

// TextPlan is the plan of one query text (a Query message's text or a Parse
// message's text). Plans are shared between callers and must not be
// modified.
type TextPlan struct {
	Stmts []StmtPlan
	// SQL is the text to send to the primary: the input with each statement
	// that has an Image replaced by its Image.SQL, byte-identical elsewhere
	// (other statements, separators, comments outside statements); the input
	// itself when no statement has an Image.
	SQL string
	Err error // the parse error, or a refusal of a text too deeply nested to parse safely; then Stmts is nil and SQL is the input
}

// errNUL: the server reads a query text only up to its first NUL byte, and
// so does the parser, so a text with one cannot be planned faithfully.
var errNUL = errors.New("classify: query text contains a NUL byte")

// errTooDeep: see tooDeep.
var errTooDeep = errors.New("classify: statement nested too deeply to plan safely")

// maxPathTokens bounds tooDeep's estimate of a parse tree's depth. The
// parser refuses trees deeper than about 5,000 levels with a clean error,
// but pg_query.Parse (and Summary, for some shapes) crashes the process
// with SIGSEGV on left-deep chains from about 22,000 levels on an 8 MB
// thread stack ("1+1+...", "x IS NULL IS NULL ...", "x COLLATE "C" ...",
// "x AT TIME ZONE 'UTC' ..."; pg_query_go v6.2.5). Each such level takes at
// least two tokens, so 12,000 tokens keep well clear of the crash.
const maxPathTokens = 12000

// tooDeep reports whether a text might parse into a tree deep enough to
// crash the parser. Its estimate of depth is the number of tokens on the
// current path: the tokens since the last separator (',', ';', AND, OR)
// summed over the open brackets. Lists, AND/OR chains and long multi-row
// VALUES are flat and so cost nothing; a CASE with thousands of arms is
// refused, which only sends it down the unknown path (primary only).
func tooDeep(toks []*pg_query.ScanToken) bool {
	seg := []int{0} // tokens since the last separator, per open bracket
	sum := 0
	for _, t := range toks {
		top := len(seg) - 1
		switch t.Token {
		case pg_query.Token_SQL_COMMENT, pg_query.Token_C_COMMENT:
			continue
		case pg_query.Token_ASCII_40, pg_query.Token_ASCII_91: // ( [
			seg[top]++
			sum++
			seg = append(seg, 0)
		case pg_query.Token_ASCII_41, pg_query.Token_ASCII_93: // ) ]
			if top > 0 {
				sum -= seg[top]
				seg = seg[:top]
				top--
			}
			seg[top]++
			sum++
		case pg_query.Token_ASCII_44, pg_query.Token_ASCII_59, pg_query.Token_AND, pg_query.Token_OR: // , ;
			sum -= seg[top]
			seg[top] = 0
		default:
			seg[top]++
			sum++
		}
		if sum > maxPathTokens {
			return true
		}
	}
	return false
}

// Plan returns the plan of sql, from the cache when it has been seen. It is
// safe for concurrent use; the same text yields the same *TextPlan while it
// stays cached.
func (c *Classifier) Plan(sql string) *TextPlan {
	if p, current, ok := c.plans.get(sql); current {
		return p
	} else if ok {
		return c.plans.put(sql, p, c.limit) // promote from the old generation
	}
	return c.plans.put(sql, c.plan(sql), c.limit)
}

func (c *Classifier) plan(sql string) *TextPlan {
	tp := &TextPlan{SQL: sql}
	if strings.IndexByte(sql, 0) >= 0 {
		tp.Err = errNUL
		return tp
	}
	qkey, lits, quick := quickShape(sql)
	if quick {
		if qp, current, ok := c.quick.get(qkey); ok {
			if !current {
				c.quick.put(qkey, qp, c.limit) // promote from the old generation
			}
			return qp.instantiate(sql, lits)
		}
	}
	var toks []*pg_query.ScanToken
	if sc, err := pg_query.Scan(sql); err == nil {
		toks = sc.Tokens
	}
	if tooDeep(toks) {
		tp.Err = errTooDeep
		return tp
	}
	key := ""
	if utf8.ValidString(sql) { // the parser refuses invalid UTF-8; a shape must not hide that
		key = shapeKey(sql, toks)
	}
	// bindQuick lets later texts of sql's quick key skip the scan.
	bindQuick := func(sp *shapePlan) {
		if quick {
			if qp := newQuickPlan(sp, sql, toks, lits); qp != nil {
				c.quick.put(qkey, qp, c.limit)
			}
		}
	}
	if key != "" {
		if sp, _, ok := c.shapes.get(key); ok {
			bindQuick(sp)
			return sp.instantiate(sql, toks)
		}
		defer func() {
			if sp := newShapePlan(tp, toks); sp != nil {
				c.shapes.put(key, sp, c.limit)
				bindQuick(sp)
			}
		}()
	}
	tree, err := pg_query.Parse(sql)
	if err != nil {
		tp.Err = err
		return tp
	}
	tp.Stmts = make([]StmtPlan, 0, len(tree.Stmts))
	var out strings.Builder
	last, spliced := 0, false
	for _, raw := range tree.Stmts {
		start, end := stmtRange(sql, raw, toks)
		sp := c.planStmt(tree.Version, raw.Stmt, sql[start:end], start == 0)
		sp.Start, sp.End = start, end
		if sp.Image != nil {
			out.WriteString(sql[last:start])
			out.WriteString(sp.Image.SQL)
			last, spliced = end, true
		}
		tp.Stmts = append(tp.Stmts, sp)
	}
	if spliced {
		out.WriteString(sql[last:])
		tp.SQL = out.String()
	}
	return tp
}

// stmtRange returns the byte range of a statement's own text: the parser's
// range (which starts right after the previous ';' and so includes leading
// comments) narrowed to its first and last non-comment tokens.
func stmtRange(sql string, raw *pg_query.RawStmt, toks []*pg_query.ScanToken) (int, int) {
	start := min(max(int(raw.StmtLocation), 0), len(sql))
	end := len(sql)
	if raw.StmtLen > 0 {
		end = min(start+int(raw.StmtLen), len(sql))
	}
	first, last := -1, -1
	for _, t := range toks {
		if int(t.Start) < start || int(t.End) > end || t.End <= t.Start {
			continue
		}
		if t.Token == pg_query.Token_SQL_COMMENT || t.Token == pg_query.Token_C_COMMENT {
			continue
		}
		if first < 0 {
			first = int(t.Start)
		}
		last = int(t.End)
	}
	if first < 0 { // no tokens (the scan failed): trim white space only
		s := sql[start:end]
		start += len(s) - len(strings.TrimLeft(s, " \t\n\r\f\v"))
		end -= len(s) - len(strings.TrimRight(s, " \t\n\r\f\v"))
		return start, max(start, end)
	}
	return first, last
}

// planStmt plans one statement: node is its tree, text its own text;
// sameOffsets says node's locations count from text's first byte.
func (c *Classifier) planStmt(version int32, node *pg_query.Node, text string, sameOffsets bool) StmtPlan {
	sp := StmtPlan{SQL: text}
	sp.Fingerprint, _ = pg_query.Fingerprint(text)
	var r *Result
	if _, dml := dmlOf(node); dml {
		r = c.summarizeDML(text)
	} else {
		r = c.classify(text)
	}
	sp.Kind, sp.Tables, sp.Unsafe = r.Kind, r.Tables, r.Unsafe

	switch n := node.GetNode().(type) {
	case *pg_query.Node_TransactionStmt:
		planTx(&sp, n.TransactionStmt)
	case *pg_query.Node_VariableSetStmt:
		s := n.VariableSetStmt
		switch s.Name {
		case "TRANSACTION SNAPSHOT":
			// not replayable: the snapshot exists on the primary only
		case "TRANSACTION":
			sp.Replay, sp.Local = true, true
		default:
			sp.Replay, sp.Local = true, s.IsLocal
		}
	case *pg_query.Node_ConstraintsSetStmt:
		sp.Replay, sp.Local = true, true
	case *pg_query.Node_PrepareStmt:
		// Classify counts the prepared statement's own type too; preparing
		// it changes nothing, the EXECUTE (Unknown) does.
		sp.Kind, sp.Replay = Session, true
	case *pg_query.Node_DiscardStmt, *pg_query.Node_DeallocateStmt:
		sp.Replay = true
	case *pg_query.Node_InsertStmt, *pg_query.Node_UpdateStmt, *pg_query.Node_DeleteStmt:
		switch {
		case sp.Kind != Write:
		case strings.Contains(text, ImageMarker):
			sp.NoImage = "uses the image marker name"
		default:
			sp.Image, sp.NoImage = rewriteDML(version, node, text, sameOffsets)
		}
	}
	if sp.Kind == Write && sp.Image == nil && sp.NoImage == "" {
		sp.NoImage = noImageReason(node, r)
	}
	if rv := createdRelation(node); rv != nil {
		sp.Creates = rv.Relname
		if rv.Schemaname != "" {
			sp.Creates = rv.Schemaname + "." + rv.Relname
		}
		sp.Temp = rv.Relpersistence == "t" || rv.Schemaname == "pg_temp"
	}
	return sp
}

// createdRelation returns the relation a statement creates, or nil.
func createdRelation(node *pg_query.Node) *pg_query.RangeVar {
	switch n := node.GetNode().(type) {
	case *pg_query.Node_CreateStmt:
		return n.CreateStmt.GetRelation()
	case *pg_query.Node_CreateTableAsStmt:
		return n.CreateTableAsStmt.GetInto().GetRel()
	case *pg_query.Node_SelectStmt:
		return n.SelectStmt.GetIntoClause().GetRel()
	case *pg_query.Node_ViewStmt:
		return n.ViewStmt.GetView()
	case *pg_query.Node_CreateSeqStmt:
		return n.CreateSeqStmt.GetSequence()
	}
	return nil
}

// summarizeDML is classify for a top-level INSERT, UPDATE or DELETE, which
// is a write whatever it contains. It skips classify's per-type checks,
// which re-parse the text: a multi-row VALUES list counts as a SELECT.
func (c *Classifier) summarizeDML(text string) *Result {
	sum, err := pg_query.Summary(text, -1)
	if err != nil {
		return &Result{Kind: Unknown, Err: err}
	}
	r := &Result{Kind: Write, Statements: len(sum.StatementTypes)}
	c.addSummary(r, sum)
	return r
}

func planTx(sp *StmtPlan, s *pg_query.TransactionStmt) {
	switch s.Kind {
	case pg_query.TransactionStmtKind_TRANS_STMT_BEGIN, pg_query.TransactionStmtKind_TRANS_STMT_START:
		sp.Tx = TxBegin
	case pg_query.TransactionStmtKind_TRANS_STMT_COMMIT:
		sp.Tx, sp.Chain = TxCommit, s.Chain
	case pg_query.TransactionStmtKind_TRANS_STMT_ROLLBACK:
		sp.Tx, sp.Chain = TxRollback, s.Chain
	case pg_query.TransactionStmtKind_TRANS_STMT_SAVEPOINT:
		sp.Tx, sp.Savepoint = TxSavepoint, s.SavepointName
	case pg_query.TransactionStmtKind_TRANS_STMT_RELEASE:
		sp.Tx, sp.Savepoint = TxRelease, s.SavepointName
	case pg_query.TransactionStmtKind_TRANS_STMT_ROLLBACK_TO:
		sp.Tx, sp.Savepoint = TxRollbackTo, s.SavepointName
	case pg_query.TransactionStmtKind_TRANS_STMT_PREPARE:
		sp.Tx, sp.GID = TxPrepare, s.Gid
	case pg_query.TransactionStmtKind_TRANS_STMT_COMMIT_PREPARED:
		sp.Tx, sp.GID = TxCommitPrepared, s.Gid
	case pg_query.TransactionStmtKind_TRANS_STMT_ROLLBACK_PREPARED:
		sp.Tx, sp.GID = TxRollbackPrepared, s.Gid
	}
}

// noImageReason says why a write other than a rewritable DML gets no image.
func noImageReason(node *pg_query.Node, r *Result) string {
	switch node.GetNode().(type) {
	case *pg_query.Node_MergeStmt:
		return "MERGE"
	case *pg_query.Node_CallStmt:
		return "CALL"
	case *pg_query.Node_DoStmt:
		return "DO"
	case *pg_query.Node_LockStmt:
		return "LOCK"
	}
	if containsDML(stmtMessage(node)) {
		return "writes in a CTE"
	}
	if r.Locking {
		return "locking SELECT"
	}
	if cp := node.GetCopyStmt(); cp != nil && cp.IsFrom {
		return "COPY FROM"
	}
	if len(r.Unsafe) > 0 {
		return "unsafe function " + strings.Join(r.Unsafe, ", ")
	}
	return "not a single INSERT, UPDATE or DELETE"
}

// dmlTarget is what a rewrite needs from an INSERT, UPDATE or DELETE.
type dmlTarget struct {
	op        string
	rel       *pg_query.RangeVar
	returning []*pg_query.Node
	where     *pg_query.Node
	with      *pg_query.WithClause
	set       []*pg_query.Node // UPDATE SET or ON CONFLICT DO UPDATE SET
	conflict  string
}

func dmlOf(node *pg_query.Node) (d dmlTarget, ok bool) {
	switch n := node.GetNode().(type) {
	case *pg_query.Node_InsertStmt:
		s := n.InsertStmt
		d = dmlTarget{op: "insert", rel: s.Relation, returning: s.ReturningList, with: s.WithClause}
		if oc := s.OnConflictClause; oc != nil {
			switch oc.Action {
			case pg_query.OnConflictAction_ONCONFLICT_NOTHING:
				d.conflict = "nothing"
			case pg_query.OnConflictAction_ONCONFLICT_UPDATE:
				d.conflict, d.set = "update", oc.TargetList
			}
		}
	case *pg_query.Node_UpdateStmt:
		s := n.UpdateStmt
		d = dmlTarget{op: "update", rel: s.Relation, returning: s.ReturningList, where: s.WhereClause, with: s.WithClause, set: s.TargetList}
	case *pg_query.Node_DeleteStmt:
		s := n.DeleteStmt
		d = dmlTarget{op: "delete", rel: s.Relation, returning: s.ReturningList, where: s.WhereClause, with: s.WithClause}
	default:
		return d, false
	}
	return d, d.rel != nil && d.rel.Relname != ""
}

// returningOf points at a DML statement's RETURNING list.
func returningOf(node *pg_query.Node) *[]*pg_query.Node {
	switch n := node.GetNode().(type) {
	case *pg_query.Node_InsertStmt:
		return &n.InsertStmt.ReturningList
	case *pg_query.Node_UpdateStmt:
		return &n.UpdateStmt.ReturningList
	case *pg_query.Node_DeleteStmt:
		return &n.DeleteStmt.ReturningList
	}
	return nil
}

// imageRef is the qualifier of the row image: the alias, else the table
// as written.
func imageRef(rel *pg_query.RangeVar) []string {
	if rel.Alias != nil && rel.Alias.Aliasname != "" {
		return []string{rel.Alias.Aliasname}
	}
	var ref []string
	for _, part := range []string{rel.Catalogname, rel.Schemaname, rel.Relname} {
		if part != "" {
			ref = append(ref, part)
		}
	}
	return ref
}

// rewriteDML makes an INSERT, UPDATE or DELETE also return its row images.
// text is the statement's own text and node its tree; node's locations
// count from text's first byte when sameOffsets. It refuses (nil and a
// reason) when the statement writes elsewhere too or uses WHERE CURRENT OF.
//
// RETURNING is the last clause of all three statements, so the rewrite
// appends to the client's text: " RETURNING NULL AS marker, ref.*", or
// ", NULL AS marker, ref.*" after the client's own RETURNING list. This
// keeps the client's text (comments, layout, and the positions that
// errors report) and costs one parse. The result is checked on the tree:
// it must parse to the client's statement with exactly the two targets
// added. Should that ever fail, the rewrite falls back to appending the
// targets to the tree and deparsing it.
func rewriteDML(version int32, node *pg_query.Node, text string, sameOffsets bool) (*Rewrite, string) {
	d, ok := dmlOf(node)
	if !ok {
		return nil, "no target table"
	}
	if d.where.GetCurrentOfExpr() != nil {
		return nil, "WHERE CURRENT OF"
	}
	// Only the statement's own WITH can hold a write: the server refuses a
	// data-modifying WITH anywhere else.
	if d.with != nil && containsDML(d.with.ProtoReflect()) {
		return nil, "writes in a CTE"
	}
	rw := &Rewrite{
		Op:              d.op,
		Schema:          d.rel.Schemaname,
		Table:           d.rel.Relname,
		ClientReturning: len(d.returning) > 0,
		SetColumns:      targetNames(d.set),
		OnConflict:      d.conflict,
	}
	if d.rel.Alias != nil {
		rw.Alias = d.rel.Alias.Aliasname
	}
	ref := imageRef(d.rel)
	var b strings.Builder
	b.WriteString(text)
	if rw.ClientReturning {
		b.WriteString(", NULL AS ")
	} else {
		b.WriteString(" RETURNING NULL AS ")
	}
	b.WriteString(quoteIdent(ImageMarker))
	b.WriteString(", ")
	for _, part := range ref {
		b.WriteString(quoteIdent(part))
		b.WriteByte('.')
	}
	b.WriteByte('*')
	rw.SQL = b.String()

	orig := node
	if !sameOffsets {
		tree, err := pg_query.Parse(text)
		if err != nil || len(tree.Stmts) != 1 {
			orig = nil
		} else {
			orig = tree.Stmts[0].Stmt
		}
	}
	if orig != nil && appendsImage(orig, rw.SQL, ref) {
		return rw, ""
	}
	sql, why := deparseWithImage(version, node, ref)
	if sql == "" {
		return nil, why
	}
	rw.SQL = sql
	return rw, ""
}

// appendsImage reports whether sql parses to the statement orig with the
// marker and ref.* appended to its RETURNING list, and to nothing else;
// orig's locations must count from sql's first byte.
func appendsImage(orig *pg_query.Node, sql string, ref []string) bool {
	tree, err := pg_query.Parse(sql)
	if err != nil || len(tree.Stmts) != 1 {
		return false
	}
	got := tree.Stmts[0].Stmt
	ret := returningOf(got)
	if ret == nil || len(*ret) < 2 {
		return false
	}
	list := *ret
	if !isImageTargets(list[len(list)-2], list[len(list)-1], ref) {
		return false
	}
	*ret = list[:len(list)-2]
	// The shared prefix of the two texts gives the same locations, so the
	// trees must serialize identically.
	opts := proto.MarshalOptions{Deterministic: true}
	a, errA := opts.Marshal(orig)
	b, errB := opts.Marshal(got)
	return errA == nil && errB == nil && string(a) == string(b)
}

// isImageTargets reports whether marker and star are NULL AS ImageMarker
// and ref.*.
func isImageTargets(marker, star *pg_query.Node, ref []string) bool {
	m, st := marker.GetResTarget(), star.GetResTarget()
	if m.GetName() != ImageMarker || !m.GetVal().GetAConst().GetIsnull() || len(m.GetIndirection()) > 0 {
		return false
	}
	fields := st.GetVal().GetColumnRef().GetFields()
	if st.GetName() != "" || len(st.GetIndirection()) > 0 || len(fields) != len(ref)+1 || fields[len(ref)].GetAStar() == nil {
		return false
	}
	for i, part := range ref {
		if fields[i].GetString_().GetSval() != part {
			return false
		}
	}
	return true
}

// deparseWithImage appends the marker and ref.* to a clone of the
// statement's RETURNING list and deparses it; it returns "" and a reason
// when the deparsed text does not parse back to the same tree.
func deparseWithImage(version int32, node *pg_query.Node, ref []string) (string, string) {
	node = proto.Clone(node).(*pg_query.Node)
	fields := make([]*pg_query.Node, 0, len(ref)+1)
	for _, part := range ref {
		fields = append(fields, pg_query.MakeStrNode(part))
	}
	fields = append(fields, &pg_query.Node{Node: &pg_query.Node_AStar{AStar: &pg_query.A_Star{}}})
	marker := &pg_query.Node{Node: &pg_query.Node_AConst{AConst: &pg_query.A_Const{Isnull: true, Location: -1}}}
	star := &pg_query.Node{Node: &pg_query.Node_ColumnRef{ColumnRef: &pg_query.ColumnRef{Fields: fields, Location: -1}}}
	ret := returningOf(node)
	*ret = append(*ret,
		pg_query.MakeResTargetNodeWithNameAndVal(ImageMarker, marker, -1),
		pg_query.MakeResTargetNodeWithVal(star, -1))

	out, err := pg_query.Deparse(&pg_query.ParseResult{Version: version, Stmts: []*pg_query.RawStmt{{Stmt: node}}})
	if err != nil {
		return "", "deparse: " + err.Error()
	}
	again, err := pg_query.Parse(out)
	if err != nil || len(again.Stmts) != 1 {
		return "", "deparse not faithful"
	}
	got := again.Stmts[0].Stmt
	clearLocations(node.ProtoReflect())
	clearLocations(got.ProtoReflect())
	if !proto.Equal(node, got) {
		return "", "deparse not faithful"
	}
	return out, ""
}

// quoteIdent quotes an identifier unless PostgreSQL would read it back
// unchanged without quotes (lower case, not a keyword other than an
// unreserved one), as the server's quote_ident does.
func quoteIdent(s string) string {
	plain := s != "" && !(s[0] >= '0' && s[0] <= '9')
	for i := 0; plain && i < len(s); i++ {
		ch := s[i]
		plain = ch >= 'a' && ch <= 'z' || ch >= '0' && ch <= '9' || ch == '_'
	}
	if plain {
		sc, err := pg_query.Scan(s)
		plain = err == nil && len(sc.Tokens) == 1 &&
			(sc.Tokens[0].KeywordKind == pg_query.KeywordKind_NO_KEYWORD || sc.Tokens[0].KeywordKind == pg_query.KeywordKind_UNRESERVED_KEYWORD)
	}
	if plain {
		return s
	}
	return `"` + strings.ReplaceAll(s, `"`, `""`) + `"`
}

// targetNames returns the distinct column names of a SET list.
func targetNames(list []*pg_query.Node) []string {
	var names []string
	for _, n := range list {
		rt := n.GetResTarget()
		if rt == nil || rt.Name == "" || contains(names, rt.Name) {
			continue
		}
		names = append(names, rt.Name)
	}
	return names
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// stmtMessage returns the statement inside a Node wrapper.
func stmtMessage(node *pg_query.Node) protoreflect.Message {
	var inner protoreflect.Message
	eachChild(node.ProtoReflect(), func(m protoreflect.Message) bool {
		inner = m
		return false
	})
	if inner == nil {
		return node.ProtoReflect()
	}
	return inner
}

// containsDML reports an INSERT, UPDATE, DELETE or MERGE anywhere below the
// statement m (in practice: in a WITH clause, at any depth).
func containsDML(m protoreflect.Message) bool {
	found := false
	eachChild(m, func(child protoreflect.Message) bool {
		switch child.Interface().(type) {
		case *pg_query.InsertStmt, *pg_query.UpdateStmt, *pg_query.DeleteStmt, *pg_query.MergeStmt:
			found = true
		default:
			found = containsDML(child)
		}
		return !found
	})
	return found
}

// clearLocations zeroes every source position in the tree m, so that two
// trees parsed from differently laid out texts compare equal.
func clearLocations(m protoreflect.Message) {
	var clear []protoreflect.FieldDescriptor
	m.Range(func(fd protoreflect.FieldDescriptor, _ protoreflect.Value) bool {
		name := string(fd.Name())
		if fd.Kind() == protoreflect.Int32Kind && (name == "location" || name == "stmt_len" || strings.HasSuffix(name, "_location")) {
			clear = append(clear, fd)
		}
		return true
	})
	for _, fd := range clear {
		m.Clear(fd)
	}
	eachChild(m, func(child protoreflect.Message) bool {
		clearLocations(child)
		return true
	})
}

// eachChild calls f for each message directly inside m, until f returns
// false.
func eachChild(m protoreflect.Message, f func(protoreflect.Message) bool) {
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		if fd.Message() == nil || fd.IsMap() {
			return true
		}
		if fd.IsList() {
			l := v.List()
			for i := range l.Len() {
				if !f(l.Get(i).Message()) {
					return false
				}
			}
			return true
		}
		return f(v.Message())
	})
}

// textCache is a two-generation cache keyed by query text: when the current
// generation is full it becomes the old one, so recently used texts survive
// and memory stays bounded by about limit entries. The zero value is ready.
type textCache[V any] struct {
	mu       sync.RWMutex
	cur, old map[string]V
}

// get looks key up in both generations; current says it was found in the
// current one.
func (tc *textCache[V]) get(key string) (v V, current, ok bool) {
	tc.mu.RLock()
	defer tc.mu.RUnlock()
	if v, ok = tc.cur[key]; ok {
		return v, true, true
	}
	v, ok = tc.old[key]
	return v, false, ok
}

// put stores v under key in the current generation unless it is there
// already, and returns the stored value, so that concurrent callers that
// computed the same key agree on one value.
func (tc *textCache[V]) put(key string, v V, limit int) V {
	tc.mu.Lock()
	defer tc.mu.Unlock()
	if have, ok := tc.cur[key]; ok {
		return have
	}
	if tc.cur == nil || len(tc.cur) >= limit/2 {
		tc.old, tc.cur = tc.cur, make(map[string]V, limit/2)
	}
	tc.cur[key] = v
	return v
}
