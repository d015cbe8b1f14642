//! Real charging sessions from the Caltech ACN data set (`data/acn-caltech`), read from CSV or
//! gzipped CSV. They stand in for invented distributions at the very front of the flow: `evgrid
//! load --trace` replays them as charge requests into ingest → dispatcher → substation, and a
//! simulator can replay the same sessions offline.
//!
//! Only the columns `arrival`, `departure` (ISO 8601 with a UTC offset) and
//! `requested_energy (kWh)` are read; other columns are ignored. A row that cannot be used is
//! an error naming the file and line: nothing is skipped silently.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use chrono::{DateTime, FixedOffset, Utc};

/// Column holding the arrival time.
pub const ARRIVAL: &str = "arrival";
/// Column holding the departure time.
pub const DEPARTURE: &str = "departure";
/// Column holding the energy the driver asked for, in kWh.
pub const REQUESTED_ENERGY: &str = "requested_energy (kWh)";

/// One charging session: a car that arrived, asked for energy, and left.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    pub arrival: DateTime<Utc>,
    pub departure: DateTime<Utc>,
    /// What the driver asked for (kWh, ≥ 0; the data set has sessions asking for nothing).
    pub energy_kwh: f64,
}

/// Why a trace file could not be read. Every variant names the file; row errors name the line.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    // Each message says what failed here; the cause is the `source()`, printed once in the
    // chain at the edge (`{:#}`).
    #[error("cannot read {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("{}: not CSV", path.display())]
    Csv {
        path: PathBuf,
        #[source]
        error: csv::Error,
    },
    #[error("{}: no column {column:?} in the header (ACN CSV needs {ARRIVAL:?}, {DEPARTURE:?} and {REQUESTED_ENERGY:?})", path.display())]
    MissingColumn { path: PathBuf, column: &'static str },
    #[error("{}:{line}: {detail}", path.display())]
    Row {
        path: PathBuf,
        line: u64,
        detail: String,
    },
}

/// Reads every session of an ACN CSV file (`.gz` by extension: gzip), in file order.
pub fn read(path: impl AsRef<Path>) -> Result<Vec<Session>, TraceError> {
    let path = path.as_ref();
    let io = |error| TraceError::Io {
        path: path.to_owned(),
        error,
    };
    let file = File::open(path).map_err(io)?;
    let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(file)))
    } else {
        Box::new(BufReader::new(file))
    };
    parse(reader, path)
}

/// Parses ACN CSV from `reader`; `path` only names the source in errors.
pub fn parse(reader: impl Read, path: &Path) -> Result<Vec<Session>, TraceError> {
    let csv_error = |source: csv::Error| match source.kind() {
        // A gzip or read failure surfaces through csv; report it as what it is.
        csv::ErrorKind::Io(_) => match source.into_kind() {
            csv::ErrorKind::Io(error) => TraceError::Io {
                path: path.to_owned(),
                error,
            },
            _ => unreachable!("matched Io above"),
        },
        _ => TraceError::Csv {
            path: path.to_owned(),
            error: source,
        },
    };
    let mut csv = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(reader);
    let headers = csv.headers().map_err(csv_error)?.clone();
    let column = |name: &'static str| {
        headers
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| TraceError::MissingColumn {
                path: path.to_owned(),
                column: name,
            })
    };
    let (arrival, departure, energy) = (
        column(ARRIVAL)?,
        column(DEPARTURE)?,
        column(REQUESTED_ENERGY)?,
    );

    let mut sessions = Vec::new();
    let mut record = csv::StringRecord::new();
    while csv.read_record(&mut record).map_err(csv_error)? {
        let line = record.position().map_or(0, |p| p.line());
        let row_error = |detail: String| TraceError::Row {
            path: path.to_owned(),
            line,
            detail,
        };
        let field = |i: usize, name: &str| {
            record
                .get(i)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| row_error(format!("{name} is empty")))
        };
        let arrival = parse_time(field(arrival, ARRIVAL)?)
            .map_err(|e| row_error(format!("{ARRIVAL}: {e}")))?;
        let departure = parse_time(field(departure, DEPARTURE)?)
            .map_err(|e| row_error(format!("{DEPARTURE}: {e}")))?;
        let energy_text = field(energy, REQUESTED_ENERGY)?;
        let energy_kwh = match energy_text.parse::<f64>() {
            Ok(x) if x.is_finite() && x >= 0.0 => x,
            _ => {
                return Err(row_error(format!(
                    "{REQUESTED_ENERGY}: expected a number ≥ 0, got {energy_text:?}"
                )));
            }
        };
        if departure < arrival {
            return Err(row_error(format!(
                "departure {departure} is before arrival {arrival}"
            )));
        }
        sessions.push(Session {
            arrival,
            departure,
            energy_kwh,
        });
    }
    Ok(sessions)
}

/// ACN writes `2019-05-01 01:18:45-07:00`; RFC 3339 (`T`, fractional seconds) is accepted too.
fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .or_else(|_| DateTime::<FixedOffset>::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f%:z"))
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| format!("expected a time such as 2019-05-01 01:18:45-07:00, got {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const HEADER: &str = "arrival,departure,requested_energy (kWh),delivered_energy (kWh),station_id,session_id,estimated_departure,claimed\n";

    fn parse_str(text: &str) -> Result<Vec<Session>, TraceError> {
        parse(text.as_bytes(), Path::new("t.csv"))
    }

    #[test]
    fn reads_acn_rows() {
        let text = format!(
            "{HEADER}2019-05-01 01:18:45-07:00,2019-05-01 15:52:36-07:00,60.0,44.069,CA-305,x,2019-05-01 09:20:45-07:00,True\n\
             2019-05-01T06:33:14.5-07:00,2019-05-01 11:50:55-07:00,0.0,0,CA-314,y,,False\n"
        );
        let s = parse_str(&text).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].arrival.to_rfc3339(), "2019-05-01T08:18:45+00:00");
        assert_eq!(s[0].departure.to_rfc3339(), "2019-05-01T22:52:36+00:00");
        assert_eq!(s[0].energy_kwh, 60.0);
        assert_eq!(s[1].arrival.timestamp_subsec_millis(), 500);
        assert_eq!(s[1].energy_kwh, 0.0);
    }

    #[test]
    fn a_bad_row_names_file_and_line() {
        let text = format!(
            "{HEADER}2019-05-01 01:18:45-07:00,2019-05-01 15:52:36-07:00,60.0,1,a,b,c,d\n\
             2019-05-01 01:18:45-07:00,yesterday,60.0,1,a,b,c,d\n"
        );
        let err = parse_str(&text).unwrap_err().to_string();
        assert!(err.starts_with("t.csv:3: departure:"), "{err}");

        let text =
            format!("{HEADER}2019-05-01 01:18:45-07:00,2019-05-01 15:52:36-07:00,-1,1,a,b,c,d\n");
        let err = parse_str(&text).unwrap_err().to_string();
        assert!(err.starts_with("t.csv:2: requested_energy (kWh)"), "{err}");

        let text =
            format!("{HEADER}2019-05-01 01:18:45-07:00,2019-05-01 00:00:00-07:00,1,1,a,b,c,d\n");
        assert!(
            parse_str(&text)
                .unwrap_err()
                .to_string()
                .contains("before arrival")
        );

        let text = format!("{HEADER}2019-05-01 01:18:45-07:00,2019-05-01 15:52:36-07:00\n");
        assert!(matches!(
            parse_str(&text).unwrap_err(),
            TraceError::Csv { .. }
        ));
    }

    #[test]
    fn a_missing_column_is_named() {
        let err = parse_str("arrival,departure\n").unwrap_err().to_string();
        assert!(err.contains("\"requested_energy (kWh)\""), "{err}");
    }

    #[test]
    fn reads_gzip_by_extension() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.csv.gz");
        let mut gz = flate2::write::GzEncoder::new(
            File::create(&path).unwrap(),
            flate2::Compression::fast(),
        );
        writeln!(
            gz,
            "{HEADER}2019-05-01 01:18:45-07:00,2019-05-01 15:52:36-07:00,7.5,1,a,b,c,d"
        )
        .unwrap();
        gz.finish().unwrap();
        assert_eq!(read(&path).unwrap()[0].energy_kwh, 7.5);
        let missing = read(dir.path().join("nope.csv")).unwrap_err().to_string();
        assert!(missing.contains("nope.csv"), "{missing}");
    }

    #[test]
    fn reads_the_shipped_data_set() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../data/acn-caltech/2020-02_2020-05.csv.gz");
        let sessions = read(path).unwrap();
        assert_eq!(sessions.len(), 1269);
        assert!(sessions.iter().all(|s| s.departure >= s.arrival));
    }
}
