//! The exact upper bound of the energy any allocation could deliver on the pooled grid (all the
//! capacity on one bus), so a report states its distance to the true optimum and not only to
//! the pooled run of one allocation.
//!
//! Between two consecutive arrivals or departures the set of cars present is fixed, so the
//! continuous problem is exactly a maximum flow: source → car (its energy), car → each time slot
//! within its stay (its max power × the slot's length), slot → sink (the capacity × the
//! slot's length). Any schedule is such a flow, and any flow is a schedule (within a slot every
//! car draws its share of the slot's energy at a constant power). Cars whose stays do not
//! overlap in time never compete, so each group of overlapping stays is solved on its own.

use evgrid_model::SECONDS_PER_HOUR;

use crate::workload::Request;

/// Flow below this (kWh) is rounding, not an augmenting path.
const FLOW_EPSILON: f64 = 1e-9;

/// The most energy (kWh) one bus of `capacity_kw` can deliver to `requests`, each car present
/// from its request to its departure (for ever without one) and drawing at most its max power.
pub fn energy_upper_bound_kwh(requests: &[Request], capacity_kw: f64) -> f64 {
    let mut cars: Vec<(f64, f64, &Request)> = requests
        .iter()
        .filter(|r| r.energy_kwh > 0.0 && r.max_power_kw > 0.0)
        .map(|r| (r.at, r.departure.unwrap_or(f64::INFINITY), r))
        .filter(|&(a, d, _)| d > a)
        .collect();
    cars.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut total = 0.0;
    let mut start = 0;
    let mut reach = f64::NEG_INFINITY;
    for i in 0..cars.len() {
        if cars[i].0 >= reach && i > start {
            total += group_bound(&cars[start..i], capacity_kw);
            start = i;
        }
        reach = reach.max(cars[i].1);
    }
    if start < cars.len() {
        total += group_bound(&cars[start..], capacity_kw);
    }
    total
}

/// The max flow of one group of cars whose stays chain into one another.
fn group_bound(cars: &[(f64, f64, &Request)], capacity_kw: f64) -> f64 {
    let mut times: Vec<f64> = cars.iter().flat_map(|&(a, d, _)| [a, d]).collect();
    times.sort_by(f64::total_cmp);
    times.dedup();
    let slots = times.len() - 1;
    // Nodes: source, cars, slots, sink.
    let (source, sink) = (0, 1 + cars.len() + slots);
    let mut graph = FlowGraph::new(sink + 1);
    let hours = |s: usize| (times[s + 1] - times[s]) / SECONDS_PER_HOUR;
    for s in 0..slots {
        graph.add_edge(1 + cars.len() + s, sink, capacity_kw * hours(s));
    }
    for (c, &(a, d, r)) in cars.iter().enumerate() {
        graph.add_edge(source, 1 + c, r.energy_kwh);
        let first = times.partition_point(|&t| t < a);
        let end = times.partition_point(|&t| t < d);
        for s in first..end {
            graph.add_edge(1 + c, 1 + cars.len() + s, r.max_power_kw * hours(s));
        }
    }
    graph.max_flow(source, sink)
}

/// A flow network with real capacities, solved by Dinic's algorithm (BFS levels, then blocking
/// flows by DFS with a per-node edge cursor).
#[derive(Debug, Clone)]
pub struct FlowGraph {
    /// Edges in pairs: edge `e` and its reverse `e ^ 1`.
    to: Vec<u32>,
    cap: Vec<f64>,
    /// The edges leaving each node, as indices into `to`/`cap`.
    adjacency: Vec<Vec<u32>>,
}

impl FlowGraph {
    pub fn new(nodes: usize) -> Self {
        Self {
            to: Vec::new(),
            cap: Vec::new(),
            adjacency: vec![Vec::new(); nodes],
        }
    }

    /// An edge `from` → `to` of capacity `cap` (infinite allowed; ≤ 0 adds nothing).
    pub fn add_edge(&mut self, from: usize, to: usize, cap: f64) {
        if cap.is_nan() || cap <= 0.0 {
            return;
        }
        let e = self.to.len() as u32;
        self.to.extend([to as u32, from as u32]);
        self.cap.extend([cap, 0.0]);
        self.adjacency[from].push(e);
        self.adjacency[to].push(e + 1);
    }

    /// The value of a maximum flow from `source` to `sink` (consumes the capacities).
    pub fn max_flow(&mut self, source: usize, sink: usize) -> f64 {
        let n = self.adjacency.len();
        let mut level = vec![u32::MAX; n];
        let mut cursor = vec![0_usize; n];
        let mut queue = Vec::with_capacity(n);
        let mut total = 0.0;
        loop {
            level.fill(u32::MAX);
            level[source] = 0;
            queue.clear();
            queue.push(source);
            let mut head = 0;
            while head < queue.len() {
                let v = queue[head];
                head += 1;
                for &e in &self.adjacency[v] {
                    let w = self.to[e as usize] as usize;
                    if self.cap[e as usize] > FLOW_EPSILON && level[w] == u32::MAX {
                        level[w] = level[v] + 1;
                        queue.push(w);
                    }
                }
            }
            if level[sink] == u32::MAX {
                return total;
            }
            cursor.fill(0);
            loop {
                let pushed = self.augment(source, sink, f64::INFINITY, &level, &mut cursor);
                if pushed <= FLOW_EPSILON {
                    break;
                }
                total += pushed;
            }
        }
    }

    /// One augmenting path of at most `limit` along increasing levels, iteratively (the paths of
    /// a long chain of slots would overflow a recursive stack).
    fn augment(
        &mut self,
        source: usize,
        sink: usize,
        limit: f64,
        level: &[u32],
        cursor: &mut [usize],
    ) -> f64 {
        let mut path: Vec<u32> = Vec::new();
        let mut v = source;
        loop {
            if v == sink {
                let pushed = path
                    .iter()
                    .map(|&e| self.cap[e as usize])
                    .fold(limit, f64::min);
                for &e in &path {
                    self.cap[e as usize] -= pushed;
                    self.cap[(e ^ 1) as usize] += pushed;
                }
                return pushed;
            }
            let mut advanced = false;
            while cursor[v] < self.adjacency[v].len() {
                let e = self.adjacency[v][cursor[v]];
                let w = self.to[e as usize] as usize;
                if self.cap[e as usize] > FLOW_EPSILON && level[w] == level[v] + 1 {
                    path.push(e);
                    v = w;
                    advanced = true;
                    break;
                }
                cursor[v] += 1;
            }
            if !advanced {
                // Dead end: never try it again in this phase, and step back.
                let Some(e) = path.pop() else { return 0.0 };
                let back = self.to[(e ^ 1) as usize] as usize;
                cursor[back] += 1;
                v = back;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn car(at_h: f64, departure_h: Option<f64>, energy_kwh: f64, max_power_kw: f64) -> Request {
        Request {
            at: at_h * 3600.0,
            energy_kwh,
            max_power_kw,
            departure: departure_h.map(|h| h * 3600.0),
        }
    }

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }

    #[test]
    fn dinic_finds_the_textbook_max_flow() {
        // CLRS figure 26.1: max flow 23.
        let mut g = FlowGraph::new(6);
        for (a, b, c) in [
            (0, 1, 16.0),
            (0, 2, 13.0),
            (2, 1, 4.0),
            (1, 3, 12.0),
            (3, 2, 9.0),
            (2, 4, 14.0),
            (4, 3, 7.0),
            (3, 5, 20.0),
            (4, 5, 4.0),
        ] {
            g.add_edge(a, b, c);
        }
        close(g.max_flow(0, 5), 23.0);
        // Nothing reaches the sink.
        let mut g = FlowGraph::new(3);
        g.add_edge(0, 1, 5.0);
        close(g.max_flow(0, 2), 0.0);
    }

    #[test]
    fn one_car_gets_the_least_of_its_energy_its_power_and_the_capacity() {
        close(
            energy_upper_bound_kwh(&[car(0.0, Some(2.0), 10.0, 7.0)], 100.0),
            10.0,
        );
        // 2 h at 7 kW.
        close(
            energy_upper_bound_kwh(&[car(0.0, Some(2.0), 30.0, 7.0)], 100.0),
            14.0,
        );
        // 2 h at 3 kW of capacity.
        close(
            energy_upper_bound_kwh(&[car(0.0, Some(2.0), 30.0, 7.0)], 3.0),
            6.0,
        );
        // No departure: all of it, however small the capacity.
        close(
            energy_upper_bound_kwh(&[car(0.0, None, 30.0, 7.0)], 1.0),
            30.0,
        );
        close(energy_upper_bound_kwh(&[], 1.0), 0.0);
    }

    #[test]
    fn a_car_with_slack_yields_to_one_leaving_soon() {
        // 10 kW. A: 0–1 h, 10 kWh at 10 kW. B: 0–3 h, 20 kWh at 10 kW. Serving B first would
        // lose A; the optimum is A in the first hour, B in the next two: 30 kWh.
        let cars = [
            car(0.0, Some(1.0), 10.0, 10.0),
            car(0.0, Some(3.0), 20.0, 10.0),
        ];
        close(energy_upper_bound_kwh(&cars, 10.0), 30.0);
        // B at 5 kW can take only 15 kWh in its 3 h: 25 kWh, the capacity never binding.
        let cars = [
            car(0.0, Some(1.0), 10.0, 10.0),
            car(0.0, Some(3.0), 20.0, 5.0),
        ];
        close(energy_upper_bound_kwh(&cars, 25.0), 25.0);
    }

    #[test]
    fn overlapping_stays_share_the_capacity_and_separate_ones_do_not() {
        // Three cars of 10 kW over 0–2 h wanting 20 kWh each, 15 kW: 30 kWh at most.
        let cars = [
            car(0.0, Some(2.0), 20.0, 10.0),
            car(0.0, Some(2.0), 20.0, 10.0),
            car(0.0, Some(2.0), 20.0, 10.0),
        ];
        close(energy_upper_bound_kwh(&cars, 15.0), 30.0);
        // The same again from 5 h (a separate group): twice as much.
        let mut twice = cars.to_vec();
        twice.extend(cars.iter().map(|c| Request {
            at: c.at + 5.0 * 3600.0,
            departure: c.departure.map(|d| d + 5.0 * 3600.0),
            ..*c
        }));
        close(energy_upper_bound_kwh(&twice, 15.0), 60.0);
        // Staggered: A 0–2 h, B 1–3 h, 10 kW cars wanting 20 kWh, 10 kW capacity: 0–1 h A,
        // 1–2 h shared, 2–3 h B; at most 30 kWh.
        let cars = [
            car(0.0, Some(2.0), 20.0, 10.0),
            car(1.0, Some(3.0), 20.0, 10.0),
        ];
        close(energy_upper_bound_kwh(&cars, 10.0), 30.0);
    }
}
