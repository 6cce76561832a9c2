package proxy

import (
	"bufio"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/xdg-go/scram"
)

// Userlist holds the client credentials that the proxy checks with
// SCRAM-SHA-256. It is read once from a pgbouncer-style file and is
// immutable afterwards, so it is safe for concurrent use.
type Userlist struct {
	creds map[string]scram.StoredCredentials
	// mockKey derives the credentials of unknown users, so they fail like
	// a wrong password with a salt of their own that stays the same from
	// one attempt to the next: as PostgreSQL's scram_mock_salt does, so
	// that the salt does not tell which user names exist.
	mockKey []byte
}

// LoadUserlist reads a pgbouncer-style userlist: one `"user" "secret"` pair a
// line, where the secret is a plain password or a SCRAM-SHA-256 verifier
// (`SCRAM-SHA-256$<iter>:<salt>$<storedkey>:<serverkey>`, as in pg_authid).
// Double quotes inside a field are written twice. Blank lines and lines
// starting with ';' or '#' are ignored.
func LoadUserlist(path string) (*Userlist, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	ul := &Userlist{creds: map[string]scram.StoredCredentials{}}
	sc := bufio.NewScanner(f)
	line := 0
	for sc.Scan() {
		line++
		text := strings.TrimSpace(sc.Text())
		if text == "" || text[0] == ';' || text[0] == '#' {
			continue
		}
		fields, err := splitQuoted(text)
		if err != nil || len(fields) < 2 {
			return nil, fmt.Errorf("%s:%d: want \"user\" \"password\"", path, line)
		}
		cred, err := credentialFor(fields[1])
		if err != nil {
			return nil, fmt.Errorf("%s:%d: user %q: %w", path, line, fields[0], err)
		}
		ul.creds[fields[0]] = cred
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	ul.mockKey = make([]byte, 32)
	if _, err := rand.Read(ul.mockKey); err != nil {
		return nil, err
	}
	return ul, nil
}

// Len reports how many users the list holds.
func (u *Userlist) Len() int { return len(u.creds) }

// lookup returns user's credentials; an unknown user gets a random one, so
// the exchange runs to the end and fails the same way as a wrong password.
func (u *Userlist) lookup(user string) (scram.StoredCredentials, bool) {
	c, ok := u.creds[user]
	if !ok {
		return u.mock(user), false
	}
	return c, true
}

// mock returns the made-up credentials of an unknown user: derived from
// the user name with a key of this process, so each name has its own
// salt, the same at every attempt, and no password matches them.
func (u *Userlist) mock(user string) scram.StoredCredentials {
	derive := func(label string) []byte {
		m := hmac.New(sha256.New, u.mockKey)
		m.Write([]byte(label))
		m.Write([]byte{0})
		m.Write([]byte(user))
		return m.Sum(nil)
	}
	return scram.StoredCredentials{
		KeyFactors: scram.KeyFactors{Salt: string(derive("salt")[:16]), Iters: 4096},
		StoredKey:  derive("stored"),
		ServerKey:  derive("server"),
	}
}

func credentialFor(secret string) (scram.StoredCredentials, error) {
	if strings.HasPrefix(secret, "SCRAM-SHA-256$") {
		return parseVerifier(secret)
	}
	if strings.HasPrefix(secret, "md5") && len(secret) == 35 {
		return scram.StoredCredentials{}, errors.New("md5 hashes cannot be used for SCRAM-SHA-256 authentication; store the plain password or a SCRAM-SHA-256 verifier")
	}
	client, err := scram.SHA256.NewClient("", secret, "")
	if err != nil {
		return scram.StoredCredentials{}, err
	}
	salt := make([]byte, 16)
	if _, err := rand.Read(salt); err != nil {
		return scram.StoredCredentials{}, err
	}
	return client.GetStoredCredentialsWithError(scram.KeyFactors{Salt: string(salt), Iters: 4096})
}

func parseVerifier(v string) (scram.StoredCredentials, error) {
	bad := errors.New("malformed SCRAM-SHA-256 verifier")
	rest := strings.TrimPrefix(v, "SCRAM-SHA-256$")
	iterSalt, keys, ok := strings.Cut(rest, "$")
	if !ok {
		return scram.StoredCredentials{}, bad
	}
	iterStr, saltB64, ok1 := strings.Cut(iterSalt, ":")
	storedB64, serverB64, ok2 := strings.Cut(keys, ":")
	if !ok1 || !ok2 {
		return scram.StoredCredentials{}, bad
	}
	iters, err := strconv.Atoi(iterStr)
	if err != nil || iters < 1 {
		return scram.StoredCredentials{}, bad
	}
	salt, err1 := base64.StdEncoding.DecodeString(saltB64)
	stored, err2 := base64.StdEncoding.DecodeString(storedB64)
	server, err3 := base64.StdEncoding.DecodeString(serverB64)
	if err1 != nil || err2 != nil || err3 != nil || len(stored) != 32 || len(server) != 32 {
		return scram.StoredCredentials{}, bad
	}
	return scram.StoredCredentials{
		KeyFactors: scram.KeyFactors{Salt: string(salt), Iters: iters},
		StoredKey:  stored,
		ServerKey:  server,
	}, nil
}

// splitQuoted splits `"a" "b""c"` into [a, b"c].
func splitQuoted(s string) ([]string, error) {
	var out []string
	for {
		s = strings.TrimLeft(s, " \t")
		if s == "" {
			return out, nil
		}
		if s[0] != '"' {
			return nil, errors.New("field not quoted")
		}
		var b strings.Builder
		i := 1
		for {
			if i >= len(s) {
				return nil, errors.New("unterminated quote")
			}
			if s[i] == '"' {
				if i+1 < len(s) && s[i+1] == '"' {
					b.WriteByte('"')
					i += 2
					continue
				}
				i++
				break
			}
			b.WriteByte(s[i])
			i++
		}
		out = append(out, b.String())
		s = s[i:]
	}
}
