//! `just dashboard`: the Grafana dashboard of `manifests/observability/dashboard.json`, drawn from
//! a real run, for people without a Grafana at hand. Two activators sharing pins through Redis
//! serve a 90/10 split to sessions, flows, unkeyed requests and unknown hosts for
//! `DASHBOARD_SECONDS` (default 120) while Redis goes away for a while and a pod leaves; a real
//! Prometheus scrapes both every second. Every panel's own PromQL is then asked of that
//! Prometheus over the run, drawn as SVG (plotters) on a page laid out by the panels' grid
//! positions, and headless Chromium takes its picture: `docs/dashboard.png`. Not part of CI.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use integration_tests::redis::Redis;
use integration_tests::topology::{Service, yaml};
use integration_tests::{Client, Env, Process, addrs, wait_pin_store_up, wait_until};
use plotters::prelude::*;
use serde_json::Value;

const PANEL_UNIT_PX: u32 = 30;
const PAGE_WIDTH_PX: u32 = 1600;
/// Grafana's `$__rate_interval` for a one-second scrape and a two-second step.
const RATE_INTERVAL: &str = "10s";
const STEP_SECONDS: u64 = 2;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let seconds = std::env::var("DASHBOARD_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(120u64);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("manifests/observability/dashboard.json")).context("the dashboard")?,
    )?;
    let chromium = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| which(b))
        .context("just dashboard needs chromium (apt-get install chromium)")?;
    if !which("prometheus") {
        bail!("just dashboard needs prometheus (apt-get install prometheus)");
    }

    let env = Env::new();
    let mut redis = Redis::start(env.dir.path()).await;
    let stable = env.pods("counter-1", 3).await;
    let canary = env.pods("counter-2", 1).await;
    let topology = |stable: &[Process]| {
        yaml(&[Service::new("counter").revision("counter-1", 90, &addrs(stable)).revision(
            "counter-2",
            10,
            &addrs(&canary),
        )])
    };
    env.write_topology(&topology(&stable));
    // The autoscaler is told about demand; its pods are ours, so it starts none.
    let shim = env.shim(&["--command", "false"]).await;
    let autoscaler = format!("ws://{}", shim.addr("stats"));
    let flags = ["--pin-store", "redis", "--redis-url", &redis.url(), "--autoscaler-url", &autoscaler];
    let activators = [env.activator(&flags).await, env.activator(&flags).await];
    for activator in &activators {
        wait_pin_store_up(activator.addr("admin")).await;
    }
    let prometheus =
        Prometheus::start(env.dir.path(), &activators.iter().map(|a| a.addr("admin")).collect::<Vec<_>>()).await?;
    println!("load for {seconds} s; Prometheus at http://{}", prometheus.addr);

    let start = unix_now();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<Client> = activators.iter().map(|a| Client::new(a.addr("proxy"))).collect();
    let load = tokio::spawn(load(clients, stop.clone()));
    let run = Duration::from_secs(seconds);
    tokio::time::sleep(run * 2 / 5).await;
    println!("Redis goes away for {:?}", run / 8);
    redis.kill().await;
    tokio::time::sleep(run / 8).await;
    redis.restart().await;
    for activator in &activators {
        wait_pin_store_up(activator.addr("admin")).await;
    }
    tokio::time::sleep(run / 10).await;
    println!("a pod of counter-1 leaves");
    let mut stable = stable;
    stable.pop();
    env.write_topology(&topology(&stable));
    tokio::time::sleep(run.saturating_sub(run * 2 / 5 + run / 8 + run / 10)).await;
    stop.store(true, Ordering::Relaxed);
    load.await?;
    // The last scrape covers the end of the load.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let end = unix_now();

    let html = render(&dashboard, &prometheus, start, end).await?;
    let page = env.dir.path().join("dashboard.html");
    std::fs::write(&page, &html)?;
    let png = root.join("docs/dashboard.png");
    let height = page_height(&dashboard);
    let shot = tokio::process::Command::new(chromium)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"])
        .arg(format!("--window-size={PAGE_WIDTH_PX},{height}"))
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", page.display()))
        .output()
        .await?;
    if !shot.status.success() {
        bail!("chromium: {}", String::from_utf8_lossy(&shot.stderr));
    }
    println!("wrote {}", png.display());
    Ok(())
}

fn which(binary: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(binary).is_file()))
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_secs()
}

/// About 200 requests a second: returning sessions, new sessions, flows, unkeyed requests and
/// hosts no service has, spread over both activators.
async fn load(clients: Vec<Client>, stop: Arc<AtomicBool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    let mut n: u64 = 0;
    let mut tasks = tokio::task::JoinSet::new();
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        n += 1;
        let client = clients[(n % clients.len() as u64) as usize].clone();
        let (host, header): (String, Option<(&str, String)>) = match n % 20 {
            0 => (format!("unknown-{}.example.com", n % 50), None),
            1..=3 => ("counter.test".into(), None),
            4..=6 => ("counter.test".into(), Some(("K-Revision", format!("flow-{}", n % 40)))),
            // A new session every 20 requests, the rest come back.
            7 => ("counter.test".into(), Some(("K-Session", format!("new-{n}")))),
            _ => ("counter.test".into(), Some(("K-Session", format!("user-{}", n % 300)))),
        };
        tasks.spawn(async move {
            let mut req = client.request(reqwest::Method::GET, &host, "/incr");
            if let Some((name, value)) = header {
                req = req.header(name, value);
            }
            let _ = client.try_send(req).await;
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

struct Prometheus {
    addr: SocketAddr,
    _process: tokio::process::Child,
    http: reqwest::Client,
}

impl Prometheus {
    async fn start(dir: &Path, targets: &[SocketAddr]) -> anyhow::Result<Prometheus> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: activator\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config)?;
        let process = tokio::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log"))?)
            .kill_on_drop(true)
            .spawn()
            .context("starting prometheus")?;
        let http = reqwest::Client::builder().no_proxy().build()?;
        let ready = format!("http://{addr}/-/ready");
        wait_until(Duration::from_secs(30), "Prometheus is ready", || async {
            http.get(&ready).send().await.is_ok_and(|r| r.status().is_success())
        })
        .await;
        Ok(Prometheus { addr, _process: process, http })
    }

    /// Each series of `expr` over the run: its labels and its points.
    async fn range(
        &self,
        expr: &str,
        start: u64,
        end: u64,
    ) -> anyhow::Result<Vec<(BTreeMap<String, String>, Vec<(f64, f64)>)>> {
        let url = format!("http://{}/api/v1/query_range", self.addr);
        let params = [
            ("query", expr.to_owned()),
            ("start", start.to_string()),
            ("end", end.to_string()),
            ("step", STEP_SECONDS.to_string()),
        ];
        let url = reqwest::Url::parse_with_params(&url, &params)?;
        let reply: Value = serde_json::from_str(&self.http.get(url).send().await?.text().await?)?;
        if reply["status"] != "success" {
            bail!("{expr}: {reply}");
        }
        let series = reply["data"]["result"].as_array().cloned().unwrap_or_default();
        Ok(series
            .into_iter()
            .map(|s| {
                let labels = s["metric"]
                    .as_object()
                    .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned())).collect())
                    .unwrap_or_default();
                let points = s["values"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| {
                        let t = p[0].as_f64()? - start as f64;
                        let v: f64 = p[1].as_str()?.parse().ok()?;
                        v.is_finite().then_some((t, v))
                    })
                    .collect();
                (labels, points)
            })
            .collect())
    }
}

/// Grafana's `{{label}}` legend templates.
fn legend(format: &str, labels: &BTreeMap<String, String>) -> String {
    let mut out = format.to_owned();
    for (k, v) in labels {
        out = out.replace(&format!("{{{{{k}}}}}"), v);
    }
    out
}

fn page_height(dashboard: &Value) -> u32 {
    let bottom = dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| p["gridPos"]["y"].as_u64().unwrap_or(0) + p["gridPos"]["h"].as_u64().unwrap_or(0))
        .max()
        .unwrap_or(0);
    bottom as u32 * PANEL_UNIT_PX + 120
}

async fn render(dashboard: &Value, prometheus: &Prometheus, start: u64, end: u64) -> anyhow::Result<String> {
    let column = PAGE_WIDTH_PX / 24;
    let mut body = String::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        let grid = &panel["gridPos"];
        let at = |k: &str| grid[k].as_u64().unwrap_or(0) as u32;
        let (x, y, w, h) = (at("x") * column, at("y") * PANEL_UNIT_PX, at("w") * column, at("h") * PANEL_UNIT_PX);
        let title = panel["title"].as_str().unwrap_or_default();
        let style = format!("left:{x}px;top:{y}px;width:{w}px;height:{h}px");
        if panel["type"] == "row" {
            body.push_str(&format!("<div class=row style=\"{style}\">{}</div>\n", escape(title)));
            continue;
        }
        let mut series = Vec::new();
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_default()
                .replace("$__rate_interval", RATE_INTERVAL)
                .replace("$namespace", ".*");
            for (labels, points) in prometheus.range(&expr, start, end).await? {
                series.push((legend(target["legendFormat"].as_str().unwrap_or_default(), &labels), points));
            }
        }
        let unit = panel["fieldConfig"]["defaults"]["unit"].as_str().unwrap_or("short");
        let svg = chart(title, unit, &series, w - 12, h - 12, (end - start) as f64)?;
        body.push_str(&format!("<div class=panel style=\"{style}\">{svg}</div>\n"));
    }
    let title = dashboard["title"].as_str().unwrap_or_default();
    Ok(format!(
        "<!doctype html><html><head><meta charset=utf-8><title>{title}</title><style>\
         body{{margin:0;background:#111217;color:#ccccdc;font-family:sans-serif}}\
         h1{{font-size:20px;margin:16px 16px 0}} p{{margin:4px 16px 16px;color:#8e8e9e;font-size:13px}}\
         .grid{{position:relative;margin:0 0 0 0}}\
         .panel,.row{{position:absolute;box-sizing:border-box;padding:6px}}\
         .row{{font-size:15px;font-weight:bold;padding-top:8px;padding-left:12px}}\
         svg{{background:#181b1f;border:1px solid #2c3235;border-radius:3px}}</style></head><body>\
         <h1>{title}</h1><p>A redraw of the Grafana dashboard's queries, not Grafana: each panel is the \
         dashboard's own PromQL, asked of a real Prometheus and drawn by `just dashboard`. {} s of load through \
         two activators sharing pins in Redis; Redis away for a while, then a pod leaves.</p>\
         <div class=grid>{body}</div></body></html>",
        end - start
    ))
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// One panel as an SVG line chart over `seconds`.
fn chart(
    title: &str,
    unit: &str,
    series: &[(String, Vec<(f64, f64)>)],
    w: u32,
    h: u32,
    seconds: f64,
) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let area = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
        let max = series.iter().flat_map(|(_, p)| p.iter().map(|(_, v)| *v)).fold(0.0_f64, f64::max);
        let top = if max > 0.0 { max * 1.1 } else { 1.0 };
        let text = RGBColor(0xcc, 0xcc, 0xdc);
        let mut chart = ChartBuilder::on(&area)
            .caption(title, ("sans-serif", 14).into_font().color(&text))
            .margin(8)
            .x_label_area_size(20)
            .y_label_area_size(52)
            .build_cartesian_2d(0.0..seconds, 0.0..top)?;
        chart
            .configure_mesh()
            .light_line_style(RGBColor(0x22, 0x25, 0x29))
            .bold_line_style(RGBColor(0x2c, 0x32, 0x35))
            .axis_style(RGBColor(0x44, 0x48, 0x4c))
            .label_style(("sans-serif", 10).into_font().color(&text))
            .x_label_formatter(&|t| format!("{t:.0}s"))
            .y_label_formatter(&|v| format_value(*v, unit))
            .x_labels(6)
            .y_labels(5)
            .draw()?;
        let palette = [
            RGBColor(0x73, 0xbf, 0x69),
            RGBColor(0xf2, 0xcc, 0x0c),
            RGBColor(0x56, 0x94, 0xf2),
            RGBColor(0xff, 0x78, 0x0a),
            RGBColor(0xf2, 0x49, 0x5c),
            RGBColor(0xb8, 0x77, 0xd9),
            RGBColor(0x8a, 0xb8, 0xff),
            RGBColor(0xca, 0x95, 0x6a),
        ];
        for (i, (name, points)) in series.iter().enumerate() {
            let color = palette[i % palette.len()];
            chart
                .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))?
                .label(name.clone())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 12, y)], color.stroke_width(2)));
        }
        if !series.is_empty() {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(RGBColor(0x18, 0x1b, 0x1f).mix(0.8))
                .label_font(("sans-serif", 10).into_font().color(&text))
                .draw()?;
        }
        area.present()?;
    }
    Ok(svg)
}

/// A tick label in the panel's Grafana unit.
fn format_value(v: f64, unit: &str) -> String {
    match unit {
        "s" if v == 0.0 => "0".to_owned(),
        "s" if v < 0.001 => format!("{:.0} µs", v * 1e6),
        "s" if v < 1.0 => format!("{:.1} ms", v * 1000.0),
        "s" => format!("{v:.1} s"),
        "percentunit" => format!("{:.0} %", v * 100.0),
        "reqps" if v < 10.0 => format!("{v:.1}/s"),
        "reqps" => format!("{v:.0}/s"),
        "ops" => format!("{v:.1}/s"),
        _ if v >= 1000.0 => format!("{:.1}k", v / 1000.0),
        _ => format!("{v:.1}"),
    }
}
