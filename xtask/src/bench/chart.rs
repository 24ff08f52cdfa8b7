//! Hand-written SVGs. Loopback: grouped bars per subject, throughput on top, host CPU per
//! GB below (with the proxy process's own share drawn inside), whiskers for min–max. Edge:
//! one panel per workload's host CPU per unit of work, and one of the paced rates.

use std::fmt::Write as _;

use super::{Results, WKind, report::Summary, subjects::Kind};

const BAR: f64 = 16.0;
const GAP: f64 = 26.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const PANEL_H: f64 = 220.0;
const LABEL_H: f64 = 78.0;
const TITLE_H: f64 = 56.0;
const COLORS: [&str; 4] = ["#4e79a7", "#f28e2b", "#59a14f", "#b07aa1"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A round axis maximum at or above `v`: 1, 2, 2.5 or 5 times a power of ten.
fn nice_max(v: f64) -> f64 {
    if v.is_nan() || v <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * p).find(|&x| x >= v).unwrap_or(10.0 * p)
}

fn get<'a>(res: &'a Results, subject: &str, workload: &str, metric: &str) -> Option<&'a Summary> {
    res.summary.iter().find(|s| s.subject == subject && s.workload == workload && s.metric == metric)
}

/// The chart.
pub fn svg(res: &Results) -> String {
    let subjects: Vec<(&str, Kind)> =
        res.subjects.iter().filter(|s| s.skipped.is_none()).map(|s| (s.name.as_str(), s.kind)).collect();
    let bulk: Vec<&str> =
        res.plan.workloads.iter().filter(|w| w.kind == WKind::Bulk).map(|w| w.label.as_str()).collect();
    let nb = bulk.len().max(1) as f64;
    let group = nb * BAR + GAP;
    let width = LEFT + RIGHT + group * subjects.len().max(1) as f64;
    let width = width.max(640.0);
    let height = TITLE_H + 2.0 * (PANEL_H + LABEL_H) + 10.0;
    let mut o = String::new();
    let _ = writeln!(o, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(o, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let m = &res.meta;
    let _ = writeln!(
        o,
        r#"<text x="{LEFT}" y="18" font-size="14" font-weight="bold">ntlm-splice vs nginx / HAProxy: bulk transfers on loopback</text>"#
    );
    let _ = writeln!(
        o,
        r##"<text x="{LEFT}" y="34" fill="#555">{} UTC, {} mode, {} rounds; kernel {}, {} x {}; bars: median, whiskers: min–max</text>"##,
        esc(&m.started.get(..16).unwrap_or(&m.started).replace('T', " ")),
        res.plan.mode,
        res.rounds_run,
        esc(&m.kernel),
        m.cpus,
        esc(&m.cpu)
    );
    // Legend.
    let mut lx = LEFT;
    for (i, w) in bulk.iter().enumerate() {
        let _ = writeln!(
            o,
            r#"<rect x="{lx}" y="42" width="10" height="10" fill="{}"/><text x="{}" y="51">{w}</text>"#,
            COLORS[i % COLORS.len()],
            lx + 14.0
        );
        lx += 70.0;
    }
    let _ = writeln!(
        o,
        r#"<rect x="{lx}" y="42" width="10" height="10" fill="black" fill-opacity="0.45"/><text x="{}" y="51">proxy process's own CPU (lower panel)</text>"#,
        lx + 14.0
    );

    let panels: [(&str, &str, bool); 2] = [
        ("throughput", "Throughput, MB/s (higher is better)", false),
        ("host_cpu", "Host CPU-seconds per GB moved, steal excluded (lower is better)", true),
    ];
    for (pi, (metric, title, overlay)) in panels.iter().enumerate() {
        let top = TITLE_H + pi as f64 * (PANEL_H + LABEL_H) + 18.0;
        let bottom = top + PANEL_H - 18.0;
        let plot_h = bottom - top;
        let mut vmax: f64 = 0.0;
        for (s, _) in &subjects {
            for w in &bulk {
                if let Some(x) = get(res, s, w, metric) {
                    vmax = vmax.max(x.max.or(x.median).unwrap_or(0.0));
                }
            }
        }
        let ymax = nice_max(vmax);
        let _ = writeln!(o, r#"<text x="{LEFT}" y="{}" font-weight="bold">{}</text>"#, top - 6.0, esc(title));
        for i in 0..=5 {
            let v = ymax * f64::from(i) / 5.0;
            let y = bottom - plot_h * f64::from(i) / 5.0;
            let _ =
                writeln!(o, r##"<line x1="{LEFT}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/>"##, width - RIGHT);
            let label = if ymax >= 10.0 { format!("{v:.0}") } else { format!("{v:.2}") };
            let _ = writeln!(o, r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{label}</text>"#, LEFT - 6.0, y + 4.0);
        }
        let _ = writeln!(o, r##"<line x1="{LEFT}" x2="{LEFT}" y1="{top:.1}" y2="{bottom:.1}" stroke="#333"/>"##);
        let scale = |v: f64| bottom - plot_h * (v / ymax).clamp(0.0, 1.0);
        for (si, (s, kind)) in subjects.iter().enumerate() {
            let gx = LEFT + GAP / 2.0 + si as f64 * group;
            for (wi, w) in bulk.iter().enumerate() {
                let x = gx + wi as f64 * BAR;
                let Some(sm) = get(res, s, w, metric) else {
                    continue;
                };
                let Some(med) = sm.median else {
                    let _ = writeln!(
                        o,
                        r##"<text x="{:.1}" y="{:.1}" font-size="9" fill="#c00">✕</text>"##,
                        x + 3.0,
                        bottom - 3.0
                    );
                    continue;
                };
                let y = scale(med);
                let _ = writeln!(
                    o,
                    r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{s} {w}: {med:.3} {}</title></rect>"#,
                    BAR - 2.0,
                    bottom - y,
                    COLORS[wi % COLORS.len()],
                    esc(&sm.unit)
                );
                if let (Some(lo), Some(hi)) = (sm.min, sm.max) {
                    let cx = x + (BAR - 2.0) / 2.0;
                    let _ = writeln!(
                        o,
                        r##"<path d="M{cx:.1} {:.1}V{:.1}M{:.1} {:.1}h6M{:.1} {:.1}h6" stroke="#222" fill="none"/>"##,
                        scale(lo),
                        scale(hi),
                        cx - 3.0,
                        scale(lo),
                        cx - 3.0,
                        scale(hi)
                    );
                }
                if *overlay && let Some(p) = get(res, s, w, "proxy_cpu").and_then(|p| p.median) {
                    let py = scale(p);
                    let _ = writeln!(
                        o,
                        r#"<rect x="{:.1}" y="{py:.1}" width="{:.1}" height="{:.1}" fill="black" fill-opacity="0.45"><title>{s} {w}: proxy process {p:.3} s/GB</title></rect>"#,
                        x + 3.0,
                        BAR - 8.0,
                        bottom - py
                    );
                }
            }
            let lx = gx + nb * BAR / 2.0;
            let weight = if *kind == Kind::Ours { "bold" } else { "normal" };
            let _ = writeln!(
                o,
                r#"<text x="{lx:.1}" y="{:.1}" text-anchor="end" font-weight="{weight}" transform="rotate(-35 {lx:.1} {:.1})">{}</text>"#,
                bottom + 14.0,
                bottom + 14.0,
                esc(s)
            );
        }
    }
    o.push_str("</svg>\n");
    o
}

/// Width of the edge chart at least (its header lines fit).
const EDGE_MIN_WIDTH: f64 = 720.0;
/// Room under each edge panel for the rotated subject names.
const EDGE_LABEL_H: f64 = 105.0;

/// Colour of a subject's bar in the edge chart: the floor grey, ours blue, peers orange.
fn kind_color(kind: Kind) -> &'static str {
    match kind {
        Kind::Direct => "#9d9d9d",
        Kind::Ours => COLORS[0],
        Kind::Peer => COLORS[1],
    }
}

/// The edge run's chart: one panel per figure (host CPU per unit of work for each workload,
/// with the proxy process's own share drawn inside, and each paced connection's rate), one
/// bar per subject, whiskers for min–max over the rounds.
pub fn edge_svg(res: &Results) -> String {
    let subjects: Vec<(&str, Kind)> =
        res.subjects.iter().filter(|s| s.skipped.is_none()).map(|s| (s.name.as_str(), s.kind)).collect();
    let has = |k: WKind| res.plan.workloads.iter().find(|w| w.kind == k).map(|w| w.label.clone());
    let mut panels: Vec<(String, &str, String, bool)> = Vec::new();
    if let Some(l) = has(WKind::Paced) {
        panels.push((l.clone(), "host_cpu", "Paced streams: host CPU-seconds per GB (lower is better)".into(), true));
    }
    if let Some(l) = has(WKind::Rr) {
        panels.push((
            l,
            "host_cpu",
            "Kept-alive request/response: host CPU-ms per 1000 requests (lower is better)".into(),
            true,
        ));
    }
    if let Some(l) = has(WKind::Churn) {
        panels.push((
            l,
            "host_cpu",
            "Connection churn: host CPU-ms per 1000 connections (lower is better)".into(),
            true,
        ));
    }
    if let Some(l) = has(WKind::Paced) {
        panels.push((
            l,
            "pace",
            "Paced streams: median connection's own rate, Mbit/s (pacing held if at its set rate)".into(),
            false,
        ));
    }
    let group = 2.0 * BAR + GAP;
    let width = (LEFT + RIGHT + group * subjects.len().max(1) as f64).max(EDGE_MIN_WIDTH);
    let panel_h = PANEL_H * 0.8;
    let label_h = EDGE_LABEL_H;
    let head = TITLE_H + 14.0;
    let height = head + panels.len().max(1) as f64 * (panel_h + label_h) + 10.0;
    let mut o = String::new();
    let _ = writeln!(o, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(o, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let m = &res.meta;
    let _ = writeln!(
        o,
        r#"<text x="{LEFT}" y="18" font-size="14" font-weight="bold">Edge workload: client, proxy, backend in three namespaces over veth</text>"#
    );
    let _ = writeln!(
        o,
        r##"<text x="{LEFT}" y="34" fill="#555">{} UTC, {} mode, {} rounds; kernel {}, {} CPUs; bars: median, whiskers: min–max</text>"##,
        esc(&m.started.get(..16).unwrap_or(&m.started).replace('T', " ")),
        res.plan.mode,
        res.rounds_run,
        esc(&m.kernel),
        m.cpus,
    );
    let _ = writeln!(
        o,
        r##"<text x="{LEFT}" y="50" fill="#555">grey: routed (no proxy, the floor); blue: ntlm-splice; orange: nginx / HAProxy; dark inset: the proxy's own CPU</text>"##
    );
    let _ = writeln!(
        o,
        r##"<text x="{LEFT}" y="64" fill="#555">red line: the run's own stack (client, backend, proxy, kernel threads), without other work on the host</text>"##
    );
    for (pi, (label, metric, title, overlay)) in panels.iter().enumerate() {
        let top = head + pi as f64 * (panel_h + label_h) + 18.0;
        let bottom = top + panel_h - 18.0;
        let plot_h = bottom - top;
        let vmax = subjects
            .iter()
            .filter_map(|(s, _)| get(res, s, label, metric))
            .map(|x| x.max.or(x.median).unwrap_or(0.0))
            .fold(0.0, f64::max);
        let ymax = nice_max(vmax);
        let _ = writeln!(o, r#"<text x="{LEFT}" y="{}" font-weight="bold">{}</text>"#, top - 6.0, esc(title));
        for i in 0..=5 {
            let v = ymax * f64::from(i) / 5.0;
            let y = bottom - plot_h * f64::from(i) / 5.0;
            let _ =
                writeln!(o, r##"<line x1="{LEFT}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/>"##, width - RIGHT);
            let text = if ymax >= 10.0 { format!("{v:.0}") } else { format!("{v:.2}") };
            let _ = writeln!(o, r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{text}</text>"#, LEFT - 6.0, y + 4.0);
        }
        let _ = writeln!(o, r##"<line x1="{LEFT}" x2="{LEFT}" y1="{top:.1}" y2="{bottom:.1}" stroke="#333"/>"##);
        let scale = |v: f64| bottom - plot_h * (v / ymax).clamp(0.0, 1.0);
        for (si, (s, kind)) in subjects.iter().enumerate() {
            let x = LEFT + GAP / 2.0 + si as f64 * group;
            let w = 2.0 * BAR - 2.0;
            match get(res, s, label, metric).and_then(|sm| sm.median.map(|med| (sm, med))) {
                None => {
                    let _ = writeln!(
                        o,
                        r##"<text x="{:.1}" y="{:.1}" font-size="9" fill="#c00">✕</text>"##,
                        x + 3.0,
                        bottom - 3.0
                    );
                }
                Some((sm, med)) => {
                    let y = scale(med);
                    let _ = writeln!(
                        o,
                        r#"<rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{:.1}" fill="{}"><title>{s} {label}: {med:.3} {}</title></rect>"#,
                        bottom - y,
                        kind_color(*kind),
                        esc(&sm.unit)
                    );
                    let _ = writeln!(
                        o,
                        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="9">{}</text>"#,
                        x + w / 2.0,
                        y - 3.0,
                        if med >= 10.0 { format!("{med:.0}") } else { format!("{med:.2}") }
                    );
                    if let (Some(lo), Some(hi)) = (sm.min, sm.max) {
                        let cx = x + w / 2.0;
                        let _ = writeln!(
                            o,
                            r##"<path d="M{cx:.1} {:.1}V{:.1}M{:.1} {:.1}h6M{:.1} {:.1}h6" stroke="#222" fill="none"/>"##,
                            scale(lo),
                            scale(hi),
                            cx - 3.0,
                            scale(lo),
                            cx - 3.0,
                            scale(hi)
                        );
                    }
                    if *overlay && let Some(st) = get(res, s, label, "stack_cpu").and_then(|p| p.median) {
                        let sy = scale(st);
                        let _ = writeln!(
                            o,
                            r##"<line x1="{:.1}" x2="{:.1}" y1="{sy:.1}" y2="{sy:.1}" stroke="#d62728" stroke-width="3"><title>{s} {label}: stack (client, backend, proxy, kernel threads) {st:.3} {}</title></line>"##,
                            x - 2.0,
                            x + w + 2.0,
                            esc(&sm.unit)
                        );
                    }
                    if *overlay && let Some(p) = get(res, s, label, "proxy_cpu").and_then(|p| p.median) {
                        let py = scale(p);
                        let _ = writeln!(
                            o,
                            r#"<rect x="{:.1}" y="{py:.1}" width="{:.1}" height="{:.1}" fill="black" fill-opacity="0.45"><title>{s} {label}: proxy process {p:.3} {}</title></rect>"#,
                            x + 5.0,
                            w - 10.0,
                            bottom - py,
                            esc(&sm.unit)
                        );
                    }
                }
            }
            let lx = x + w / 2.0;
            let weight = if *kind == Kind::Ours { "bold" } else { "normal" };
            let _ = writeln!(
                o,
                r#"<text x="{lx:.1}" y="{:.1}" text-anchor="end" font-weight="{weight}" transform="rotate(-30 {lx:.1} {:.1})">{}</text>"#,
                bottom + 14.0,
                bottom + 14.0,
                esc(s)
            );
        }
    }
    o.push_str("</svg>\n");
    o
}

#[cfg(test)]
mod tests {
    use super::nice_max;

    #[test]
    fn axis_maxima_are_round() {
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(0.83), 1.0);
        assert_eq!(nice_max(1.2), 2.0);
        assert_eq!(nice_max(2400.0), 2500.0);
        assert_eq!(nice_max(2600.0), 5000.0);
    }
}
