package classify

import (
	"strings"
	"testing"
)

func TestTooDeep(t *testing.T) {
	if TooDeep("SELECT 1 + 1 FROM t WHERE a IN (1, 2, 3)") {
		t.Error("a shallow query is too deep")
	}
	if !TooDeep("SELECT " + strings.Repeat("1+", 20000) + "1") {
		t.Error("a 20,000-level chain is not too deep")
	}
}
