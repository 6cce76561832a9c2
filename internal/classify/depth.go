package classify

import pg_query "github.com/pganalyze/pg_query_go/v6"

// TooDeep reports whether sql might parse into a tree deep enough to crash
// pg_query's parser (see tooDeep). Callers outside this package that parse
// client SQL themselves check it before pg_query.Parse; a text that does
// not scan is not too deep (the parser refuses it cleanly).
func TooDeep(sql string) bool {
	sc, err := pg_query.Scan(sql)
	return err == nil && tooDeep(sc.Tokens)
}
