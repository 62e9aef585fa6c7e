//! Pure parsers of the Linux `/proc` files the agent samples.
//!
//! Every function takes the file's text and returns either a fully valid value or an
//! [`Error::BadSample`]: a truncated, garbage or out-of-range file never turns into a zero
//! (a bogus zero load would make a busy host look idle and attract work). The I/O that reads
//! the files lives in [`super`], so these are tested on captured fixtures.

use crate::error::{Error, Result};

/// Load averages over 1, 5 and 15 minutes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadAvg {
    /// Over 1 minute.
    pub load1: f64,
    /// Over 5 minutes.
    pub load5: f64,
    /// Over 15 minutes.
    pub load15: f64,
}

/// The `avg10` values of one `/proc/pressure/*` file, in percent.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PressureAvg10 {
    /// The `some` line; absent when the file has none.
    pub some: Option<f64>,
    /// The `full` line; absent when the file has none (older kernels' `cpu`).
    pub full: Option<f64>,
}

/// The fields of `/proc/meminfo` the agent uses, in bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemInfo {
    /// `MemTotal`.
    pub total_bytes: u64,
    /// `MemAvailable`; absent on kernels older than 3.14, which do not estimate it (the agent
    /// does not guess it from `MemFree`, which undercounts reclaimable cache).
    pub available_bytes: Option<u64>,
}

/// One process as `/proc/<pid>/stat` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatLine {
    /// The process id.
    pub pid: u32,
    /// The command name (`comm`, at most 15 bytes, the basename of the executed file).
    pub comm: String,
    /// The parent's process id (0 for the kernel's roots).
    pub ppid: u32,
}

fn bad(source_name: &'static str, reason: impl Into<String>) -> Error {
    Error::BadSample {
        source_name,
        reason: reason.into(),
    }
}

/// Parses a non-negative finite number.
fn non_negative(source_name: &'static str, field: &str, text: &str) -> Result<f64> {
    let value: f64 = text
        .parse()
        .map_err(|_| bad(source_name, format!("{field} is not a number: {text:?}")))?;
    if !value.is_finite() || value < 0.0 {
        return Err(bad(source_name, format!("{field} out of range: {value}")));
    }
    Ok(value)
}

/// Parses `/proc/loadavg`: `0.70 0.48 0.19 1/81 6835`.
///
/// Only the first three fields are required; the rest may be missing.
pub fn parse_loadavg(text: &str) -> Result<LoadAvg> {
    const SRC: &str = "/proc/loadavg";
    let mut fields = text.split_ascii_whitespace();
    let mut next = |name: &str| -> Result<f64> {
        let field = fields
            .next()
            .ok_or_else(|| bad(SRC, format!("{name} is missing")))?;
        non_negative(SRC, name, field)
    };
    Ok(LoadAvg {
        load1: next("load1")?,
        load5: next("load5")?,
        load15: next("load15")?,
    })
}

/// Parses one `/proc/pressure/{cpu,memory,io}` file:
///
/// ```text
/// some avg10=0.09 avg60=2.65 avg300=2.24 total=15653354
/// full avg10=0.00 avg60=0.00 avg300=0.00 total=0
/// ```
///
/// A line whose `avg10` is missing or not a percentage is an error; a file with neither line
/// is an error too (an empty read is not "no pressure").
pub fn parse_pressure(source_name: &'static str, text: &str) -> Result<PressureAvg10> {
    let mut out = PressureAvg10::default();
    for line in text.lines() {
        let mut fields = line.split_ascii_whitespace();
        let slot = match fields.next() {
            Some("some") => &mut out.some,
            Some("full") => &mut out.full,
            Some(other) => return Err(bad(source_name, format!("unknown line kind {other:?}"))),
            None => continue,
        };
        let avg10 = fields
            .find_map(|f| f.strip_prefix("avg10="))
            .ok_or_else(|| bad(source_name, "a line has no avg10"))?;
        let value = non_negative(source_name, "avg10", avg10)?;
        if value > 100.0 {
            return Err(bad(source_name, format!("avg10 above 100%: {value}")));
        }
        *slot = Some(value);
    }
    if out.some.is_none() && out.full.is_none() {
        return Err(bad(source_name, "no `some` or `full` line"));
    }
    Ok(out)
}

/// Parses `/proc/meminfo` (`MemTotal:  24684084 kB` lines).
///
/// `MemTotal` is required and must be above 0. A line that is present but malformed is an
/// error rather than skipped, because a file that is garbage in one place cannot be trusted
/// in another.
pub fn parse_meminfo(text: &str) -> Result<MemInfo> {
    const SRC: &str = "/proc/meminfo";
    let mut total = None;
    let mut available = None;
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            if line.trim().is_empty() {
                continue;
            }
            return Err(bad(SRC, format!("line without a colon: {line:?}")));
        };
        let slot = match key {
            "MemTotal" => &mut total,
            "MemAvailable" => &mut available,
            _ => continue,
        };
        let mut fields = rest.split_ascii_whitespace();
        let number = fields
            .next()
            .ok_or_else(|| bad(SRC, format!("{key} has no value")))?;
        let kib: u64 = number
            .parse()
            .map_err(|_| bad(SRC, format!("{key} is not a number: {number:?}")))?;
        // The kernel always prints "kB" (meaning KiB); a line cut before the unit is truncated.
        if fields.next() != Some("kB") {
            return Err(bad(SRC, format!("{key} has no kB unit")));
        }
        let bytes = kib
            .checked_mul(1024)
            .ok_or_else(|| bad(SRC, format!("{key} overflows: {kib} kB")))?;
        *slot = Some(bytes);
    }
    let total_bytes = total.ok_or_else(|| bad(SRC, "MemTotal is missing"))?;
    if total_bytes == 0 {
        return Err(bad(SRC, "MemTotal is 0"));
    }
    if let Some(available) = available
        && available > total_bytes
    {
        return Err(bad(SRC, "MemAvailable exceeds MemTotal"));
    }
    Ok(MemInfo {
        total_bytes,
        available_bytes: available,
    })
}

/// Parses `/proc/<pid>/stat`: `7411 (cat) R 7395 ...`.
///
/// The command name may itself contain spaces and parentheses, so it spans from the first
/// `(` to the **last** `)`; the state and the parent pid follow it.
pub fn parse_stat(text: &str) -> Result<StatLine> {
    const SRC: &str = "/proc/<pid>/stat";
    let open = text.find('(').ok_or_else(|| bad(SRC, "no `(`"))?;
    let close = text.rfind(')').ok_or_else(|| bad(SRC, "no `)`"))?;
    if close < open {
        return Err(bad(SRC, "`)` before `(`"));
    }
    let pid = text[..open]
        .trim()
        .parse()
        .map_err(|_| bad(SRC, format!("bad pid {:?}", &text[..open])))?;
    let comm = text[open + 1..close].to_owned();
    let mut rest = text[close + 1..].split_ascii_whitespace();
    let _state = rest.next().ok_or_else(|| bad(SRC, "state is missing"))?;
    let ppid = rest
        .next()
        .ok_or_else(|| bad(SRC, "ppid is missing"))?
        .parse()
        .map_err(|_| bad(SRC, "ppid is not a number"))?;
    Ok(StatLine { pid, comm, ppid })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOADAVG: &str = include_str!("../../tests/fixtures/linux/loadavg");
    const MEMINFO: &str = include_str!("../../tests/fixtures/linux/meminfo");
    const PSI_CPU: &str = include_str!("../../tests/fixtures/linux/pressure-cpu");
    const PSI_MEMORY: &str = include_str!("../../tests/fixtures/linux/pressure-memory");
    const PSI_IO: &str = include_str!("../../tests/fixtures/linux/pressure-io");
    const SNAPSHOT: &str = include_str!("../../tests/fixtures/linux/proc-snapshot");

    /// A real `/proc/loadavg` capture parses to its three averages.
    #[test]
    fn loadavg_real_capture() {
        let load = parse_loadavg(LOADAVG).unwrap();
        assert_eq!(
            load,
            LoadAvg {
                load1: 0.17,
                load5: 0.36,
                load15: 0.18
            }
        );
    }

    /// Truncated, empty, garbage and negative `/proc/loadavg` contents are errors, not zeros.
    #[test]
    fn loadavg_bad_inputs_are_errors() {
        for text in [
            "",
            "\n",
            "0.70 0.48",
            "0.70 0.48 abc 1/81 1",
            "-1 0 0",
            "NaN 0 0",
            "inf 1 1",
        ] {
            assert!(parse_loadavg(text).is_err(), "{text:?} should be rejected");
        }
        // A cut after the third field is still complete.
        assert!(parse_loadavg("1 2 3").is_ok());
    }

    /// Real captures of the three PSI files parse to their `avg10` values.
    #[test]
    fn pressure_real_captures() {
        let cpu = parse_pressure("cpu", PSI_CPU).unwrap();
        assert_eq!(
            cpu,
            PressureAvg10 {
                some: Some(0.08),
                full: Some(0.0)
            }
        );
        let memory = parse_pressure("memory", PSI_MEMORY).unwrap();
        assert_eq!(
            memory,
            PressureAvg10 {
                some: Some(0.0),
                full: Some(0.0)
            }
        );
        let io = parse_pressure("io", PSI_IO).unwrap();
        assert_eq!(
            io,
            PressureAvg10 {
                some: Some(1.0),
                full: Some(1.0)
            }
        );
    }

    /// An old kernel's `cpu` file without a `full` line leaves `full` absent rather than 0.
    #[test]
    fn pressure_without_full_line_is_absent() {
        let cpu =
            parse_pressure("cpu", "some avg10=1.50 avg60=0.00 avg300=0.00 total=9\n").unwrap();
        assert_eq!(
            cpu,
            PressureAvg10 {
                some: Some(1.5),
                full: None
            }
        );
    }

    /// Empty, truncated, garbage and out-of-range PSI files are errors.
    #[test]
    fn pressure_bad_inputs_are_errors() {
        for text in [
            "",
            "some",
            "some avg60=1.0",
            "some avg10=",
            "some avg10=abc avg60=0",
            "some avg10=101.0",
            "some avg10=-1",
            "weird avg10=1.0",
            "\u{0}\u{0}\u{0}",
        ] {
            assert!(
                parse_pressure("t", text).is_err(),
                "{text:?} should be rejected"
            );
        }
    }

    /// A real `/proc/meminfo` capture gives total and available memory in bytes.
    #[test]
    fn meminfo_real_capture() {
        let info = parse_meminfo(MEMINFO).unwrap();
        assert_eq!(info.total_bytes, 24_684_084 * 1024);
        assert_eq!(info.available_bytes, Some(24_296_248 * 1024));
    }

    /// A kernel without `MemAvailable` leaves it absent; it is not guessed.
    #[test]
    fn meminfo_without_available() {
        let info = parse_meminfo("MemTotal: 1000 kB\nMemFree: 10 kB\n").unwrap();
        assert_eq!(
            info,
            MemInfo {
                total_bytes: 1_024_000,
                available_bytes: None
            }
        );
    }

    /// Truncated and garbage `/proc/meminfo` contents are errors.
    #[test]
    fn meminfo_bad_inputs_are_errors() {
        let truncated = &MEMINFO[..20]; // "MemTotal:       2468"
        for text in [
            "",
            truncated,
            "MemFree: 10 kB\n",
            "MemTotal: abc kB\n",
            "MemTotal: 0 kB\n",
            "MemTotal: 10 kB\nMemAvailable: 20 kB\n",
            "MemTotal: 99999999999999999999 kB\n",
            "garbage\n",
        ] {
            assert!(parse_meminfo(text).is_err(), "{text:?} should be rejected");
        }
    }

    /// Every line of a real process snapshot parses, including comms with spaces and `)`.
    #[test]
    fn stat_real_snapshot_and_odd_comms() {
        for line in SNAPSHOT.lines() {
            let (_uid, stat) = line.split_once(' ').unwrap();
            parse_stat(stat).unwrap();
        }
        let odd = parse_stat("42 (a b) c)) S 7 42 0").unwrap();
        assert_eq!(
            odd,
            StatLine {
                pid: 42,
                comm: "a b) c)".into(),
                ppid: 7
            }
        );
        for text in ["", "42", "42 (x", "42 (x) S", "42 (x) S y", "x (y) S 1"] {
            assert!(parse_stat(text).is_err(), "{text:?} should be rejected");
        }
    }
}
