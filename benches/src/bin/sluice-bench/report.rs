//! What a phase measured, and how it is reported: percentiles, `.hgrm`
//! files, an SVG plot and the printed summary.

use std::collections::HashMap;

use hdrhistogram::Histogram;

/// What one phase measured.
#[derive(Debug, Default, serde::Serialize)]
pub(crate) struct Phase {
    pub(crate) rate: u64,
    pub(crate) sent: u64,
    pub(crate) achieved_rate: f64,
    /// Broker only: readings received. Agent: readings it processed.
    pub(crate) received: u64,
    pub(crate) shed: u64,
    pub(crate) late: u64,
    pub(crate) aggregates: u64,
    pub(crate) aggregate_readings: u64,
    pub(crate) spikes: u64,
    pub(crate) spikes_after_warmup: u64,
    pub(crate) alerts: u64,
    pub(crate) spikes_alerted: u64,
    /// Alerts that reached the subscriber before their spike's probe (the
    /// same reading through the broker alone): counted as 1 µs added.
    pub(crate) alerts_before_probe: u64,
    pub(crate) cpu_percent: f64,
    pub(crate) rss_max_kib: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) outage: Option<Outage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) burst: Option<Burst>,
    pub(crate) latency_ms: HashMap<String, Percentiles>,
    #[serde(skip)]
    pub(crate) histograms: Vec<(String, Histogram<u64>)>,
}

/// What an overload burst did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub(crate) struct Burst {
    pub(crate) factor: u64,
    pub(crate) seconds: u64,
    /// Extra readings sent during the burst, and their rate.
    pub(crate) extra_sent: u64,
    pub(crate) extra_rate: f64,
    pub(crate) rss_before_kib: u64,
    pub(crate) rss_during_and_after_kib: u64,
    /// Readings the agent shed (all of the run; none before the burst).
    pub(crate) shed: u64,
    /// With --burst-udp: datagrams the kernel dropped because the agent's
    /// socket buffer was full, as the agent counted them
    /// (`sluice_source_kernel_drops_total`) and as the system did (`Udp:
    /// RcvbufErrors` in /proc/net/snmp, during the burst).
    pub(crate) kernel_drops: u64,
    pub(crate) kernel_drops_system: u64,
    /// With --critical-every: critical readings sent in the burst, and
    /// those the agent's aggregates hold.
    pub(crate) critical_sent: u64,
    pub(crate) critical_in_aggregates: u64,
    /// Alert latency (spike → alert) by when the spike was sent.
    pub(crate) alert_before: Percentiles,
    pub(crate) alert_during: Percentiles,
    pub(crate) alert_first_2s_after: Percentiles,
    pub(crate) alert_from_2s_after: Percentiles,
}

/// What W3 measured.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub(crate) struct Outage {
    pub(crate) seconds: u64,
    /// Records in the outbox at most (sampled every 250 ms).
    pub(crate) backlog_peak: u64,
    /// Records committed when the upstream broker came back.
    pub(crate) backlog_at_restart: u64,
    /// From the restart until every record committed before it had arrived
    /// upstream.
    pub(crate) drain_seconds: f64,
    /// Records committed in all.
    pub(crate) committed: u64,
    /// Distinct seqs upstream, seqs committed but never arrived, and
    /// arrivals beyond one per seq.
    pub(crate) upstream_distinct: u64,
    pub(crate) missing: u64,
    pub(crate) duplicates: u64,
}

#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub(crate) struct Percentiles {
    pub(crate) count: u64,
    pub(crate) p50: f64,
    pub(crate) p90: f64,
    pub(crate) p99: f64,
    pub(crate) p999: f64,
    pub(crate) max: f64,
}

pub(crate) fn percentiles(h: &Histogram<u64>) -> Percentiles {
    let ms = |v: u64| v as f64 / 1000.0;
    Percentiles {
        count: h.len(),
        p50: ms(h.value_at_quantile(0.5)),
        p90: ms(h.value_at_quantile(0.9)),
        p99: ms(h.value_at_quantile(0.99)),
        p999: ms(h.value_at_quantile(0.999)),
        max: ms(h.max()),
    }
}

/// Latency histogram in µs, 1 µs to 10 minutes, 3 significant digits.
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
}

/// The percentile distribution in HdrHistogram's `.hgrm` text format (ms).
pub(crate) fn hgrm(h: &Histogram<u64>) -> String {
    let mut out = format!(
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    for v in h.iter_quantiles(5) {
        let q = v.quantile_iterated_to();
        let inverse = if q < 1.0 {
            format!("{:.2}", 1.0 / (1.0 - q))
        } else {
            "inf".into()
        };
        out += &format!(
            "{:>12.3} {:>14.12} {:>10} {:>14}\n",
            h.highest_equivalent(v.value_iterated_to()) as f64 / 1000.0,
            q,
            v.count_since_last_iteration(),
            inverse
        );
    }
    out += &format!(
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]\n#[Max     = {:>12.3}, Total count    = {:>12}]\n",
        h.mean() / 1000.0,
        h.stdev() / 1000.0,
        h.max() as f64 / 1000.0,
        h.len()
    );
    out
}

/// A percentile-distribution plot (latency against percentile on the usual
/// log scale of 1/(1−p): 90 %, 99 %, 99.9 % … equally spaced), as SVG, drawn
/// with plotters.
pub(crate) fn svg(title: &str, series: &[(&str, &Histogram<u64>)]) -> String {
    let mut out = String::new();
    if let Err(e) = plot(&mut out, title, series) {
        eprintln!("the plot could not be drawn: {e}");
    }
    out
}

fn plot(
    out: &mut String,
    title: &str,
    series: &[(&str, &Histogram<u64>)],
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    // The x axis counts nines: 0 is the median's left end (0 %), 1 is 90 %,
    // 2 is 99 % … 5 is 99.999 %.
    const NINES: f64 = 5.0;
    let quantile = |nines: f64| {
        if nines <= 0.0 {
            0.0
        } else {
            1.0 - 10f64.powf(-nines)
        }
    };
    let max_ms = series
        .iter()
        .map(|(_, h)| h.value_at_quantile(quantile(NINES)) as f64 / 1000.0)
        .fold(0.0f64, f64::max)
        .max(0.001);
    let root = SVGBackend::with_string(out, (760, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 16))
        .margin(14)
        .margin_right(36)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..NINES, 0f64..max_ms * 1.05)?;
    chart
        .configure_mesh()
        .x_labels(6)
        .x_label_formatter(&|n| {
            let labels = ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"];
            labels
                .get(n.round().max(0.0) as usize)
                .map_or_else(String::new, |l| (*l).to_string())
        })
        .x_desc("percentile")
        .y_desc("latency, ms")
        .draw()?;
    let colours = [
        RGBColor(0x1f, 0x77, 0xb4),
        RGBColor(0xd6, 0x27, 0x28),
        RGBColor(0x2c, 0xa0, 0x2c),
        RGBColor(0x94, 0x67, 0xbd),
    ];
    // An empty distribution (no spike alerted yet) has no line.
    for (i, (name, h)) in series
        .iter()
        .enumerate()
        .filter(|(_, (_, h))| !h.is_empty())
    {
        let colour = colours[i % colours.len()];
        let points = (0..=500).map(|k| {
            let nines = NINES * f64::from(k) / 500.0;
            (nines, h.value_at_quantile(quantile(nines)) as f64 / 1000.0)
        });
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

pub(crate) fn print_phase(label: &str, p: &Phase) {
    println!(
        "{label}: rate {} /s target, {:.0} /s achieved, {} sent, {} received/processed",
        p.rate, p.achieved_rate, p.sent, p.received
    );
    if let Some(o) = &p.outage {
        println!(
            "  W3 outage {} s: outbox peak {} records, {} committed at restart, drained in {:.2} s; {} committed, {} distinct upstream, {} missing, {} duplicates",
            o.seconds,
            o.backlog_peak,
            o.backlog_at_restart,
            o.drain_seconds,
            o.committed,
            o.upstream_distinct,
            o.missing,
            o.duplicates
        );
    }
    if let Some(b) = &p.burst {
        println!(
            "  burst ×{} for {} s: {} extra readings at {:.0} /s; RSS max {:.1} MiB before, {:.1} MiB during and after",
            b.factor,
            b.seconds,
            b.extra_sent,
            b.extra_rate,
            b.rss_before_kib as f64 / 1024.0,
            b.rss_during_and_after_kib as f64 / 1024.0
        );
        println!(
            "    shed by the agent {}; dropped by the kernel from a full UDP socket buffer {} (the agent's count; the system's: {})",
            b.shed, b.kernel_drops, b.kernel_drops_system
        );
        if b.critical_sent > 0 {
            println!(
                "    critical readings: {} sent, {} in aggregates ({} missing)",
                b.critical_sent,
                b.critical_in_aggregates,
                b.critical_sent.saturating_sub(b.critical_in_aggregates)
            );
        }
        for (name, l) in [
            ("before", b.alert_before),
            ("during", b.alert_during),
            ("0-2 s after", b.alert_first_2s_after),
            ("2 s after on", b.alert_from_2s_after),
        ] {
            println!(
                "    alert latency {name:<12}: p50 {:>9.3}  p99 {:>9.3}  max {:>9.3} ms (n={})",
                l.p50, l.p99, l.max, l.count
            );
        }
    }
    if label == "agent" {
        println!(
            "  shed {}, late {}, aggregates {} holding {} readings, spikes {} ({} after warm-up), alerts {} ({} matched to a spike), CPU {:.1} %, RSS max {:.1} MiB",
            p.shed,
            p.late,
            p.aggregates,
            p.aggregate_readings,
            p.spikes,
            p.spikes_after_warmup,
            p.alerts,
            p.spikes_alerted,
            p.cpu_percent,
            p.rss_max_kib as f64 / 1024.0
        );
    }
    let mut names: Vec<_> = p.latency_ms.keys().collect();
    names.sort();
    for name in names {
        let l = p.latency_ms[name];
        println!(
            "  {name:<10} latency ms: p50 {:>8.3}  p90 {:>8.3}  p99 {:>8.3}  p99.9 {:>8.3}  max {:>8.3}  (n={})",
            l.p50, l.p90, l.p99, l.p999, l.max, l.count
        );
    }
}

/// Whether the agent kept up: no shedding, every reading the broker got
/// processed, aggregates not later than a window.
pub(crate) fn kept_up(p: &Phase) -> bool {
    p.shed == 0
        && p.received as f64 >= 0.999 * p.sent as f64
        && p.achieved_rate >= 0.97 * p.rate as f64
        && p.latency_ms
            .get("aggregate")
            .is_some_and(|l| l.p99 < 1000.0)
}
