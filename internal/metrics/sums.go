package metrics

import (
	dto "github.com/prometheus/client_model/go"
)

// Sums reads the registry as /metrics would serve it and sums each family
// over its series: the key NAME holds the sum over every series (for a
// histogram, NAME_sum and NAME_count), and NAME{label=value} the sum over
// the series carrying that one label value. The status page's charts are
// sampled from it (admin.History), so they show what /metrics shows.
func (p *Prometheus) Sums() (map[string]float64, error) {
	fams, err := p.gatherer.Gather()
	if err != nil {
		return nil, err
	}
	out := map[string]float64{}
	for _, f := range fams {
		name := f.GetName()
		for _, m := range f.GetMetric() {
			var v float64
			switch {
			case m.Counter != nil:
				v = m.Counter.GetValue()
			case m.Gauge != nil:
				v = m.Gauge.GetValue()
			case m.Histogram != nil:
				out[name+"_sum"] += m.Histogram.GetSampleSum()
				out[name+"_count"] += float64(m.Histogram.GetSampleCount())
				continue
			default:
				continue
			}
			out[name] += v
			for _, l := range m.GetLabel() {
				out[labelKey(name, l)] += v
			}
		}
	}
	return out, nil
}

func labelKey(name string, l *dto.LabelPair) string {
	return name + "{" + l.GetName() + "=" + l.GetValue() + "}"
}
