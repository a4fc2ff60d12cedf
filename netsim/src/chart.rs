//! Hand-written SVG line charts: a few series of (x, y) points on linear axes, drawn as lines or
//! as step curves (for completion over time), with a legend.
//!
//! For: the pictures netsim's scenario runner and the benchmarks write next to their JSON.
//! Not for: anything interactive or pretty beyond legible; no text measurement, no log axes.

use std::fmt::Write as _;

/// Canvas size in pixels.
const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 540.0;
/// Margins around the plot area: left (tick labels), right (legend), top (title), bottom.
const LEFT: f64 = 70.0;
const RIGHT: f64 = 230.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 55.0;
/// Ticks on each axis.
const TICKS: usize = 5;
/// Colours cycled through by the series.
const PALETTE: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];
/// Most series drawn; the legend would not fit more.
pub const MAX_SERIES: usize = 24;

/// One series.
#[derive(Debug, Clone, Default)]
pub struct Series {
    /// Its legend entry.
    pub name: String,
    /// Its points, in x order.
    pub points: Vec<(f64, f64)>,
    /// Draw as a step curve (the value holds until the next point) instead of straight lines.
    pub step: bool,
    /// Dashed line (a reference, such as an ideal).
    pub dashed: bool,
    /// Colour index into the palette; `None` picks by position.
    pub colour: Option<usize>,
}

/// A chart: title, axis labels and series.
#[derive(Debug, Clone, Default)]
pub struct Chart {
    /// Above the plot.
    pub title: String,
    /// Under the x axis.
    pub x_label: String,
    /// Beside the y axis.
    pub y_label: String,
    /// The lines.
    pub series: Vec<Series>,
    /// Force the y axis to start at zero (default: it does whenever all values are positive).
    pub y_min: Option<f64>,
    /// Force the top of the y axis.
    pub y_max: Option<f64>,
}

impl Chart {
    /// The chart as a complete SVG document.
    pub fn to_svg(&self) -> String {
        let finite = |v: &f64| v.is_finite();
        let xs: Vec<f64> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0))
            .filter(finite)
            .collect();
        let ys: Vec<f64> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .filter(finite)
            .collect();
        let (x0, x1) = range(&xs, None, None);
        let (y0, y1) = range(&ys, self.y_min, self.y_max);
        let pw = WIDTH - LEFT - RIGHT;
        let ph = HEIGHT - TOP - BOTTOM;
        let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * pw;
        let sy = |y: f64| TOP + ph - (y - y0) / (y1 - y0) * ph;

        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(
            svg,
            r#"<rect width="100%" height="100%" fill="white"/><text x="{}" y="24" font-size="16" text-anchor="middle">{}</text>"#,
            LEFT + pw / 2.0,
            escape(&self.title)
        );
        for i in 0..=TICKS {
            let f = i as f64 / TICKS as f64;
            let (x, y) = (x0 + f * (x1 - x0), y0 + f * (y1 - y0));
            let _ = writeln!(
                svg,
                r##"<line x1="{LEFT}" x2="{}" y1="{py:.1}" y2="{py:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                LEFT + pw,
                LEFT - 6.0,
                sy(y) + 4.0,
                tick(y),
                py = sy(y)
            );
            let _ = writeln!(
                svg,
                r##"<line x1="{px:.1}" x2="{px:.1}" y1="{TOP}" y2="{}" stroke="#eee"/><text x="{px:.1}" y="{}" text-anchor="middle">{}</text>"##,
                TOP + ph,
                TOP + ph + 18.0,
                tick(x),
                px = sx(x)
            );
        }
        let _ = writeln!(
            svg,
            r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
        );
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            LEFT + pw / 2.0,
            HEIGHT - 12.0,
            escape(&self.x_label)
        );
        let _ = writeln!(
            svg,
            r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{}</text>"#,
            TOP + ph / 2.0,
            TOP + ph / 2.0,
            escape(&self.y_label)
        );
        for (i, s) in self.series.iter().take(MAX_SERIES).enumerate() {
            let colour = PALETTE[s.colour.unwrap_or(i) % PALETTE.len()];
            let dash = if s.dashed {
                r#" stroke-dasharray="6 4""#
            } else {
                ""
            };
            let mut path = String::new();
            let mut last: Option<(f64, f64)> = None;
            for &(x, y) in s
                .points
                .iter()
                .filter(|p| p.0.is_finite() && p.1.is_finite())
            {
                let (px, py) = (sx(x), sy(y));
                match last {
                    None => {
                        let _ = write!(path, "M{px:.1},{py:.1}");
                    }
                    Some((_, ly)) if s.step => {
                        let _ = write!(path, " L{px:.1},{ly:.1} L{px:.1},{py:.1}");
                    }
                    Some(_) => {
                        let _ = write!(path, " L{px:.1},{py:.1}");
                    }
                }
                last = Some((px, py));
                if !s.step {
                    let _ = write!(
                        svg,
                        r#"<circle cx="{px:.1}" cy="{py:.1}" r="3" fill="{colour}"/>"#
                    );
                }
            }
            let _ = writeln!(
                svg,
                r#"<path d="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>"#
            );
            let ly = TOP + 10.0 + 18.0 * i as f64;
            let lx = WIDTH - RIGHT + 15.0;
            let _ = writeln!(
                svg,
                r#"<line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="{colour}" stroke-width="2"{dash}/><text x="{}" y="{}">{}</text>"#,
                lx + 24.0,
                lx + 30.0,
                ly + 4.0,
                escape(&s.name)
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}

/// The axis range: the data's, widened to include `min`/`max` when given and zero when all
/// values are positive, and never empty.
fn range(values: &[f64], min: Option<f64>, max: Option<f64>) -> (f64, f64) {
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (mut lo, mut hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    if lo > 0.0 {
        lo = 0.0;
    }
    if let Some(m) = min {
        lo = m;
    }
    if let Some(m) = max {
        hi = m;
    } else {
        hi += (hi - lo) * 0.05;
    }
    if hi <= lo {
        hi = lo + 1.0;
    }
    (lo, hi)
}

fn tick(v: f64) -> String {
    if v.abs() >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_every_series_with_its_legend_and_escapes_text() {
        let chart = Chart {
            title: "a < b".into(),
            x_label: "s".into(),
            y_label: "done".into(),
            series: vec![
                Series {
                    name: "n1".into(),
                    points: vec![(0.0, 0.0), (1.0, 1.0), (2.0, 2.0)],
                    step: true,
                    ..Series::default()
                },
                Series {
                    name: "ideal & more".into(),
                    points: vec![(0.0, 1.0), (2.0, f64::NAN)],
                    dashed: true,
                    ..Series::default()
                },
            ],
            ..Chart::default()
        };
        let svg = chart.to_svg();
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("<path").count(), 2);
        assert!(svg.contains("a &lt; b") && svg.contains("ideal &amp; more"));
        assert!(svg.contains("stroke-dasharray"));
        assert!(!svg.contains("NaN"));
    }

    #[test]
    fn an_empty_chart_is_still_a_document() {
        let svg = Chart::default().to_svg();
        assert!(svg.contains("</svg>") && !svg.contains("NaN") && !svg.contains("inf"));
    }
}
