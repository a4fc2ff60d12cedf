//! What a simulation run reports: the result (deterministic: a seed gives the same bytes), the
//! cost of computing it (wall time, decisions per second, memory: not deterministic), the human
//! summary and the completion-curve chart.
//!
//! The reference is the Kumar–Ross bound for the peers that stay,
//! `T_min = max(F/u_s, F/min d_i, N·F/(u_s + Σu_i))` from the nominal link rates (plus
//! `F/min(u_o, d_s)` when the seed ingests from an origin), as `d7q-bench swarm` computes it.

use std::fmt::Write as _;

use serde::Serialize;

use super::world::{Counters, Fate, Outcome, PeerRecord, Role, Sample, SimConfig};

/// Points kept of the completion curve.
const CURVE_POINTS: usize = 400;
/// Slowest peers listed in the result.
const SLOWEST: usize = 10;

/// The deterministic result of one run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SimResult {
    /// What made it.
    pub simulator: &'static str,
    pub config: SimConfig,
    /// F: all blobs together.
    pub file_bytes: u64,
    pub blobs: Vec<BlobInfo>,
    pub peers: PeerCounts,
    /// Seconds from each finished peer's join to its last blob verified.
    pub completion_s: Option<Dist>,
    pub bound: Bound,
    /// T_min over the slowest finished peer's time (the bar: 0.85).
    pub bound_over_slowest: Option<f64>,
    /// Bytes the seed sent over F (the bar: 1.5).
    pub seed_egress_over_f: f64,
    /// Bytes the origin sent over F (0 when the seed holds the content from the start).
    pub origin_egress_over_f: f64,
    /// Bytes the peers uploaded until the last completion, over what their links could carry
    /// in that time (joined peers, at their rates).
    pub peer_upload_utilization: f64,
    /// The same for the seed.
    pub seed_upload_utilization: f64,
    /// Parents each download had when it ended.
    pub parents_per_download: Option<Dist>,
    /// Lying peers every blob's swarm isolated, of those there were.
    pub liars_isolated: usize,
    pub liars: usize,
    /// Honest peers (still there) isolated by a swarm (reported by enough distinct peers).
    pub honest_isolated: usize,
    /// The slowest finished peers, slowest first (at most [`SLOWEST`]).
    pub slowest: Vec<PeerRecord>,
    pub counters: Counters,
    /// (seconds, share of peers done), at most [`CURVE_POINTS`].
    pub curve: Vec<[f64; 2]>,
    pub samples: Vec<Sample>,
    /// Virtual seconds simulated.
    pub virtual_s: f64,
}

/// One blob's geometry.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BlobInfo {
    pub bytes: u64,
    pub piece_size: u32,
    pub piece_count: u32,
}

/// How the peers ended.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PeerCounts {
    pub total: usize,
    pub done: usize,
    pub failed: usize,
    pub left: usize,
    pub died: usize,
    pub unfinished: usize,
}

/// A distribution.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Dist {
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Dist {
    /// Nearest-rank percentiles of `values`; `None` when empty.
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let q = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Some(Self {
            min: v[0],
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            max: v[v.len() - 1],
            mean: v.iter().sum::<f64>() / v.len() as f64,
        })
    }
}

/// The Kumar–Ross bound, in seconds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Bound {
    /// Peers it counts (those that neither leave nor die).
    pub peers: usize,
    /// F/u_s.
    pub seed_upload_s: f64,
    /// F/min(u_o, d_s), when there is an origin ingest.
    pub seed_inflow_s: Option<f64>,
    /// F/min d_i.
    pub slowest_download_s: f64,
    /// N·F/(u_s + Σu_i).
    pub total_upload_s: f64,
    /// The largest of them.
    pub t_min_s: f64,
    /// Which one it is.
    pub binding: &'static str,
}

impl Bound {
    /// The bound for `cfg`, with `peers` staying peers whose upload rates are `ups`.
    pub fn new(cfg: &SimConfig, ups: &[f64]) -> Self {
        let f: f64 = cfg.blobs.iter().sum::<u64>() as f64;
        let n = ups.len() as f64;
        let sum_u: f64 = ups.iter().sum();
        let mut terms = vec![
            ("F/u_s", f / cfg.seed_up),
            ("F/min d_i", f / cfg.peer_down),
            ("N·F/(u_s+Σu_i)", n * f / (cfg.seed_up + sum_u)),
        ];
        let inflow = (cfg.origin_up > 0.0).then(|| f / cfg.origin_up.min(cfg.seed_down));
        if let Some(x) = inflow {
            terms.push(("F/min(u_o,d_s)", x));
        }
        let (binding, t_min_s) =
            terms
                .iter()
                .copied()
                .fold(("", 0.0), |a, t| if t.1 > a.1 { t } else { a });
        Self {
            peers: ups.len(),
            seed_upload_s: terms[0].1,
            seed_inflow_s: inflow,
            slowest_download_s: terms[1].1,
            total_upload_s: terms[2].1,
            t_min_s,
            binding,
        }
    }

    /// The bound from the configuration alone, every peer staying at the scenario's rates.
    pub fn planned(cfg: &SimConfig) -> Self {
        let slow = match cfg.scenario {
            super::world::Scenario::SlowParent => {
                ((cfg.peers as f64 * 0.05).round() as usize).clamp(1, cfg.peers)
            }
            _ => 0,
        };
        let mut ups = vec![cfg.peer_up; cfg.peers];
        ups.iter_mut().take(slow).for_each(|u| *u /= 10.0);
        Self::new(cfg, &ups)
    }
}

/// What computing one run cost (differs from run to run).
#[derive(Clone, Debug, Serialize)]
pub struct Perf {
    pub wall_s: f64,
    /// User + system CPU time of the run (the machine may be shared: this is the cost).
    pub cpu_s: f64,
    pub decisions_per_s: f64,
    pub decisions_per_cpu_s: f64,
    pub events_per_cpu_s: f64,
    /// CPU microseconds per decision: flat in N when nothing is super-linear.
    pub cpu_us_per_decision: f64,
    /// VmHWM of this process, reset before the run where the kernel allows it.
    pub peak_rss_mib: f64,
}

impl Perf {
    /// The cost of a run that took `wall_s` (`cpu_s` of CPU) and produced `r`.
    pub fn new(r: &SimResult, wall_s: f64, cpu_s: f64, peak_rss_mib: f64) -> Self {
        let d = r.counters.decisions as f64;
        let cpu = if cpu_s > 0.0 { cpu_s } else { wall_s };
        Self {
            wall_s,
            cpu_s,
            decisions_per_s: d / wall_s.max(1e-9),
            decisions_per_cpu_s: d / cpu.max(1e-9),
            events_per_cpu_s: r.counters.events as f64 / cpu.max(1e-9),
            cpu_us_per_decision: cpu * 1e6 / d.max(1.0),
            peak_rss_mib,
        }
    }
}

/// Builds the result from a run's outcome.
pub fn result(cfg: &SimConfig, o: Outcome) -> SimResult {
    let f: u64 = cfg.blobs.iter().sum();
    let ff = f as f64;
    let count = |pred: fn(&Fate) -> bool| o.peers.iter().filter(|p| pred(&p.fate)).count();
    let times: Vec<f64> = o
        .peers
        .iter()
        .filter_map(|p| match p.fate {
            Fate::Done(t) => Some(t),
            _ => None,
        })
        .collect();
    let staying: Vec<f64> = o
        .peers
        .iter()
        .filter(|p| !matches!(p.fate, Fate::Left | Fate::Died))
        .map(|p| match p.role {
            Role::Slow => cfg.peer_up / 10.0,
            _ => cfg.peer_up,
        })
        .collect();
    let bound = Bound::new(cfg, &staying);
    let completion = Dist::of(&times);
    let last_done = o
        .peers
        .iter()
        .filter_map(|p| match p.fate {
            Fate::Done(t) => Some(p.join_s + t),
            _ => None,
        })
        .fold(0.0, f64::max);
    let horizon = if last_done > 0.0 { last_done } else { o.end_s };
    // Upload capacity of the peers while they were there, up to the horizon.
    let capacity: f64 = o
        .peers
        .iter()
        .map(|p| {
            let rate = match p.role {
                Role::Slow => cfg.peer_up / 10.0,
                _ => cfg.peer_up,
            };
            rate * (horizon - p.join_s).max(0.0)
        })
        .sum();
    let c = &o.counters;
    let parents: Vec<f64> = o
        .peers
        .iter()
        .filter(|p| matches!(p.fate, Fate::Done(_)))
        .flat_map(|p| p.parents.iter().map(|&k| k as f64))
        .collect();
    let mut slowest: Vec<PeerRecord> = o
        .peers
        .iter()
        .filter(|p| matches!(p.fate, Fate::Done(_)))
        .cloned()
        .collect();
    let done_s = |p: &PeerRecord| match p.fate {
        Fate::Done(t) => t,
        _ => 0.0,
    };
    slowest.sort_by(|a, b| done_s(b).total_cmp(&done_s(a)));
    slowest.truncate(SLOWEST);
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let total = cfg.peers.max(1) as f64;
    let step = sorted.len().div_ceil(CURVE_POINTS).max(1);
    let mut curve: Vec<[f64; 2]> = sorted
        .iter()
        .enumerate()
        .filter(|(k, _)| k % step == step - 1 || *k + 1 == sorted.len())
        .map(|(k, &t)| [t, (k + 1) as f64 / total])
        .collect();
    curve.dedup();
    SimResult {
        simulator: "d7q-bench sim",
        config: cfg.clone(),
        file_bytes: f,
        blobs: o
            .geometry
            .iter()
            .map(|g| BlobInfo {
                bytes: g.length,
                piece_size: g.piece_size,
                piece_count: g.piece_count,
            })
            .collect(),
        peers: PeerCounts {
            total: o.peers.len(),
            done: times.len(),
            failed: count(|f| matches!(f, Fate::Failed)),
            left: count(|f| matches!(f, Fate::Left)),
            died: count(|f| matches!(f, Fate::Died)),
            unfinished: count(|f| matches!(f, Fate::Unfinished)),
        },
        bound_over_slowest: completion.as_ref().map(|d| bound.t_min_s / d.max),
        completion_s: completion,
        bound,
        seed_egress_over_f: c.seed_sent_bytes as f64 / ff,
        origin_egress_over_f: c.origin_sent_bytes as f64 / ff,
        peer_upload_utilization: c.peer_sent_bytes as f64 / capacity.max(1.0),
        seed_upload_utilization: c.seed_sent_bytes as f64 / (cfg.seed_up * horizon).max(1.0),
        parents_per_download: Dist::of(&parents),
        liars_isolated: o.liars_isolated,
        liars: o.peers.iter().filter(|p| p.role == Role::Liar).count(),
        honest_isolated: o.honest_isolated,
        slowest,
        counters: o.counters,
        curve,
        samples: o.samples,
        virtual_s: o.end_s,
    }
}

/// The human summary.
pub fn summary(r: &SimResult, perf: Option<&Perf>) -> String {
    let mut s = String::new();
    let cfg = &r.config;
    let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
    let f = r.file_bytes as f64;
    let mbit = |bps: f64| bps * 8e-6;
    let _ = writeln!(
        s,
        "d7q-bench sim: {} peers, {} blob(s), {:.2} GiB ({}), {} dc(s), {:?}, seed {}",
        cfg.peers,
        r.blobs.len(),
        gib(r.file_bytes),
        r.blobs
            .iter()
            .map(|b| format!("{} × {} MiB", b.piece_count, b.piece_size >> 20))
            .collect::<Vec<_>>()
            .join(" + "),
        cfg.dcs,
        cfg.scenario,
        cfg.seed
    );
    let _ = writeln!(
        s,
        "  links: seed {:.0} Mbit/s up; peers {:.0} up / {:.0} down; rtt {:?} (wan {:?}, {:.0} Mbit/s); loss {}; goodput {}",
        mbit(cfg.seed_up),
        mbit(cfg.peer_up),
        mbit(cfg.peer_down),
        cfg.rtt,
        cfg.wan_rtt,
        mbit(cfg.wan_rate),
        cfg.loss,
        cfg.goodput
    );
    let p = &r.peers;
    let _ = writeln!(
        s,
        "  peers: {} done, {} failed, {} left, {} died, {} unfinished",
        p.done, p.failed, p.left, p.died, p.unfinished
    );
    match &r.completion_s {
        Some(d) => {
            let _ = writeln!(
                s,
                "  completion (s): min {:.1}  p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}",
                d.min, d.p50, d.p90, d.p99, d.max
            );
        }
        None => {
            let _ = writeln!(s, "  completion: nobody finished");
        }
    }
    let _ = writeln!(
        s,
        "  Kumar–Ross T_min {:.1} s ({}, N = {}); T_min / slowest {}",
        r.bound.t_min_s,
        r.bound.binding,
        r.bound.peers,
        r.bound_over_slowest
            .map_or("-".into(), |x| format!("{x:.3}"))
    );
    let c = &r.counters;
    let _ = writeln!(
        s,
        "  seed egress {:.2} F (gate: first {:.2} F, patience {:.2} F, starvation {:.2} F, overflow {:.2} F; {} busy, {} saturated); origin {:.2} F",
        r.seed_egress_over_f,
        c.seed_bytes_first as f64 / f,
        c.seed_bytes_patience as f64 / f,
        c.seed_bytes_starvation as f64 / f,
        c.seed_bytes_overflow as f64 / f,
        c.gate_busy,
        c.gate_saturated,
        r.origin_egress_over_f
    );
    let _ = writeln!(
        s,
        "  verified bytes: {:.2} GiB from the seed, {:.2} GiB from peers; wasted: {:.2} GiB duplicates, {:.2} GiB late, {:.2} GiB corrupt",
        gib(c.from_seed_bytes),
        gib(c.from_peers_bytes),
        gib(c.duplicate_bytes),
        gib(c.late_bytes),
        gib(c.corrupt_bytes)
    );
    let _ = writeln!(
        s,
        "  upload in use until the last completion: peers {:.0} %, seed {:.0} %",
        100.0 * r.peer_upload_utilization,
        100.0 * r.seed_upload_utilization
    );
    if let Some(d) = &r.parents_per_download {
        let _ = writeln!(
            s,
            "  parents per download at its end: p50 {:.0}, max {:.0}; most children on one host: {}; lists sent {} (of {} polls), {:.1} parents each",
            d.p50,
            d.max,
            c.max_children,
            c.parent_lists_sent,
            c.poll_parents,
            c.parents_named as f64 / c.parent_lists_sent.max(1) as f64
        );
    }
    let _ = writeln!(
        s,
        "  requests: {} to the seed ({} for pieces peers held), {} to peers ({} refused saturated); {} cancelled, {} timed out; {} reports, {} parents dropped; liars isolated {}/{}, honest peers isolated {}",
        c.requests_to_seed,
        c.seed_requests_held_elsewhere,
        c.requests_to_peers,
        c.refused_saturated,
        c.cancels,
        c.timeouts,
        c.reports,
        c.parents_dropped,
        r.liars_isolated,
        r.liars,
        r.honest_isolated
    );
    if let Some(t) = c.first_piece_s {
        let _ = writeln!(s, "  first piece verified at {t:.2} s");
    }
    if !c.failures.is_empty() {
        let _ = writeln!(
            s,
            "  failures (first at {:.1} s): {}",
            c.first_failure_s.unwrap_or(0.0),
            c.failures
                .iter()
                .map(|(k, v)| format!("{v} × {k:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let _ = write!(
        s,
        "  machines: {:.2} M decisions, {:.2} M calls, {:.2} M events ({:.2} M stale, queue ≤ {}) over {:.1} virtual s",
        c.decisions as f64 * 1e-6,
        c.machine_calls as f64 * 1e-6,
        c.events as f64 * 1e-6,
        c.stale_events as f64 * 1e-6,
        c.max_queue,
        r.virtual_s
    );
    if let Some(p) = perf {
        let _ = write!(
            s,
            "\n  cost: wall {:.2} s, cpu {:.2} s, {:.3} M decisions per cpu-s ({:.3} M per wall-s), {:.2} cpu-µs per decision, peak RSS {:.0} MiB",
            p.wall_s,
            p.cpu_s,
            p.decisions_per_cpu_s * 1e-6,
            p.decisions_per_s * 1e-6,
            p.cpu_us_per_decision,
            p.peak_rss_mib
        );
    }
    s
}

/// The completion curve (share of peers done against time), with the seed's and the peers'
/// upload in use and the bound, as a standalone SVG.
pub fn svg(r: &SimResult) -> String {
    let (w, h) = (800.0, 420.0);
    let (l, rt, top, bottom) = (60.0, 20.0, 30.0, 50.0);
    let (pw, ph) = (w - l - rt, h - top - bottom);
    let last = r.curve.last().map_or(0.0, |p| p[0]);
    let x_max = nice(last.max(r.bound.t_min_s).max(r.virtual_s.min(last * 1.2)) * 1.05);
    let x = |t: f64| l + pw * (t / x_max).clamp(0.0, 1.0);
    let y = |v: f64| top + ph * (1.0 - v.clamp(0.0, 1.0));
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{l}" y="18" font-size="14">{} peers, {:.2} GiB, {:?}: T_min/slowest {}, seed egress {:.2} F</text>"#,
        r.config.peers,
        r.file_bytes as f64 / f64::from(1u32 << 30),
        r.config.scenario,
        r.bound_over_slowest
            .map_or("-".into(), |v| format!("{v:.3}")),
        r.seed_egress_over_f
    );
    for k in 0..=5 {
        let t = x_max * f64::from(k) / 5.0;
        let v = f64::from(k) / 5.0;
        let _ = writeln!(
            s,
            r##"<line x1="{:.1}" y1="{top}" x2="{:.1}" y2="{:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="middle">{:.0}</text>"##,
            x(t),
            x(t),
            top + ph,
            x(t),
            top + ph + 16.0,
            t
        );
        let _ = writeln!(
            s,
            r##"<line x1="{l}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end">{:.1}</text>"##,
            y(v),
            l + pw,
            y(v),
            l - 6.0,
            y(v) + 4.0,
            v
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{l}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>"##
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">seconds since join (utilization: since t = 0)</text>"#,
        l + pw / 2.0,
        h - 12.0
    );
    let poly = |pts: &mut dyn Iterator<Item = (f64, f64)>| {
        let mut d = String::new();
        for (k, (t, v)) in pts.enumerate() {
            let _ = write!(
                d,
                "{}{:.1},{:.1}",
                if k == 0 { "M" } else { " L" },
                x(t),
                y(v)
            );
        }
        d
    };
    let util_seed = poly(&mut r.samples.iter().map(|p| (p.t, p.seed_util)));
    let util_peers = poly(&mut r.samples.iter().map(|p| (p.t, p.peer_util)));
    let mut steps = vec![(0.0, 0.0)];
    for p in &r.curve {
        steps.push((p[0], steps.last().map_or(0.0, |q| q.1)));
        steps.push((p[0], p[1]));
    }
    let done = poly(&mut steps.into_iter());
    let _ = writeln!(
        s,
        r##"<path d="{util_seed}" fill="none" stroke="#d62728" stroke-width="1" opacity="0.7"/>"##
    );
    let _ = writeln!(
        s,
        r##"<path d="{util_peers}" fill="none" stroke="#2ca02c" stroke-width="1" opacity="0.7"/>"##
    );
    let _ = writeln!(
        s,
        r##"<path d="{done}" fill="none" stroke="#1f77b4" stroke-width="2"/>"##
    );
    let bx = x(r.bound.t_min_s);
    let _ = writeln!(
        s,
        r##"<line x1="{bx:.1}" y1="{top}" x2="{bx:.1}" y2="{:.1}" stroke="#000" stroke-dasharray="5,4"/><text x="{:.1}" y="{:.1}">T_min {:.1} s</text>"##,
        top + ph,
        bx + 4.0,
        top + 14.0,
        r.bound.t_min_s
    );
    let legend = [
        ("#1f77b4", "share of peers done"),
        ("#2ca02c", "peers' upload in use"),
        ("#d62728", "seed's upload in use"),
    ];
    for (k, (color, label)) in legend.iter().enumerate() {
        let ly = top + ph - 60.0 + 18.0 * k as f64;
        let lx = l + pw - 190.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2"/><text x="{:.1}" y="{:.1}">{label}</text>"#,
            lx + 20.0,
            lx + 26.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// A round number at or above `v` (1, 2 or 5 times a power of ten).
fn nice(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|&c| c >= v)
        .unwrap_or(10.0 * p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let d = Dist::of(&v).unwrap();
        assert_eq!(
            (d.min, d.p50, d.p90, d.p99, d.max),
            (1.0, 50.0, 90.0, 99.0, 100.0)
        );
        assert_eq!(Dist::of(&[3.0]).unwrap().p99, 3.0);
        assert!(Dist::of(&[]).is_none());
        assert_eq!(nice(7.3), 10.0);
        assert_eq!(nice(180.0), 200.0);
    }
}
