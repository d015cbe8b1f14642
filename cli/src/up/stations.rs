//! `evgrid up --chargers ocpp`: each substation is the CSMS of simulated charging stations
//! (docs/ocpp.md), run in this process by `evgrid_ocpp::simulator` (what `evgrid stations`
//! runs). The stations and their passwords are made once per substation and kept in the
//! credentials directory, like the NATS users'.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use evgrid_ocpp::simulator::SimConfig;

use crate::credentials::write_private;

/// Meter reports of the simulated stations, real time: at the default time scale (3600) a
/// quarter of a simulated hour between readings, fine enough for cars of 5 to 30 kWh.
const METER_INTERVAL: Duration = Duration::from_millis(250);

/// The stations of one substation: their file, ids and passwords.
pub(super) struct Fleet {
    pub file: PathBuf,
    pub stations: Vec<(String, String)>,
}

/// The stations file of substation `id` in `dir`: `count` stations `<id>-st-NN`, each with a
/// random password, kept across runs (a larger `count` adds stations, a smaller one uses the
/// first of them).
pub(super) fn fleet(dir: &Path, id: &str, count: u16) -> Result<Fleet> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let file = dir.join(format!("ocpp-stations-{id}"));
    let mut stations: Vec<(String, String)> = match std::fs::read_to_string(&file) {
        Ok(text) => crate::stations::parse_stations(&text)
            .map_err(|(line, why)| anyhow::anyhow!("{} line {line}: {why}", file.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", file.display())),
    };
    let known = stations.len();
    for n in known + 1..=usize::from(count) {
        // 32 hex characters: within OCPP's 16 to 40.
        let password = uuid::Uuid::new_v4().simple().to_string();
        stations.push((format!("{id}-st-{n:02}"), password));
    }
    if stations.len() != known {
        let lines: String = stations.iter().map(|(s, p)| format!("{s}:{p}\n")).collect();
        write_private(&file, &lines)?;
    }
    stations.truncate(usize::from(count));
    let file = if known <= usize::from(count) {
        file
    } else {
        // Fewer than stored: the substation must know these only.
        let subset = dir.join(format!("ocpp-stations-{id}-first-{count}"));
        let lines: String = stations.iter().map(|(s, p)| format!("{s}:{p}\n")).collect();
        write_private(&subset, &lines)?;
        subset
    };
    Ok(Fleet { file, stations })
}

/// The simulated stations of one substation, at `url` (`ws://…/ocpp`): cars come for the
/// connectors the substation reserves for dispatched requests.
pub(super) fn simulation(url: String, fleet: &Fleet, time_scale: f64) -> SimConfig {
    SimConfig {
        time_scale,
        meter_interval: METER_INTERVAL,
        ..SimConfig::new(url, fleet.stations.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stations_are_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = fleet(dir.path(), "substation-1", 3).unwrap();
        assert_eq!(first.stations.len(), 3);
        assert_eq!(first.stations[2].0, "substation-1-st-03");
        let again = fleet(dir.path(), "substation-1", 3).unwrap();
        assert_eq!(again.stations, first.stations);
        let more = fleet(dir.path(), "substation-1", 4).unwrap();
        assert_eq!(more.stations[..3], first.stations[..]);
        let fewer = fleet(dir.path(), "substation-1", 2).unwrap();
        assert_eq!(fewer.stations[..], first.stations[..2]);
        let allowed = evgrid_ocpp::stations::Stations::read(&fewer.file).unwrap();
        assert!(allowed.knows("substation-1-st-02") && !allowed.knows("substation-1-st-03"));
    }
}
