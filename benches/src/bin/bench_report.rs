//! `build/bench/report.html` from the benchmarks' JSON files in `build/bench/` (the last step of
//! `scripts/bench/run-all.sh`; `scripts/bench/report.sh` alone). The plots are SVG drawn by
//! plotters and embedded in the page, so it needs nothing from the network to be viewed.
//!
//! - throughput over time while an instance is added and removed every second: the module, the
//!   reload way, nginx's `resolve` via Consul DNS and via upsync-dns (`resolve.json`);
//! - the propagation CDF, Consul write -> first request on the new instance (`resolve.json`);
//! - DNS queries/s of upsync-dns and every peer DNS server (`dns.json`);
//! - the tables of `resolve.json` and `module.json`.
//!
//! A missing or unreadable file (a partial `make bench`) leaves its section with a note naming
//! the file and the script that writes it. Also writes `build/bench/readme.svg` (throughput
//! under churn and propagation CDF side by side: the README's picture) when `resolve.json` is
//! there. `bench-report [DIR]` reads and writes DIR instead of build/bench.
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::coord::{CoordTranslate, Shift};
use plotters::prelude::*;
use serde_json::Value;

/// The fronts of `resolve.json`, in drawing order, with their colours.
const FRONTS: [(&str, RGBColor); 4] = [
    ("module", RGBColor(0x1b, 0x9e, 0x77)),
    ("reload", RGBColor(0xd9, 0x5f, 0x02)),
    ("resolve_consul", RGBColor(0x75, 0x70, 0xb3)),
    ("resolve_upsync_dns", RGBColor(0xe7, 0x29, 0x8a)),
];

const PALETTE: [RGBColor; 6] = [
    RGBColor(0xe7, 0x29, 0x8a),
    RGBColor(0x75, 0x70, 0xb3),
    RGBColor(0x1b, 0x9e, 0x77),
    RGBColor(0xd9, 0x5f, 0x02),
    RGBColor(0x66, 0xa6, 0x1e),
    RGBColor(0xa6, 0x76, 0x1d),
];

type DrawResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Lines to draw: front, colour, points.
type Series = Vec<(&'static str, RGBColor, Vec<(f64, f64)>)>;

/// A JSON file of the bench directory, or why there is none.
fn load(dir: &Path, file: &str) -> Result<Value, String> {
    let path = dir.join(file);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{} not readable ({e})", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{} is not valid JSON ({e})", path.display()))
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn missing(html: &mut String, why: &str, script: &str) {
    let _ = writeln!(html, "<p class=\"missing\">No data: {}. Run <code>{script}</code> to produce it.</p>", esc(why));
}

fn label(front: &str, resolve: &Value) -> String {
    resolve["churn"][front]["label"].as_str().unwrap_or(front).replace('`', "")
}

fn pairs(v: &Value) -> Vec<(f64, f64)> {
    v.as_array().map(|a| a.iter().filter_map(|p| Some((p.get(0)?.as_f64()?, p.get(1)?.as_f64()?))).collect()).unwrap_or_default()
}

/// Throughput over time under churn, one line per front.
fn draw_churn(area: &DrawingArea<SVGBackend, Shift>, resolve: &Value) -> DrawResult<()> {
    let series: Series =
        FRONTS.iter().map(|(f, c)| (*f, *c, pairs(&resolve["churn"][f]["series"]))).filter(|(_, _, s)| !s.is_empty()).collect();
    let x_max = series.iter().flat_map(|(_, _, s)| s.iter().map(|p| p.0)).fold(1.0, f64::max);
    let y_max = series.iter().flat_map(|(_, _, s)| s.iter().map(|p| p.1)).fold(1.0, f64::max) * 1.1;
    let mut chart =
        builder(area, "Throughput while an instance is added/removed every second").build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("requests/s served by the backends")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .light_line_style(WHITE)
        .draw()?;
    lines(&mut chart, series, resolve)
}

/// Empirical CDF of the propagation delays, log-scaled milliseconds.
fn draw_cdf(area: &DrawingArea<SVGBackend, Shift>, resolve: &Value) -> DrawResult<()> {
    let mut series: Series = Vec::new();
    for (front, color) in FRONTS {
        let mut d: Vec<f64> = resolve["propagation_ms"][front]["samples_ms"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).filter(|v| *v > 0.0).collect())
            .unwrap_or_default();
        if d.is_empty() {
            continue;
        }
        d.sort_by(f64::total_cmp);
        let n = d.len() as f64;
        let points: Vec<(f64, f64)> = d.iter().enumerate().flat_map(|(i, v)| [(*v, i as f64 / n), (*v, (i + 1) as f64 / n)]).collect();
        series.push((front, color, points));
    }
    let lo = series.iter().flat_map(|(_, _, p)| p.iter().map(|x| x.0)).fold(f64::MAX, f64::min).min(1.0) * 0.8;
    let hi = series.iter().flat_map(|(_, _, p)| p.iter().map(|x| x.0)).fold(10.0, f64::max) * 1.25;
    let mut chart = builder(area, "Propagation: Consul write -> first request on the new instance")
        .build_cartesian_2d((lo..hi).log_scale(), 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_desc("milliseconds (log scale)")
        .y_desc("fraction of rounds")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .light_line_style(WHITE)
        .draw()?;
    lines(&mut chart, series, resolve)
}

/// A chart with the report's caption style and margins.
fn builder<'a, 'd>(area: &'a DrawingArea<SVGBackend<'d>, Shift>, caption: &str) -> ChartBuilder<'a, 'static, SVGBackend<'d>> {
    let mut b = ChartBuilder::on(area);
    b.caption(caption, ("sans-serif", 18)).margin(12).x_label_area_size(36).y_label_area_size(64);
    b
}

/// One line per front, with the legend in the lower right corner.
fn lines<'a, 'd: 'a, CT: CoordTranslate<From = (f64, f64)>>(
    chart: &mut ChartContext<'a, SVGBackend<'d>, CT>,
    series: Series,
    resolve: &Value,
) -> DrawResult<()> {
    for (front, color, points) in series {
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(label(front, resolve))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// Grouped bars: queries/s per DNS server, for each (instances, query type) of `dns.json`.
fn draw_dns(area: &DrawingArea<SVGBackend, Shift>, dns: &Value) -> DrawResult<()> {
    let mut groups: Vec<(String, Vec<(String, f64)>)> = Vec::new();
    for (key, instances) in [("runs_small", None), ("runs_full", dns["instances"].as_u64())] {
        for run in dns[key].as_array().into_iter().flatten() {
            let (Some(server), Some(qtype), Some(qps)) = (run["server"].as_str(), run["type"].as_str(), run["report"]["qps"].as_f64())
            else {
                continue;
            };
            let name = match instances {
                Some(n) => format!("{n} inst., {qtype}"),
                None => format!("few inst., {qtype}"),
            };
            match groups.iter_mut().find(|(g, _)| *g == name) {
                Some((_, v)) => v.push((server.to_string(), qps)),
                None => groups.push((name, vec![(server.to_string(), qps)])),
            }
        }
    }
    let mut servers: Vec<String> = Vec::new();
    for (_, v) in &groups {
        for (s, _) in v {
            if !servers.contains(s) {
                servers.push(s.clone());
            }
        }
    }
    let y_max = groups.iter().flat_map(|(_, v)| v.iter().map(|x| x.1)).fold(1.0, f64::max) * 1.15;
    let width = servers.len().max(1) as f64 + 1.0;
    let mut chart = ChartBuilder::on(area)
        .caption("DNS queries/s (dnsperf), upsync-dns and its peers", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(72)
        .build_cartesian_2d(0.0..groups.len().max(1) as f64 * width, 0.0..y_max)?;
    let names: Vec<String> = groups.iter().map(|g| g.0.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups.len().max(1) * 2 + 1)
        .x_label_formatter(&|x| {
            let g = (x / width).floor() as usize;
            let centre = g as f64 * width + width / 2.0;
            if (x - centre).abs() < width / 4.0 {
                names.get(g).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("queries/s")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .light_line_style(WHITE)
        .draw()?;
    for (si, server) in servers.iter().enumerate() {
        let color = PALETTE[si % PALETTE.len()];
        let bars: Vec<Rectangle<(f64, f64)>> = groups
            .iter()
            .enumerate()
            .filter_map(|(gi, (_, v))| {
                let qps = v.iter().find(|(s, _)| s == server)?.1;
                let x0 = gi as f64 * width + 0.5 + si as f64;
                Some(Rectangle::new([(x0, 0.0), (x0 + 0.9, qps)], color.filled()))
            })
            .collect();
        chart.draw_series(bars)?.label(server.clone()).legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// An SVG of `w` x `h` drawn by `draw`, as text.
fn svg(w: u32, h: u32, draw: impl FnOnce(&DrawingArea<SVGBackend, Shift>) -> DrawResult<()>) -> DrawResult<String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (w, h)).into_drawing_area();
        root.fill(&WHITE)?;
        draw(&root)?;
        root.present()?;
    }
    Ok(out)
}

fn resolve_tables(html: &mut String, resolve: &Value) {
    let _ = writeln!(
        html,
        "<p>{} , {} nginx workers, wrk -c{}, {} s per churn run, resolver <code>valid={}s</code>, {} propagation rounds per front.</p>",
        esc(resolve["nginx"].as_str().unwrap_or("nginx")),
        resolve["workers"],
        resolve["connections"],
        resolve["seconds"],
        resolve["resolver_valid_s"],
        resolve["rounds"]
    );
    html.push_str("<table><tr><th>front</th><th>churn: req/s</th><th>p99 latency</th><th>failed requests</th><th>propagation p50</th><th>p99</th><th>max</th></tr>\n");
    for (front, _) in FRONTS {
        let c = &resolve["churn"][front]["report"];
        if c.is_null() {
            continue;
        }
        let p = &resolve["propagation_ms"][front];
        let ms = |v: &Value| v.as_f64().map(|x| format!("{x:.1} ms")).unwrap_or_else(|| "n/a".into());
        let failed = c["non_2xx"].as_u64().unwrap_or(0) + c["socket_errors"].as_u64().unwrap_or(0);
        let _ = writeln!(
            html,
            "<tr><td>{}</td><td>{:.0}</td><td>{:.2} ms</td><td>{failed}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&label(front, resolve)),
            c["requests_per_sec"].as_f64().unwrap_or(f64::NAN),
            c["latency_p99_ms"].as_f64().unwrap_or(f64::NAN),
            ms(&p["p50"]),
            ms(&p["p99"]),
            ms(&p["max"])
        );
    }
    html.push_str("</table>\n");
    let Some(express) = resolve["expressiveness"].as_object() else { return };
    html.push_str("<p>What each can express (share of the requests b1 got; honoured: 0.75 for weight 3 against 1, 0 for the others):</p>\n<table><tr><th>front</th><th>weight</th><th>backup</th><th>down</th><th>drain</th></tr>\n");
    for (front, checks) in express {
        let cell = |what: &str| {
            let v = &checks[what];
            match v["honoured"].as_bool() {
                Some(ok) => format!("{} ({:.2})", if ok { "yes" } else { "<b>no</b>" }, v["b1_share"].as_f64().unwrap_or(f64::NAN)),
                None => "n/a".into(),
            }
        };
        let _ = writeln!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&label(front, resolve)),
            cell("weight"),
            cell("backup"),
            cell("down"),
            cell("drain")
        );
    }
    html.push_str(
        "<tr><td>include file + nginx -s reload</td><td colspan=4>anything nginx.conf says, applied by a reload</td></tr></table>\n",
    );
}

fn module_table(html: &mut String, module: &Value) {
    html.push_str("<table><tr><th>run</th><th>req/s</th><th>p99 latency</th><th>failed requests</th></tr>\n");
    let mean = |key: &str, field: &str| {
        let v: Vec<f64> = module[key].as_array().into_iter().flatten().filter_map(|r| r[field].as_f64()).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let row = |html: &mut String, name: &str, rps: Option<f64>, p99: Option<f64>, failed: Option<u64>| {
        let f = |v: Option<f64>, d: usize| v.map(|x| format!("{x:.d$}")).unwrap_or_else(|| "n/a".into());
        let _ = writeln!(
            html,
            "<tr><td>{name}</td><td>{}</td><td>{} ms</td><td>{}</td></tr>",
            f(rps, 0),
            f(p99, 2),
            failed.map(|x| x.to_string()).unwrap_or_else(|| "n/a".into())
        );
    };
    let failed_sum = |key: &str| {
        module[key]
            .as_array()
            .map(|a| a.iter().map(|r| r["non_2xx"].as_u64().unwrap_or(0) + r["socket_errors"].as_u64().unwrap_or(0)).sum())
    };
    row(
        html,
        "stock nginx, static servers",
        mean("steady_stock", "requests_per_sec"),
        mean("steady_stock", "latency_p99_ms"),
        failed_sum("steady_stock"),
    );
    row(
        html,
        "nginx + upsync module",
        mean("steady_module", "requests_per_sec"),
        mean("steady_module", "latency_p99_ms"),
        failed_sum("steady_module"),
    );
    for (key, name) in
        [("churn_module", "upsync module, churn 1 change/s"), ("churn_reload", "include file + nginx -s reload, churn 1 change/s")]
    {
        let r = &module[key];
        let failed = r["non_2xx"].as_u64().zip(r["socket_errors"].as_u64()).map(|(a, b)| a + b);
        row(html, name, r["requests_per_sec"].as_f64(), r["latency_p99_ms"].as_f64(), failed);
    }
    html.push_str("</table>\n");
    let p = &module["propagation_ms"];
    if let (Some(p50), Some(p99)) = (p["p50"].as_f64(), p["p99"].as_f64()) {
        let _ =
            writeln!(html, "<p>Propagation (Consul KV write -> first request on the new server): p50 {p50:.1} ms, p99 {p99:.1} ms.</p>");
    }
}

fn main() -> anyhow::Result<()> {
    let dir = std::env::args().nth(1).map(PathBuf::from).unwrap_or_else(|| upsync_tests::paths::build_dir().join("bench"));
    std::fs::create_dir_all(&dir)?;
    let resolve = load(&dir, "resolve.json");
    let dns = load(&dir, "dns.json");
    let module = load(&dir, "module.json");
    let mut missing_files = Vec::new();
    let mut html = String::from(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>upsync benchmarks</title><style>
body { font-family: sans-serif; max-width: 1000px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 1em 0; } td, th { border: 1px solid #bbb; padding: 0.3em 0.6em; text-align: right; }
td:first-child, th:first-child { text-align: left; } .missing { background: #fff3cd; padding: 0.6em; border: 1px solid #e0c060; }
svg { max-width: 100%; height: auto; }
</style></head><body>\n<h1>upsync benchmarks</h1>\n",
    );
    let _ = writeln!(
        html,
        "<p>From the JSON files in <code>{}</code>; every figure is from the run that wrote its file.</p>",
        esc(&dir.display().to_string())
    );

    html.push_str("<h2>Churn: the module, reload and nginx's <code>resolve</code></h2>\n");
    match &resolve {
        Ok(r) => {
            html.push_str(&svg(960, 420, |a| draw_churn(a, r)).map_err(|e| anyhow::anyhow!("drawing the churn plot: {e}"))?);
            resolve_tables(&mut html, r);
            html.push_str("<h2>Propagation CDF</h2>\n");
            html.push_str(&svg(960, 420, |a| draw_cdf(a, r)).map_err(|e| anyhow::anyhow!("drawing the propagation CDF: {e}"))?);
            let readme = svg(1200, 420, |root| {
                let (left, right) = root.split_horizontally(600);
                draw_churn(&left, r)?;
                draw_cdf(&right, r)
            })
            .map_err(|e| anyhow::anyhow!("drawing the README picture: {e}"))?;
            std::fs::write(dir.join("readme.svg"), readme)?;
        }
        Err(why) => {
            missing(&mut html, why, "scripts/bench/resolve.sh");
            html.push_str("<h2>Propagation CDF</h2>\n");
            missing(&mut html, why, "scripts/bench/resolve.sh");
            missing_files.push("resolve.json");
        }
    }

    html.push_str("<h2>DNS queries/s against every peer</h2>\n");
    match &dns {
        Ok(d) => html.push_str(&svg(960, 440, |a| draw_dns(a, d)).map_err(|e| anyhow::anyhow!("drawing the DNS plot: {e}"))?),
        Err(why) => {
            missing(&mut html, why, "scripts/bench/dns.sh");
            missing_files.push("dns.json");
        }
    }

    html.push_str("<h2>The module against stock nginx (Debian's nginx)</h2>\n");
    match &module {
        Ok(m) => module_table(&mut html, m),
        Err(why) => {
            missing(&mut html, why, "scripts/bench/module.sh");
            missing_files.push("module.json");
        }
    }
    html.push_str("</body></html>\n");
    let out = dir.join("report.html");
    std::fs::write(&out, html)?;
    if missing_files.is_empty() {
        eprintln!("bench-report: wrote {}", out.display());
    } else {
        eprintln!("bench-report: wrote {} without {} (not in {})", out.display(), missing_files.join(", "), dir.display());
    }
    Ok(())
}
