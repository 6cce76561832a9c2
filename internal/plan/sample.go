package plan

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"github.com/tandemdb/tandem/internal/jsonout"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// sampleTable is the temporary table the sample copy fills on new. It is
// created inside a transaction that is always rolled back.
const sampleTable = "tandem_plan_sample"

// sampleCopy copies up to n rows of old, in key order, through the mapping
// into a temporary table shaped like new's columns, and extrapolates the
// time to the table's estimated rows. The sample is held in memory between
// the two COPYs, so a failure on new never breaks the old connection. A
// failure on new (a value that does not fit) is reported in Sample.Error;
// an error means a store could not be used at all.
func sampleCopy(ctx context.Context, oldConn, newConn *pgx.Conn, old, new *relation, m Mapping, n int, rows int64) (*Sample, error) {
	var oldCols, newCols []string
	for _, c := range old.cols {
		if c.generated {
			continue
		}
		nc, kept := m.newColumn(c.name)
		if !kept {
			continue
		}
		if target := new.column(nc); target == nil || target.generated {
			continue
		}
		oldCols = append(oldCols, quoteIdent(c.name))
		newCols = append(newCols, quoteIdent(nc))
	}
	if len(oldCols) == 0 {
		return &Sample{Error: "no column to copy"}, nil
	}
	order := ""
	if old.hasKey() {
		keys := make([]string, len(old.key))
		for i, k := range old.key {
			keys[i] = quoteIdent(k)
		}
		order = " ORDER BY " + strings.Join(keys, ", ")
	}
	out := fmt.Sprintf("COPY (SELECT %s FROM %s%s LIMIT %d) TO STDOUT",
		strings.Join(oldCols, ", "), old.name.Quoted(), order, n)

	var buf bytes.Buffer
	began := time.Now()
	tag, err := oldConn.PgConn().CopyTo(ctx, &buf, out)
	if err != nil {
		if ctx.Err() != nil || oldConn.IsClosed() {
			return nil, fmt.Errorf("sampling %s on old: %w", old.name, err)
		}
		return &Sample{Error: "reading the sample on old: " + err.Error()}, nil
	}
	readTime := time.Since(began)

	s := &Sample{Rows: tag.RowsAffected()}
	writeTime, err := copyIntoTemp(ctx, newConn, new, newCols, &buf)
	if err != nil {
		var pgErr *pgconn.PgError
		if !errors.As(err, &pgErr) {
			return nil, fmt.Errorf("sample copy of %s on new: %w", old.name, err)
		}
		s.Error = err.Error()
		return s, nil
	}
	s.Duration = jsonout.Duration(readTime + writeTime)
	if s.Rows > 0 {
		s.Estimate = jsonout.Duration(float64(s.Duration) * float64(max(rows, s.Rows)) / float64(s.Rows))
	}
	return s, nil
}

// copyIntoTemp loads data into a temporary copy of new's columns, in a
// transaction it rolls back, and returns how long the COPY took.
func copyIntoTemp(ctx context.Context, conn *pgx.Conn, new *relation, cols []string, data *bytes.Buffer) (time.Duration, error) {
	tx, err := conn.Begin(ctx)
	if err != nil {
		return 0, err
	}
	defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
	if _, err := tx.Exec(ctx, fmt.Sprintf("CREATE TEMP TABLE %s ON COMMIT DROP AS SELECT %s FROM %s LIMIT 0",
		sampleTable, strings.Join(cols, ", "), new.name.Quoted())); err != nil {
		return 0, err
	}
	began := time.Now()
	if _, err := conn.PgConn().CopyFrom(ctx, data, fmt.Sprintf("COPY pg_temp.%s (%s) FROM STDIN", sampleTable, strings.Join(cols, ", "))); err != nil {
		return 0, err
	}
	return time.Since(began), nil
}
