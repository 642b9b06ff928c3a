//! The picture `just bench` draws: the latency distribution of the direct connection, nginx and
//! the activator at the same constant rate, as an SVG (plotters; no browser needed). The x axis
//! is the percentile on a log scale of 1/(1-p), so the tail (p99, p99.9) gets as much room as
//! the median, as HdrHistogram plots do; the y axis is the latency.

use plotters::prelude::*;

use super::rate::Latencies;

/// Percentiles drawn: from the fastest request to p99.99.
const NINES: f64 = 4.0;

/// An SVG of each run's latency by percentile; `title` names the rate.
pub fn latency_svg(title: &str, runs: &[(&str, &Latencies)]) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let area = SVGBackend::with_string(&mut svg, (900, 480)).into_drawing_area();
        area.fill(&WHITE)?;
        // x = log10(1 / (1 - p)): 1 is p90, 2 is p99, 3 is p99.9.
        let points = |latencies: &Latencies| -> Vec<(f64, f64)> {
            (0..=400)
                .map(|i| {
                    let x = NINES * f64::from(i) / 400.0;
                    let p = 1.0 - 10f64.powf(-x);
                    (x, latencies.percentile(p) / 1000.0)
                })
                .filter(|(_, ms)| ms.is_finite())
                .collect()
        };
        let series: Vec<(&str, Vec<(f64, f64)>)> = runs.iter().map(|(name, l)| (*name, points(l))).collect();
        let all = || series.iter().flat_map(|(_, p)| p.iter().map(|(_, ms)| *ms));
        let top = all().fold(0.1_f64, f64::max) * 1.1;
        let bottom = all().fold(top, f64::min).max(0.001) / 1.2;
        // Room right of the plot for the last tick label ("p99.99" is centred on the edge), and
        // below and left for the axis descriptions.
        let mut chart = ChartBuilder::on(&area)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .margin_right(40)
            .x_label_area_size(44)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..NINES, (bottom..top).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("latency (ms)")
            .x_label_formatter(&|x| match x.round() as i32 {
                0 => "p0".to_owned(),
                1 => "p90".to_owned(),
                2 => "p99".to_owned(),
                3 => "p99.9".to_owned(),
                4 => "p99.99".to_owned(),
                _ => String::new(),
            })
            .x_labels(5)
            .draw()?;
        let colors = [RGBColor(0x55, 0x55, 0x55), RGBColor(0x2b, 0x8a, 0x3e), RGBColor(0x1f, 0x5f, 0xd1)];
        for (i, (name, points)) in series.into_iter().enumerate() {
            let color = colors[i % colors.len()];
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 14, y)], color.stroke_width(2)));
        }
        chart.configure_series_labels().position(SeriesLabelPosition::UpperLeft).border_style(BLACK).draw()?;
        area.present()?;
    }
    Ok(svg)
}
