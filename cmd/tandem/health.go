package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/jsonout"
)

// apiClient calls a running proxy's admin API the way every CLI command
// that talks to it does: on the configured admin address (a wildcard host
// is reached on loopback), over HTTPS when admin_api.tls_cert is set
// (trusting that certificate as well as the system's roots), with the token
// of admin_api.token_file and Content-Type: application/json on a body.
type apiClient struct {
	base  string
	token string
	http  *http.Client
}

func newAPIClient(cfg *config.Config, timeout time.Duration) (*apiClient, error) {
	c := &apiClient{http: &http.Client{Timeout: timeout}}
	if cfg.AdminAPI.TokenFile != "" {
		tok, err := config.ReadToken(cfg.AdminAPI.TokenFile)
		if err != nil {
			return nil, fmt.Errorf("admin_api.token_file: %w", err)
		}
		c.token = tok
	}
	host, port, err := net.SplitHostPort(cfg.Admin)
	if err != nil {
		return nil, fmt.Errorf("admin: %w", err)
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = "127.0.0.1"
	}
	scheme := "http"
	if cfg.AdminAPI.TLSCert != "" {
		scheme = "https"
		roots, err := x509.SystemCertPool()
		if err != nil {
			roots = x509.NewCertPool()
		}
		pem, err := os.ReadFile(cfg.AdminAPI.TLSCert)
		if err != nil {
			return nil, fmt.Errorf("admin_api.tls_cert: %w", err)
		}
		roots.AppendCertsFromPEM(pem)
		c.http.Transport = &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}}
	}
	c.base = scheme + "://" + net.JoinHostPort(host, port)
	return c, nil
}

// do sends one request; a non-empty body goes as JSON.
func (c *apiClient) do(ctx context.Context, method, path, body string) (int, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, strings.NewReader(body))
	if err != nil {
		return 0, nil, err
	}
	if body != "" || method != http.MethodGet {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return resp.StatusCode, b, err
}

// healthResult is what tandem health --json prints.
type healthResult struct {
	URL     string `json:"url"`
	Healthy bool   `json:"healthy"`
	Status  int    `json:"status"` // the HTTP status
	Body    any    `json:"body"`
}

func newHealthCmd() *cobra.Command {
	var ready bool
	var timeout time.Duration
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "health",
		Short: "Ask a running proxy's admin API whether it is up (for container health checks)",
		Long: `Ask the proxy at the configured admin address whether it is serving:
GET /healthz, or with --ready GET /readyz (both stores reachable). It uses the
same configuration as 'tandem proxy' (so the same admin address, TLS and
token) and needs no curl in the image. Exit status 0 means healthy (ready),
1 that it is not or could not be asked.`,
		Example: `  tandem health -c /etc/tandem/tandem.yaml
  HEALTHCHECK CMD ["tandem", "health"]`,
		Args: cobra.NoArgs,
	}
	cmd.Flags().BoolVar(&ready, "ready", false, "check readiness (/readyz: the stores are reachable) instead of liveness (/healthz)")
	cmd.Flags().DurationVar(&timeout, "timeout", 5*time.Second, "give up after this long")
	cmd.Flags().BoolVar(&asJSON, "json", false, `print {"url", "healthy", "status", "body"} (body: /readyz's checks as JSON, else the text)`)
	flags := config.NewFlags(cmd.Flags())
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		cfg, err := flags.Load(os.LookupEnv)
		if err != nil {
			return err
		}
		c, err := newAPIClient(cfg, timeout)
		if err != nil {
			return err
		}
		path := "/healthz"
		if ready {
			path = "/readyz"
		}
		code, body, err := c.do(cmd.Context(), http.MethodGet, path, "")
		if err != nil {
			var ue interface{ Timeout() bool }
			if errors.As(err, &ue) && ue.Timeout() {
				return fmt.Errorf("%s%s: no answer within %s", c.base, path, timeout)
			}
			return fmt.Errorf("%s%s: %w", c.base, path, err)
		}
		if asJSON {
			h := healthResult{URL: c.base + path, Healthy: code == http.StatusOK, Status: code, Body: strings.TrimSpace(string(body))}
			if json.Valid(body) {
				h.Body = json.RawMessage(body)
			}
			if err := jsonout.Write(cmd.OutOrStdout(), h); err != nil {
				return err
			}
			if !h.Healthy {
				return exitCode(1)
			}
			return nil
		}
		if code != http.StatusOK {
			fmt.Fprintf(cmd.ErrOrStderr(), "%s%s: %d %s\n", c.base, path, code, strings.TrimSpace(string(body)))
			return exitCode(1)
		}
		fmt.Fprintf(cmd.OutOrStdout(), "%s%s: ok\n", c.base, path)
		return nil
	}
	return cmd
}
