package config

import (
	"net/url"
	"strconv"
	"strings"
)

// redacted replaces secrets in DSNs.
const redacted = "xxxxx"

// RedactDSN returns dsn with every password replaced by "xxxxx", so it can be logged or shown. It handles both
// libpq forms:
//
//   - URLs (postgres:// or postgresql://): the password in the user info and the password and sslpassword query
//     parameters. A URL that does not parse is redacted conservatively: everything between the user name and the
//     last "@" is treated as the password.
//   - keyword/value strings: the values of password and sslpassword, quoted (password='a b') or not, with
//     libpq's backslash escapes.
//
// Everything else is returned unchanged.
func RedactDSN(dsn string) string {
	out, _ := redactDSN(dsn)
	return out
}

// redactDSN returns the redacted DSN and the secrets it removed, as they appeared in dsn.
func redactDSN(dsn string) (string, []string) {
	trimmed := strings.TrimLeft(dsn, " \t\r\n")
	if strings.HasPrefix(trimmed, "postgres://") || strings.HasPrefix(trimmed, "postgresql://") {
		return redactURL(dsn)
	}
	return redactKeywordValue(dsn)
}

func isSecretKey(k string) bool { return k == "password" || k == "sslpassword" }

// redactURL redacts a libpq connection URL.
func redactURL(dsn string) (string, []string) {
	schemeEnd := strings.Index(dsn, "://") + len("://")
	head, rest := dsn[:schemeEnd], dsn[schemeEnd:]

	// Where the user info ends: for a URL that parses, the last "@" in the authority (as net/url and pgx read
	// it); otherwise the last "@" anywhere, which may mask more than the password but never less.
	at := -1
	if _, err := url.Parse(dsn); err == nil {
		authority := rest
		if i := strings.IndexAny(authority, "/?#"); i >= 0 {
			authority = authority[:i]
		}
		at = strings.LastIndex(authority, "@")
	} else {
		at = strings.LastIndex(rest, "@")
	}

	var secrets []string
	var b strings.Builder
	b.WriteString(head)
	tail := rest
	if at >= 0 {
		userinfo := rest[:at]
		if colon := strings.IndexByte(userinfo, ':'); colon >= 0 {
			secrets = append(secrets, userinfo[colon+1:])
			userinfo = userinfo[:colon+1] + redacted
		}
		b.WriteString(userinfo)
		b.WriteByte('@')
		tail = rest[at+1:]
	}
	q := strings.IndexByte(tail, '?')
	if q < 0 {
		b.WriteString(tail)
		return b.String(), secrets
	}
	b.WriteString(tail[:q+1])
	query, fragment := tail[q+1:], ""
	if h := strings.IndexByte(query, '#'); h >= 0 {
		query, fragment = query[:h], query[h:]
	}
	params := strings.Split(query, "&")
	for i, p := range params {
		k, v, ok := strings.Cut(p, "=")
		if !ok {
			continue
		}
		if uk, err := url.QueryUnescape(k); err == nil {
			k = uk
		}
		if isSecretKey(k) {
			secrets = append(secrets, v)
			params[i] = p[:len(p)-len(v)] + redacted
		}
	}
	b.WriteString(strings.Join(params, "&"))
	b.WriteString(fragment)
	return b.String(), secrets
}

// redactKeywordValue redacts a libpq keyword/value string: keyword = value pairs separated by white space, where
// a value is either single-quoted or runs to the next white space, and a backslash escapes the next character.
func redactKeywordValue(dsn string) (string, []string) {
	var secrets []string
	var b strings.Builder
	isSpace := func(c byte) bool { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v' }
	i := 0
	for i < len(dsn) {
		// White space between pairs.
		start := i
		for i < len(dsn) && isSpace(dsn[i]) {
			i++
		}
		// Keyword.
		for i < len(dsn) && dsn[i] != '=' && !isSpace(dsn[i]) {
			i++
		}
		key := strings.TrimLeft(dsn[start:i], " \t\n\r\f\v")
		for i < len(dsn) && isSpace(dsn[i]) {
			i++
		}
		if i >= len(dsn) || dsn[i] != '=' {
			b.WriteString(dsn[start:i]) // not a pair; copy it and go on
			continue
		}
		i++ // '='
		for i < len(dsn) && isSpace(dsn[i]) {
			i++
		}
		b.WriteString(dsn[start:i])
		// Value.
		vstart := i
		if i < len(dsn) && dsn[i] == '\'' {
			i++
			for i < len(dsn) && dsn[i] != '\'' {
				if dsn[i] == '\\' {
					i++
				}
				i++
			}
			i = min(i+1, len(dsn)) // closing quote; an unterminated value runs to the end
		} else {
			for i < len(dsn) && !isSpace(dsn[i]) {
				if dsn[i] == '\\' {
					i++
				}
				i++
			}
			i = min(i, len(dsn))
		}
		value := dsn[vstart:i]
		if isSecretKey(key) {
			secrets = append(secrets, value, unquoteKeywordValue(value))
			b.WriteString(redacted)
		} else {
			b.WriteString(value)
		}
	}
	return b.String(), secrets
}

// unquoteKeywordValue undoes keyword/value quoting and escapes.
func unquoteKeywordValue(v string) string {
	v = strings.TrimPrefix(v, "'")
	v = strings.TrimSuffix(v, "'")
	var b strings.Builder
	for i := 0; i < len(v); i++ {
		if v[i] == '\\' && i+1 < len(v) {
			i++
		}
		b.WriteByte(v[i])
	}
	return b.String()
}

// redactError removes from msg, an error about dsn, the DSN itself as pgconn quotes it, and any password of dsn in
// the forms it may appear (as written, percent-decoded, Go-quoted).
func redactError(msg, dsn string) string {
	// pgconn.ParseConfigError reads "cannot parse `<best-effort redacted DSN>`: <reason>"; keep the reason.
	if rest, ok := strings.CutPrefix(msg, "cannot parse `"); ok {
		if i := strings.LastIndex(rest, "`: "); i >= 0 {
			msg = rest[i+len("`: "):]
		}
	}
	_, secrets := redactDSN(dsn)
	var forms []string
	for _, s := range secrets {
		if s == "" {
			continue
		}
		forms = append(forms, s)
		if u, err := url.PathUnescape(s); err == nil {
			forms = append(forms, u)
		}
		if u, err := url.QueryUnescape(s); err == nil {
			forms = append(forms, u)
		}
	}
	for _, f := range forms {
		if q := strconv.Quote(f); len(q) > 2 {
			forms = append(forms, q[1:len(q)-1])
		}
	}
	for _, f := range forms {
		if f != "" {
			msg = strings.ReplaceAll(msg, f, redacted)
		}
	}
	return msg
}
