package jsonout

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"
)

type inner struct {
	Names []string          `json:"names"`
	Tags  map[string]string `json:"tags"`
	Wait  Duration          `json:"wait"`
}

type outer struct {
	Inner   inner    `json:"inner"`
	Ptr     *inner   `json:"ptr"`
	NilPtr  *inner   `json:"nil_ptr"`
	List    []inner  `json:"list"`
	Any     any      `json:"any"`
	Raw     []byte   `json:"raw"`
	private []string //nolint:unused // shows unexported fields are left alone
}

func TestWriteEmptyListsAndDurationText(t *testing.T) {
	in := outer{Ptr: &inner{Wait: Duration(1500 * time.Millisecond)}, List: []inner{{}}, Any: inner{}}
	var buf bytes.Buffer
	if err := Write(&buf, in); err != nil {
		t.Fatal(err)
	}
	got := buf.String()
	for _, bad := range []string{`"names": null`, `"tags": null`, `"list": null`} {
		if strings.Contains(got, bad) {
			t.Errorf("output has %s:\n%s", bad, got)
		}
	}
	if !strings.Contains(got, `"wait": "1.5s"`) || !strings.Contains(got, `"nil_ptr": null`) {
		t.Errorf("output:\n%s", got)
	}
	if in.Ptr.Names != nil || in.Inner.Names != nil {
		t.Error("Write changed its argument")
	}
	var back inner
	if err := json.Unmarshal([]byte(`{"wait":"2m3s"}`), &back); err != nil || back.Wait.D() != 123*time.Second {
		t.Errorf("decoding duration text: %v %v", back.Wait, err)
	}
}
