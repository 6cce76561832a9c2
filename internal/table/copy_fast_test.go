package table

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/config"
)

// copyPaths are the two ways a range copy moves a chunk: as JSON (plain)
// and by COPY through a staging table (fast, forced for every chunk size).
var copyPaths = []struct {
	name     string
	fastRows int
}{{"plain", -1}, {"fast", 1}}

// copyTableOn is CopyTable with the fast path chosen from fastRows.
func copyTableOn(ctx context.Context, fastRows int, primary, secondary *pgx.Conn, src, dst Name, chunk int) (CopyResult, error) {
	p, err := loadCopier(ctx, primary, secondary, src, dst)
	if err != nil {
		return CopyResult{}, err
	}
	res, _, err := p.copyRange(ctx, primary, secondary, RangeOptions{Chunk: chunk, FastRows: fastRows})
	return res, err
}

// copyTableMappedOn is CopyTableMapped with the fast path chosen from
// fastRows.
func copyTableMappedOn(ctx context.Context, fastRows int, primary, secondary *pgx.Conn, m *Mapping, forward bool, chunk int) (CopyResult, error) {
	p, err := newMappedCopier(m, forward)
	if err != nil {
		return CopyResult{}, err
	}
	res, _, err := p.copyRange(ctx, primary, secondary, RangeOptions{Chunk: chunk, FastRows: fastRows})
	return res, err
}

// TestFastPathSameAsPlain copies a mapped table with hostile identifiers
// and many types once per path, into two copies of the new table, and
// checks that both hold the same rows, equal to what the mapping makes of
// the old ones.
func TestFastPathSameAsPlain(t *testing.T) {
	s := newStores(t)
	ctx := context.Background()
	s.both(`CREATE TYPE "Mo""od" AS ENUM ('sad', 'o''k', 'happy'); CREATE TYPE pt AS (x int, "y z" text)`)
	s.old(`CREATE SCHEMA "Sch ""1""";
		CREATE TABLE "Sch ""1"""."Ol""d t" ("K 1" bigint, "k""2" text COLLATE "C", "first" text, "last name" text,
			n numeric(12,3), f float8, r real, ts timestamptz, d date, iv interval, b bytea, j jsonb, js json,
			arr text[], u uuid, m "Mo""od", c pt, bo bool, ip inet, tm time, ch char(4), vb varchar(9),
			PRIMARY KEY ("K 1", "k""2"));
		SET TIME ZONE 'Asia/Kolkata'; SET DateStyle = 'SQL, DMY';
		INSERT INTO "Sch ""1"""."Ol""d t"
		SELECT i / 4, CASE i % 4 WHEN 0 THEN 'a''b' WHEN 1 THEN 'back\slash' WHEN 2 THEN E'tab\there\nnl' ELSE 'ünï "q"' END,
			CASE WHEN i % 9 = 0 THEN NULL ELSE 'F' || i END, 'L ' || i,
			i * 1.125, 1.0 / 3 * i, 0.1::real * i, '2024-02-29 13:14:15.123456+02'::timestamptz + i * interval '1 day', '1999-12-31'::date + i,
			make_interval(days => i, secs => i * 0.5), decode(md5(i::text), 'hex'), jsonb_build_object('a', i, 'q"', ARRAY[1, 2]), '{"x": [1, "\\u00e9"]}',
			ARRAY['x,y', NULL, '"q"', 'back\slash'], md5(i::text)::uuid, (ARRAY['sad', 'o''k', 'happy'])[1 + i % 3]::"Mo""od",
			ROW(i, 'p "' || i || ')')::pt, i % 2 = 0, '10.0.0.1'::inet + i, '23:59:59.999999'::time, 'ab', 'v' || (i % 100)
		FROM generate_series(0, 2499) i`)
	newTable := `("K 1" bigint, "k""2" text COLLATE "C", "Full Name" text, n numeric(12,3), f float8, r real, ts timestamptz, d date, iv interval,
			b bytea, j jsonb, js json, arr text[], u uuid, m "Mo""od", c pt, bo bool, ip inet, tm time, ch char(4), vb varchar(9), PRIMARY KEY ("K 1", "k""2"))`
	s.new(`CREATE SCHEMA "New S"; CREATE TABLE "New S"."Plain" ` + newTable + `; CREATE TABLE "New S"."Fast" ` + newTable + `;
		INSERT INTO "New S"."Plain" ("K 1", "k""2", "Full Name") VALUES (-1, 'gone', 'x'), (3, 'a''b', 'stale'), (9999, 'gone', 'x');
		INSERT INTO "New S"."Fast" SELECT * FROM "New S"."Plain"`)
	old, nw := s.primary(), s.secondary()
	for _, path := range copyPaths {
		decl := config.TableMap{
			To:      map[string]string{"plain": `"New S"."Plain"`, "fast": `"New S"."Fast"`}[path.name],
			Drop:    []string{"first", "last name"},
			Compute: map[string]string{"Full Name": `coalesce("first" || ' ', '') || "last name"`},
		}
		ms, probs, err := LoadMappings(ctx, config.Tables{Map: map[string]config.TableMap{`"Sch ""1"""."Ol""d t"`: decl}}, old, nw)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range probs {
			if !p.FlipOnly {
				t.Fatalf("%s: problem %v", path.name, p)
			}
		}
		m := ms.ForOld(Name{`Sch "1"`, `Ol"d t`})
		if m == nil {
			t.Fatalf("%s: no mapping", path.name)
		}
		res, err := copyTableMappedOn(ctx, path.fastRows, old, nw, m, true, 300)
		if err != nil {
			t.Fatalf("%s: %v", path.name, err)
		}
		if res.Upserted != 2500 || res.Deleted != 2 {
			t.Errorf("%s: %+v, want 2500 upserted, 2 deleted", path.name, res)
		}
	}
	plain, np := hash(t, nw, Name{"New S", "Plain"}, `"K 1", "k""2"`)
	fast, nf := hash(t, nw, Name{"New S", "Fast"}, `"K 1", "k""2"`)
	if plain != fast || np != 2500 || nf != 2500 {
		t.Errorf("plain %s (%d rows), fast %s (%d rows)", plain, np, fast, nf)
	}
	want := queryText(t, old, `SELECT string_agg(concat_ws('|', "K 1", "k""2", coalesce("first" || ' ', '') || "last name", n, f, r, ts, d, iv, b, j, js, arr, u, m, c, bo, ip, tm, ch, vb), ',' ORDER BY "K 1", "k""2") FROM "Sch ""1"""."Ol""d t"`)
	got := queryText(t, nw, `SELECT string_agg(concat_ws('|', "K 1", "k""2", "Full Name", n, f, r, ts, d, iv, b, j, js, arr, u, m, c, bo, ip, tm, ch, vb), ',' ORDER BY "K 1", "k""2") FROM "New S"."Fast"`)
	if got != want {
		t.Errorf("fast copy differs from the old rows")
	}
}
