// Package shadow normalises and compares the results of "shadow reads": a
// read served to the client by one PostgreSQL store is also run on the other
// store of a live migration, and the two answers are compared to find data or
// behaviour differences before the cut-over.
//
// The two answers cannot be compared byte for byte. The stores may send a
// column in different wire formats (text on one side, binary on the other),
// with a different but compatible type (int4 migrated to int8, json to
// jsonb), under a different session TimeZone (the same instant rendered with
// another offset), with a different but equal textual form (numeric 1.50 and
// 1.5, json objects with reordered keys or other whitespace, char(n) padding),
// or with float results that differ only in the last bits. Rows without a
// top-level ORDER BY may come in any order, and rows that tie on the ORDER BY
// keys may come in any order among themselves. Each value is therefore
// rendered to a canonical string ([Canonical]) and rows are compared as
// multisets or ordered runs according to the query's [Shape]; [Compare]
// reports what remains as a [Diff].
package shadow
