package feed

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/table"
)

// EnsureSchema creates tandem.feed (and the control schema) when missing:
// one definition, internal/route's, which the write flip waits on.
func EnsureSchema(ctx context.Context, conn *pgx.Conn) error {
	return route.EnsureFeedSchema(ctx, conn)
}

// EnsurePublication creates the publication pub (route.FeedNames) over
// tables on the store conn reaches, or adds the tables it lacks. It is idempotent. Changes to a
// partition are published as changes to the partitioned table named in
// scope (publish_via_partition_root).
func EnsurePublication(ctx context.Context, conn *pgx.Conn, pub string, tables []table.Name) error {
	if len(tables) == 0 {
		return errors.New("the change feed has no table in scope to publish")
	}
	var exists bool
	if err := conn.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)", pub).Scan(&exists); err != nil {
		return fmt.Errorf("reading the publication %s: %w", pub, err)
	}
	if !exists {
		list := make([]string, len(tables))
		for i, n := range tables {
			list[i] = n.Quoted()
		}
		_, err := conn.Exec(ctx, "CREATE PUBLICATION "+pub+" FOR TABLE "+strings.Join(list, ", ")+" WITH (publish_via_partition_root = true)")
		var pe *pgconn.PgError
		if errors.As(err, &pe) && pe.Code == "42710" { // created meanwhile by another runner
			err = nil
		}
		if err != nil {
			return fmt.Errorf("creating the publication %s: %w", pub, err)
		}
		return nil
	}
	rows, err := conn.Query(ctx, "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = $1", pub)
	if err != nil {
		return fmt.Errorf("reading the publication %s: %w", pub, err)
	}
	have := map[table.Name]bool{}
	for rows.Next() {
		var n table.Name
		if err := rows.Scan(&n.Schema, &n.Table); err != nil {
			rows.Close()
			return fmt.Errorf("reading the publication %s: %w", pub, err)
		}
		have[n] = true
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return fmt.Errorf("reading the publication %s: %w", pub, err)
	}
	for _, n := range tables {
		if have[n] {
			continue
		}
		_, err := conn.Exec(ctx, "ALTER PUBLICATION "+pub+" ADD TABLE "+n.Quoted())
		var pe *pgconn.PgError
		if errors.As(err, &pe) && pe.Code == "42710" { // added meanwhile
			err = nil
		}
		if err != nil {
			return fmt.Errorf("adding %s to the publication %s: %w", n, pub, err)
		}
	}
	return nil
}

// Publishable splits tables into those that may be published on the store
// conn reaches and those that may not: a table without a replica identity
// (no primary key under REPLICA IDENTITY DEFAULT, or REPLICA IDENTITY
// NOTHING) in a publication makes PostgreSQL refuse every UPDATE and
// DELETE on it, which would break the application's writes on the
// primary. The feed does not check the tables left out.
func Publishable(ctx context.Context, conn *pgx.Conn, tables []table.Name) (ok, without []table.Name, err error) {
	for _, n := range tables {
		var usable bool
		err := conn.QueryRow(ctx, `SELECT c.relreplident IN ('f', 'i')
				OR (c.relreplident = 'd' AND EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary))
			FROM pg_class c WHERE c.oid = to_regclass($1)`, n.Quoted()).Scan(&usable)
		if errors.Is(err, pgx.ErrNoRows) {
			continue // gone meanwhile
		}
		if err != nil {
			return nil, nil, fmt.Errorf("reading the replica identity of %s: %w", n, err)
		}
		if usable {
			ok = append(ok, n)
		} else {
			without = append(without, n)
		}
	}
	return ok, without, nil
}

// EnsureSlot creates the logical slot name (plugin pgoutput) on the
// database conn reaches when it is missing, and reports whether it did.
// Every transaction that commits after it returns is in the slot.
func EnsureSlot(ctx context.Context, conn *pgx.Conn, name string) (created bool, err error) {
	var exists bool
	if err := conn.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database())", name).Scan(&exists); err != nil {
		return false, fmt.Errorf("reading the replication slot %s: %w", name, err)
	}
	if exists {
		return false, nil
	}
	_, err = conn.Exec(ctx, "SELECT pg_create_logical_replication_slot($1, 'pgoutput')", name)
	var pe *pgconn.PgError
	if errors.As(err, &pe) && pe.Code == "42710" { // created meanwhile
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("creating the replication slot %s: %w", name, err)
	}
	return true, nil
}

// DropSlot drops the slot name when it exists. A slot still in use by a
// walsender that is ending is waited for (bounded by ctx).
func DropSlot(ctx context.Context, conn *pgx.Conn, name string) error {
	for {
		_, err := conn.Exec(ctx, "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()", name)
		var pe *pgconn.PgError
		if errors.As(err, &pe) && pe.Code == "55006" { // active: its walsender has not exited yet
			if werr := waitCtx(ctx, 100e6); werr != nil {
				return fmt.Errorf("dropping the replication slot %s: %w", name, err)
			}
			continue
		}
		if err != nil {
			return fmt.Errorf("dropping the replication slot %s: %w", name, err)
		}
		return nil
	}
}
