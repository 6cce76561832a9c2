package main

import (
	"io"
	"log/slog"

	"github.com/tandemdb/tandem/internal/config"
)

// newLogger builds the process logger from the log section. Tandem never logs
// passwords, and statement text or parameters only at debug level.
func newLogger(c config.Log, w io.Writer) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(c.Level))
	opts := &slog.HandlerOptions{Level: level}
	if c.Format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}
