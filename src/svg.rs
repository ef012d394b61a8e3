/*!
The timeline picture of an incident (or a simulated run), as a standalone SVG.

A pure function from a [`Chart`] to an SVG string, written by hand (no dependencies):
table fill (entries) against `nf_conntrack_max` over time — the max as a step line, since
it only changes when someone writes it — packet drops as red dots on the fill line, and
a labelled vertical marker for every stage firing and rollback step. Markers of the same
stage and kind share one label (`raise_limits ×3`) so a long stepwise rollback does not
bury the picture in text; labels that would collide go on further rows above the plot.
*/

use crate::engine::Action;
use crate::simulate::{Event, Timeline};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// What the picture shows. Times are milliseconds from the start of the picture.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Chart {
    pub title: String,
    /// Wall-clock time (Unix ms) of `t_ms == 0`: ticks then show UTC clock times;
    /// `None` shows elapsed time (simulations). The picture spans the times it holds.
    pub wall_start_unix_ms: Option<u64>,
    pub points: Vec<ChartPoint>,
    pub drops: Vec<DropMark>,
    pub markers: Vec<Marker>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChartPoint {
    pub t_ms: u64,
    pub count: u64,
    pub max: u64,
}

/// Packets dropped since the previous point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropMark {
    pub t_ms: u64,
    pub packets: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    pub t_ms: u64,
    /// The stage's name (`raise_limits`, …).
    pub stage: String,
    pub kind: MarkerKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum MarkerKind {
    /// The stage fired and its change took effect.
    Stage,
    /// One rollback step of the stage.
    Rollback,
    /// Refused as not permitted here.
    Refused,
    Failed,
}

impl Chart {
    /// The picture of a simulated run: its rows are the points (one per event; the
    /// timeline has no rows between events), its decisions the markers.
    pub fn from_timeline(timeline: &Timeline, title: impl Into<String>) -> Chart {
        let mut chart = Chart {
            title: title.into(),
            ..Chart::default()
        };
        let outcome = |decision| {
            timeline.rows.iter().find_map(|r| match &r.event {
                Event::Outcome { id, outcome } if *id == decision => Some(outcome.as_str()),
                _ => None,
            })
        };
        chart.points = timeline
            .samples
            .iter()
            .filter(|&&(_, _, max)| max > 0)
            .map(|&(t_ms, count, max)| ChartPoint { t_ms, count, max })
            .collect();
        chart.points.dedup_by_key(|p| p.t_ms);
        for row in &timeline.rows {
            let t_ms = row.t_ms;
            if let Event::Decision {
                id, stage, action, ..
            } = &row.event
            {
                let action = match action {
                    Action::DryRun(inner) => inner,
                    action => action,
                };
                let result = outcome(*id).unwrap_or("");
                let kind = if result.starts_with("not permitted") {
                    MarkerKind::Refused
                } else if result.starts_with("failed") {
                    MarkerKind::Failed
                } else if matches!(action, Action::Revert(_) | Action::Untrack { .. }) {
                    MarkerKind::Rollback
                } else {
                    MarkerKind::Stage
                };
                chart.markers.push(Marker {
                    t_ms,
                    stage: stage.name().to_string(),
                    kind,
                });
            }
        }
        chart
    }
}

const WIDTH: f64 = 960.0;
const LEFT: f64 = 78.0;
const RIGHT: f64 = 32.0;
const PLOT_HEIGHT: f64 = 300.0;
const LANE: f64 = 17.0;
const FIRST_LANE_BASELINE: f64 = 58.0;
/// Labels beyond this many rows share the last one (rare: one label per stage and kind).
const MAX_LANES: usize = 4;
/// Average glyph width of the 11 px labels, for collision checks.
const GLYPH: f64 = 6.4;

const COUNT_COLOUR: &str = "#2563eb";
const MAX_COLOUR: &str = "#111827";
const DROP_COLOUR: &str = "#dc2626";

fn stage_colour(stage: &str) -> &'static str {
    match stage {
        "raise_limits" => "#7c3aed",
        "shorten_timeouts" => "#d97706",
        "notrack_hot_ports" => "#059669",
        "evict" => "#db2777",
        _ => "#6b7280",
    }
}

fn dash(kind: MarkerKind) -> &'static str {
    match kind {
        MarkerKind::Stage => "",
        MarkerKind::Rollback => " stroke-dasharray=\"6 4\"",
        MarkerKind::Refused | MarkerKind::Failed => " stroke-dasharray=\"2 3\"",
    }
}

fn label_text(kind: MarkerKind, stage: &str, n: usize) -> String {
    let times = if n > 1 {
        format!(" ×{n}")
    } else {
        String::new()
    };
    match kind {
        MarkerKind::Stage => format!("▲ {stage}{times}"),
        MarkerKind::Rollback if n > 1 => format!("↩ {stage} rolled back ({n} steps)"),
        MarkerKind::Rollback => format!("↩ {stage} rolled back"),
        MarkerKind::Refused => format!("✗ {stage} not permitted{times}"),
        MarkerKind::Failed => format!("✗ {stage} failed{times}"),
    }
}

/// Escapes text for XML content and attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// A round step (1, 2, 2.5 or 5 × 10^k) giving about `ticks` ticks up to `top`.
fn nice_step(top: f64, ticks: f64) -> f64 {
    let raw = (top / ticks).max(1.0);
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * magnitude)
}

/// `4096`, `40k`, `1.5M`.
fn entries_label(v: f64) -> String {
    let trim = |s: String| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    };
    if v >= 1e6 {
        format!("{}M", trim(format!("{:.2}", v / 1e6)))
    } else if v >= 1e4 {
        format!("{}k", trim(format!("{:.1}", v / 1e3)))
    } else {
        format!("{v:.0}")
    }
}

/// A round time step (ms) giving at most about 8 ticks over `span_ms`.
fn time_step(span_ms: u64) -> u64 {
    const STEPS_S: [u64; 19] = [
        1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400,
        172800,
    ];
    STEPS_S
        .into_iter()
        .map(|s| s * 1000)
        .find(|&s| span_ms / s <= 8)
        .unwrap_or(172_800_000)
}

fn time_label(t_ms: u64, wall_start: Option<u64>, step_ms: u64) -> String {
    match wall_start {
        Some(start) => {
            let clock = crate::incident::clock(start + t_ms);
            if step_ms.is_multiple_of(60_000) {
                clock[..5].to_string()
            } else {
                clock
            }
        }
        None => {
            let s = t_ms / 1000;
            if s >= 3600 {
                format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
            } else {
                format!("{}:{:02}", s / 60, s % 60)
            }
        }
    }
}

/// One label per (kind, stage), at the first marker of its group.
struct Label {
    x: f64,
    text: String,
    colour: &'static str,
    kind: MarkerKind,
    lane: usize,
    /// Start-anchored right of the line, or end-anchored left of it near the right edge.
    anchor_end: bool,
}

fn place_labels(chart: &Chart, x_of: &dyn Fn(u64) -> f64, plot_right: f64) -> Vec<Label> {
    let mut groups: BTreeMap<(MarkerKind, &str), (u64, usize)> = BTreeMap::new();
    for m in &chart.markers {
        let group = groups
            .entry((m.kind, m.stage.as_str()))
            .or_insert((m.t_ms, 0));
        group.0 = group.0.min(m.t_ms);
        group.1 += 1;
    }
    let mut labels: Vec<Label> = groups
        .into_iter()
        .map(|((kind, stage), (t, n))| {
            let text = label_text(kind, stage, n);
            let x = x_of(t);
            let width = text.chars().count() as f64 * GLYPH;
            Label {
                x,
                anchor_end: x + 4.0 + width > plot_right + RIGHT - 4.0,
                text,
                colour: stage_colour(stage),
                kind,
                lane: 0,
            }
        })
        .collect();
    labels.sort_by(|a, b| a.x.total_cmp(&b.x));
    let mut lanes: Vec<Vec<(f64, f64)>> = Vec::new();
    for label in &mut labels {
        let width = label.text.chars().count() as f64 * GLYPH + 8.0;
        let span = if label.anchor_end {
            (label.x - width, label.x)
        } else {
            (label.x, label.x + width)
        };
        let free = |lane: &Vec<(f64, f64)>| lane.iter().all(|&(a, b)| span.1 < a || span.0 > b);
        let lane = lanes
            .iter()
            .position(free)
            .unwrap_or_else(|| {
                lanes.push(Vec::new());
                lanes.len() - 1
            })
            .min(MAX_LANES - 1);
        if let Some(occupied) = lanes.get_mut(lane) {
            occupied.push(span);
        }
        label.lane = lane;
    }
    labels
}

/// Renders the chart as a standalone SVG document.
pub fn render(chart: &Chart) -> String {
    let plot_left = LEFT;
    let plot_right = WIDTH - RIGHT;
    let times = || {
        chart
            .points
            .iter()
            .map(|p| p.t_ms)
            .chain(chart.markers.iter().map(|m| m.t_ms))
            .chain(chart.drops.iter().map(|d| d.t_ms))
    };
    let t_start = times().min().unwrap_or(0);
    let t_end = times().max().unwrap_or(0).max(t_start + 1000);
    let x_of = |t: u64| {
        plot_left + (plot_right - plot_left) * (t - t_start) as f64 / (t_end - t_start) as f64
    };
    let labels = place_labels(chart, &x_of, plot_right);
    let lanes = labels.iter().map(|l| l.lane + 1).max().unwrap_or(0);
    let plot_top =
        FIRST_LANE_BASELINE + lanes as f64 * LANE + 4.0 - if lanes == 0 { 16.0 } else { 0.0 };
    let plot_bottom = plot_top + PLOT_HEIGHT;
    let legend_y = plot_bottom + 52.0;
    let height = legend_y + 22.0;

    let y_top_value = chart
        .points
        .iter()
        .map(|p| p.count.max(p.max))
        .max()
        .unwrap_or(0)
        .max(10) as f64;
    let y_step = nice_step(y_top_value * 1.05, 5.0);
    let y_top = (y_top_value * 1.05 / y_step).ceil() * y_step;
    let y_of = |v: u64| plot_bottom - PLOT_HEIGHT * v as f64 / y_top;

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        svg,
        r##"<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="#ffffff"/>"##
    );
    let _ = writeln!(
        svg,
        r##"<text x="{plot_left}" y="26" font-size="15" font-weight="bold" fill="#111827">{}</text>"##,
        escape(&chart.title)
    );

    // Grid and y axis.
    let _ = writeln!(svg, r#"<g class="y-axis">"#);
    let mut v = 0.0;
    while v <= y_top + 0.5 {
        let y = y_of(v as u64);
        let _ = writeln!(
            svg,
            r##"<line x1="{plot_left}" y1="{y:.1}" x2="{plot_right}" y2="{y:.1}" stroke="#e5e7eb"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#374151">{}</text>"##,
            plot_left - 8.0,
            y + 4.0,
            entries_label(v)
        );
        v += y_step;
    }
    let mid = (plot_top + plot_bottom) / 2.0;
    let _ = writeln!(
        svg,
        r##"<text x="18" y="{mid:.1}" text-anchor="middle" transform="rotate(-90 18 {mid:.1})" fill="#374151">entries</text>"##
    );
    let _ = writeln!(svg, "</g>");

    // x axis.
    let step = time_step(t_end - t_start);
    let wall = chart.wall_start_unix_ms;
    // Ticks on round times (of the clock, when it is known).
    let origin = wall.unwrap_or(0) + t_start;
    let mut t = t_start + (step - origin % step) % step;
    let _ = writeln!(svg, r#"<g class="x-axis">"#);
    while t <= t_end {
        let x = x_of(t);
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{plot_bottom:.1}" x2="{x:.1}" y2="{:.1}" stroke="#6b7280"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" fill="#374151">{}</text>"##,
            plot_bottom + 5.0,
            plot_bottom + 18.0,
            time_label(t, wall, step)
        );
        t += step;
    }
    let _ = writeln!(
        svg,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#374151">{}</text>"##,
        (plot_left + plot_right) / 2.0,
        plot_bottom + 34.0,
        if wall.is_some() {
            "time (UTC)"
        } else {
            "simulated time (m:ss)"
        }
    );
    let _ = writeln!(svg, "</g>");
    let _ = writeln!(
        svg,
        r##"<rect x="{plot_left}" y="{plot_top:.1}" width="{:.1}" height="{PLOT_HEIGHT}" fill="none" stroke="#9ca3af"/>"##,
        plot_right - plot_left
    );

    if chart.points.is_empty() {
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{mid:.1}" text-anchor="middle" fill="#6b7280">no samples recorded</text>"##,
            (plot_left + plot_right) / 2.0
        );
    }

    // Markers under the lines, so the data stays readable where they cross.
    let _ = writeln!(svg, r#"<g class="markers">"#);
    for (i, m) in chart.markers.iter().enumerate() {
        // Markers at the same moment sit side by side instead of hiding each other.
        let same_before = chart.markers[..i]
            .iter()
            .filter(|o| o.t_ms == m.t_ms)
            .count();
        let x = x_of(m.t_ms) + 2.5 * same_before as f64;
        let _ = writeln!(
            svg,
            r#"<line class="marker {}" x1="{x:.1}" y1="{plot_top:.1}" x2="{x:.1}" y2="{plot_bottom:.1}" stroke="{}" stroke-width="1.5" opacity="0.85"{}><title>{}</title></line>"#,
            marker_class(m.kind),
            stage_colour(&m.stage),
            dash(m.kind),
            escape(&format!("{} {}", m.stage, marker_class(m.kind)))
        );
    }
    for label in &labels {
        let baseline = FIRST_LANE_BASELINE + label.lane as f64 * LANE;
        let (anchor, tx) = if label.anchor_end {
            ("end", label.x - 4.0)
        } else {
            ("start", label.x + 4.0)
        };
        let _ = writeln!(
            svg,
            r#"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{plot_top:.1}" stroke="{c}" stroke-width="1" opacity="0.6"{d}/><text class="marker-label" x="{tx:.1}" y="{baseline:.1}" text-anchor="{anchor}" fill="{c}" font-weight="bold">{}</text>"#,
            baseline - 10.0,
            escape(&label.text),
            x = label.x,
            c = label.colour,
            d = dash(label.kind),
        );
    }
    let _ = writeln!(svg, "</g>");

    if !chart.points.is_empty() {
        // Fill under the count line.
        let first = chart.points[0];
        let last = chart.points[chart.points.len() - 1];
        let mut area = format!("M{:.1},{plot_bottom:.1}", x_of(first.t_ms));
        // Long stretches without a point are drawn dotted: nothing is known in between.
        let gap = gap_threshold(&chart.points);
        let mut count_line = String::new();
        let mut gaps = String::new();
        for (i, p) in chart.points.iter().enumerate() {
            let (x, y) = (x_of(p.t_ms), y_of(p.count));
            let _ = write!(area, " L{x:.1},{y:.1}");
            match i.checked_sub(1).map(|j| chart.points[j]) {
                Some(prev) if p.t_ms - prev.t_ms > gap => {
                    let _ = write!(
                        gaps,
                        "M{:.1},{:.1} L{x:.1},{y:.1} ",
                        x_of(prev.t_ms),
                        y_of(prev.count)
                    );
                    let _ = write!(count_line, " M{x:.1},{y:.1}");
                }
                Some(_) => {
                    let _ = write!(count_line, " L{x:.1},{y:.1}");
                }
                None => {
                    let _ = write!(count_line, "M{x:.1},{y:.1}");
                }
            }
        }
        let _ = write!(area, " L{:.1},{plot_bottom:.1} Z", x_of(last.t_ms));
        let _ = writeln!(
            svg,
            r#"<path d="{area}" fill="{COUNT_COLOUR}" fill-opacity="0.12" stroke="none"/>"#
        );
        // The max holds its value until the next point: a step line.
        let mut max_line = format!("M{:.1},{:.1}", x_of(first.t_ms), y_of(first.max));
        for p in &chart.points[1..] {
            let _ = write!(max_line, " H{:.1} V{:.1}", x_of(p.t_ms), y_of(p.max));
        }
        let _ = writeln!(
            svg,
            r#"<path class="max" d="{max_line}" fill="none" stroke="{MAX_COLOUR}" stroke-width="2" stroke-dasharray="7 3"/>"#
        );
        let _ = writeln!(
            svg,
            r#"<path class="count" d="{count_line}" fill="none" stroke="{COUNT_COLOUR}" stroke-width="2.2" stroke-linejoin="round"/>"#
        );
        if !gaps.is_empty() {
            let _ = writeln!(
                svg,
                r#"<path class="gap" d="{}" fill="none" stroke="{COUNT_COLOUR}" stroke-width="1.5" stroke-dasharray="1 4" stroke-linecap="round"/>"#,
                gaps.trim_end()
            );
        }
        // Sparse series (simulations record a row per event only): show where the
        // known values are, so straight stretches are not read as measurements.
        if chart.points.len() < 60 {
            for p in &chart.points {
                let _ = writeln!(
                    svg,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="2.2" fill="{COUNT_COLOUR}"/>"#,
                    x_of(p.t_ms),
                    y_of(p.count)
                );
            }
        }
        for d in &chart.drops {
            let count = chart
                .points
                .iter()
                .rev()
                .find(|p| p.t_ms <= d.t_ms)
                .map_or(0, |p| p.count);
            let _ = writeln!(
                svg,
                r##"<circle class="drop" cx="{:.1}" cy="{:.1}" r="4" fill="{DROP_COLOUR}" stroke="#ffffff" stroke-width="1"><title>{} packets dropped</title></circle>"##,
                x_of(d.t_ms),
                y_of(count),
                d.packets
            );
        }
    }

    legend(&mut svg, chart, legend_y);
    svg.push_str("</svg>\n");
    svg
}

/// Intervals longer than this (ms) have no known values: ten times the median interval,
/// and at least a minute.
fn gap_threshold(points: &[ChartPoint]) -> u64 {
    let mut intervals: Vec<u64> = points.windows(2).map(|w| w[1].t_ms - w[0].t_ms).collect();
    intervals.sort_unstable();
    let median = intervals.get(intervals.len() / 2).copied().unwrap_or(0);
    (median * 10).max(60_000)
}

fn marker_class(kind: MarkerKind) -> &'static str {
    match kind {
        MarkerKind::Stage => "stage",
        MarkerKind::Rollback => "rollback",
        MarkerKind::Refused => "refused",
        MarkerKind::Failed => "failed",
    }
}

/// What a legend item's swatch looks like.
enum Swatch {
    Line(&'static str, &'static str),
    Dot,
    Marker(MarkerKind),
}

fn legend(svg: &mut String, chart: &Chart, y: f64) {
    let mut items = vec![
        (Swatch::Line(COUNT_COLOUR, ""), "entries in the table"),
        (
            Swatch::Line(MAX_COLOUR, r#" stroke-dasharray="7 3""#),
            "nf_conntrack_max",
        ),
    ];
    if !chart.drops.is_empty() {
        items.push((Swatch::Dot, "packets dropped"));
    }
    let gap = gap_threshold(&chart.points);
    if chart.points.windows(2).any(|w| w[1].t_ms - w[0].t_ms > gap) {
        items.push((
            Swatch::Line(
                COUNT_COLOUR,
                r#" stroke-dasharray="1 4" stroke-linecap="round""#,
            ),
            "no data in between",
        ));
    }
    let mut kinds: Vec<MarkerKind> = chart.markers.iter().map(|m| m.kind).collect();
    kinds.sort();
    kinds.dedup();
    items.extend(kinds.into_iter().map(|kind| {
        let text = match kind {
            MarkerKind::Stage => "stage applied",
            MarkerKind::Rollback => "rollback step",
            MarkerKind::Refused => "not permitted",
            MarkerKind::Failed => "failed",
        };
        (Swatch::Marker(kind), text)
    }));
    let _ = writeln!(svg, r#"<g class="legend">"#);
    let mut x = LEFT;
    for (swatch, text) in items {
        let _ = match swatch {
            Swatch::Line(colour, extra) => write!(
                svg,
                r#"<line x1="{x:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{colour}" stroke-width="2.2"{extra}/>"#,
                x + 20.0
            ),
            Swatch::Dot => write!(
                svg,
                r#"<circle cx="{:.1}" cy="{y:.1}" r="4" fill="{DROP_COLOUR}"/>"#,
                x + 10.0
            ),
            Swatch::Marker(kind) => write!(
                svg,
                r##"<line x1="{mx:.1}" y1="{:.1}" x2="{mx:.1}" y2="{:.1}" stroke="#6b7280" stroke-width="1.5"{}/>"##,
                y - 7.0,
                y + 7.0,
                dash(kind),
                mx = x + 10.0,
            ),
        };
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" fill="#374151">{}</text>"##,
            x + 26.0,
            y + 4.0,
            escape(text)
        );
        x += 26.0 + text.chars().count() as f64 * GLYPH + 22.0;
    }
    let _ = writeln!(svg, "</g>");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses the whole document: tags must nest and close, attributes be quoted.
    fn assert_well_formed(svg: &str) {
        let mut reader = quick_xml::Reader::from_str(svg);
        reader.config_mut().check_end_names = true;
        let mut depth = 0i32;
        loop {
            match reader.read_event().expect("well-formed XML") {
                quick_xml::events::Event::Start(_) => depth += 1,
                quick_xml::events::Event::End(_) => depth -= 1,
                quick_xml::events::Event::Eof => break,
                _ => {}
            }
        }
        assert_eq!(depth, 0, "unclosed elements");
    }

    fn sample_chart() -> Chart {
        let points = (0..40)
            .map(|i| ChartPoint {
                t_ms: i * 1000,
                count: (i * 120).min(4096),
                max: if i < 20 { 4096 } else { 5768 },
            })
            .collect();
        Chart {
            title: "incident <test> & co".into(),
            wall_start_unix_ms: Some(1_795_317_372_000),
            points,
            drops: vec![DropMark {
                t_ms: 19_000,
                packets: 89,
            }],
            markers: vec![
                Marker {
                    t_ms: 20_000,
                    stage: "raise_limits".into(),
                    kind: MarkerKind::Stage,
                },
                Marker {
                    t_ms: 20_000,
                    stage: "shorten_timeouts".into(),
                    kind: MarkerKind::Refused,
                },
                Marker {
                    t_ms: 39_000,
                    stage: "raise_limits".into(),
                    kind: MarkerKind::Rollback,
                },
            ],
        }
    }

    #[test]
    fn renders_a_well_formed_picture_with_every_mark() {
        let svg = render(&sample_chart());
        assert_well_formed(&svg);
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(
            svg.contains("incident &lt;test&gt; &amp; co"),
            "title escaped"
        );
        for needle in [
            r#"class="count""#,
            r#"class="max""#,
            r#"class="drop""#,
            r#"class="marker stage""#,
            r#"class="marker rollback""#,
            r#"class="marker refused""#,
            "▲ raise_limits<",
            "↩ raise_limits rolled back<",
            "✗ shorten_timeouts not permitted<",
            "89 packets dropped",
            ">03:16:20<",
            "time (UTC)",
            "nf_conntrack_max",
        ] {
            assert!(svg.contains(needle), "{needle:?} missing");
        }
    }

    #[test]
    fn labels_at_the_same_moment_go_on_separate_rows() {
        let chart = sample_chart();
        let labels = place_labels(&chart, &|t| LEFT + t as f64 / 50.0, WIDTH - RIGHT);
        let at_twenty: Vec<usize> = labels
            .iter()
            .filter(|l| l.x == LEFT + 400.0)
            .map(|l| l.lane)
            .collect();
        assert_eq!(at_twenty.len(), 2);
        assert_ne!(at_twenty[0], at_twenty[1]);
    }

    #[test]
    fn a_simulated_flood_is_charted_from_every_sample_without_gaps() {
        use crate::simulate::{Scenario, SimOptions, run_scenario};
        let policy = crate::policy::Policy::embedded_default();
        let timeline = run_scenario(policy, Scenario::Flood, SimOptions::default());
        let chart = Chart::from_timeline(&timeline, "flood");
        assert!(
            chart.points.len() > timeline.rows.len(),
            "points only at events"
        );
        let svg = render(&chart);
        assert_well_formed(&svg);
        assert!(
            !svg.contains("no data in between"),
            "a simulated chart has a gap"
        );
    }

    #[test]
    fn an_empty_chart_still_renders() {
        let svg = render(&Chart::default());
        assert_well_formed(&svg);
        assert!(svg.contains("no samples recorded"));
    }

    #[test]
    fn round_steps_and_labels() {
        assert_eq!(nice_step(4300.0, 5.0), 1000.0);
        assert_eq!(nice_step(870_000.0, 5.0), 200_000.0);
        assert_eq!(entries_label(200_000.0), "200k");
        assert_eq!(entries_label(1_500_000.0), "1.5M");
        assert_eq!(entries_label(4096.0), "4096");
        assert_eq!(time_step(72_000), 10_000);
        assert_eq!(time_step(24 * 60_000), 300_000);
    }
}
