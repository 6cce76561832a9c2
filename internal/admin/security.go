package admin

import (
	"crypto/sha256"
	"crypto/subtle"
	"mime"
	"net"
	"net/http"
	"strings"
)

// Security says who may use the admin API (issue 12). The zero value
// requires no token, which cmd/tandem allows only on a loopback address;
// the Content-Type and Host checks on state-changing requests apply always,
// as they are what stops a browser on the operator's machine (a cross-site
// form, a DNS-rebinding page) from reaching a loopback admin server.
type Security struct {
	// Token, when not empty, must be sent as "Authorization: Bearer TOKEN"
	// on every request but GET /healthz, /readyz, /metrics and / (the
	// status page's HTML). It is
	// compared in constant time and never logged.
	Token string
	// Hosts are the host names (without port; compared case-insensitively)
	// a state-changing request may name in its Host header besides
	// localhost, 127.0.0.1 and ::1: the admin address's own host and the
	// configured allow-list.
	Hosts []string
}

// public reports whether r may be served without the token: the probes and
// the metrics, which a load balancer or scraper reads without credentials,
// and the status page's HTML, which holds no data (its script asks for the
// token and sends it with every API call).
func public(r *http.Request) bool {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		return false
	}
	switch r.URL.Path {
	case "/healthz", "/readyz", "/metrics", "/":
		return true
	}
	return false
}

// guard wraps h with the checks of s: 401 without the right token, and for
// a request that is not GET or HEAD, 415 unless the body is JSON and 403
// unless the Host header names this server.
func (s Security) guard(h http.Handler) http.Handler {
	var want [sha256.Size]byte
	if s.Token != "" {
		want = sha256.Sum256([]byte(s.Token))
	}
	hosts := map[string]bool{"localhost": true, "127.0.0.1": true, "::1": true}
	for _, h := range s.Hosts {
		if h = strings.TrimSpace(h); h != "" {
			hosts[strings.ToLower(strings.Trim(h, "[]"))] = true
		}
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !public(r) && s.Token != "" {
			got, ok := bearer(r.Header.Get("Authorization"))
			// Hashing both sides first makes the comparison's time
			// independent of the token's length as well as its content.
			sum := sha256.Sum256([]byte(got))
			if !ok || subtle.ConstantTimeCompare(sum[:], want[:]) != 1 {
				w.Header().Set("WWW-Authenticate", `Bearer realm="tandem"`)
				writeJSON(w, http.StatusUnauthorized, errorBody{"missing or wrong admin token: send Authorization: Bearer <the content of admin_api.token_file>"})
				return
			}
		}
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			if mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err != nil || mt != "application/json" {
				writeJSON(w, http.StatusUnsupportedMediaType, errorBody{"a request that changes state must have Content-Type: application/json"})
				return
			}
			if !hosts[hostOnly(r.Host)] {
				writeJSON(w, http.StatusForbidden, errorBody{"the Host header names another server; add the name to admin_api.allowed_hosts if it is this one"})
				return
			}
		}
		h.ServeHTTP(w, r)
	})
}

// bearer extracts the token of an "Authorization: Bearer TOKEN" header.
func bearer(h string) (string, bool) {
	scheme, tok, ok := strings.Cut(h, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	tok = strings.TrimSpace(tok)
	return tok, tok != ""
}

// hostOnly is the lower-cased host of a Host header, without port or IPv6
// brackets.
func hostOnly(hostport string) string {
	host := hostport
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		host = h
	}
	return strings.ToLower(strings.Trim(host, "[]"))
}
