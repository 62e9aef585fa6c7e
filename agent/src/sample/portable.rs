//! Sampling through `sysinfo`'s portable APIs: the path used on macOS (and any Unix that is
//! not Linux). It is compiled and tested on Linux too, where `sysinfo` reads `/proc` itself.
//!
//! What `sysinfo` cannot give is absent, never zero: there is no pressure stall information
//! outside Linux, and a memory total of 0 means "unknown".

use sysinfo::{MemoryRefreshKind, ProcessRefreshKind, ProcessesToUpdate, System, UpdateKind};

use super::builds::ProcInfo;
use super::linux::LoadAvg;
use crate::error::{Error, Result};

/// Memory of the host, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// Physical memory.
    pub total_bytes: u64,
    /// Memory available for new work.
    pub available_bytes: u64,
}

/// A `sysinfo` handle, kept between samples so its process table is updated in place rather
/// than rebuilt (which keeps allocations flat across reports).
#[derive(Debug)]
pub struct Portable {
    /// `None` when `sysinfo` does not support this platform: every sample is then absent.
    sys: Option<System>,
}

impl Default for Portable {
    fn default() -> Self {
        Self {
            sys: System::new().ok(),
        }
    }
}

fn unsupported(source_name: &'static str) -> Error {
    Error::BadSample {
        source_name,
        reason: "sysinfo does not support this platform".into(),
    }
}

impl Portable {
    /// The load averages. An all-zero triple from a platform that failed to read them is
    /// indistinguishable from an idle host, so only negative or non-finite values are refused.
    pub fn load(&self) -> Result<LoadAvg> {
        let bad = |reason: String| Error::BadSample {
            source_name: "sysinfo load",
            reason,
        };
        let l = System::load_average().map_err(|e| bad(e.to_string()))?;
        for v in [l.one, l.five, l.fifteen] {
            if !v.is_finite() || v < 0.0 {
                return Err(bad(format!("out of range: {v}")));
            }
        }
        Ok(LoadAvg {
            load1: l.one,
            load5: l.five,
            load15: l.fifteen,
        })
    }

    /// Total and available memory.
    pub fn memory(&mut self) -> Result<Memory> {
        let sys = self
            .sys
            .as_mut()
            .ok_or_else(|| unsupported("sysinfo memory"))?;
        sys.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        let total_bytes = sys.total_memory();
        let available_bytes = sys.available_memory();
        if total_bytes == 0 || available_bytes > total_bytes {
            return Err(Error::BadSample {
                source_name: "sysinfo memory",
                reason: format!("available {available_bytes} of total {total_bytes}"),
            });
        }
        Ok(Memory {
            total_bytes,
            available_bytes,
        })
    }

    /// The process table, for build counting. Processes whose owner is unknown are skipped;
    /// an empty table is an error (the build count is then absent, not 0).
    pub fn processes(&mut self) -> Result<Vec<ProcInfo>> {
        let sys = self
            .sys
            .as_mut()
            .ok_or_else(|| unsupported("sysinfo processes"))?;
        sys.refresh_processes_specifics(
            ProcessesToUpdate::All,
            true,
            ProcessRefreshKind::nothing().with_user(UpdateKind::OnlyIfNotSet),
        );
        let procs: Vec<ProcInfo> = sys
            .processes()
            .values()
            .filter_map(|p| {
                Some(ProcInfo {
                    pid: p.pid().as_u32(),
                    ppid: p.parent().map_or(0, |pp| pp.as_u32()),
                    uid: **p.user_id()?,
                    comm: p.name().to_string_lossy().into_owned(),
                })
            })
            .collect();
        if procs.is_empty() {
            return Err(Error::BadSample {
                source_name: "sysinfo processes",
                reason: "no process found".into(),
            });
        }
        Ok(procs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sysinfo path gives sane load, memory and a process table including this process.
    #[test]
    fn sysinfo_path_samples() {
        let mut p = Portable::default();
        let load = p.load().unwrap();
        assert!(load.load1 >= 0.0);
        let mem = p.memory().unwrap();
        assert!(mem.total_bytes > 0 && mem.available_bytes <= mem.total_bytes);
        let me = std::process::id();
        assert!(p.processes().unwrap().iter().any(|proc| proc.pid == me));
    }
}
