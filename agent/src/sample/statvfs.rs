//! Free space of a file system, with `statvfs(3)` (Linux and macOS alike).
//!
//! One of the crate's two `unsafe` uses (the other is `gate::passwd`): one FFI call with a
//! pointer to a local buffer. The
//! workspace denies `unsafe_code`; we allow it here because `std` has no `statvfs`, and
//! the alternatives are a new dependency for one call or `sysinfo`'s disk list, which
//! statvfs's *every* mount on each refresh and has to guess which mount holds a path.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::error::{Error, Result};

/// Free and total bytes of one file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskSpace {
    /// Bytes available to unprivileged writers.
    pub free_bytes: u64,
    /// Size of the file system; always above 0.
    pub total_bytes: u64,
}

/// Validates raw `statvfs` numbers: a file system of size 0 (some pseudo file systems) or
/// with more free than total blocks says nothing trustworthy, so it is an error, not a zero.
pub fn disk_space_from(
    source_name: &'static str,
    fragment_size: u64,
    blocks: u64,
    blocks_available: u64,
) -> Result<DiskSpace> {
    let bad = |reason: String| Error::BadSample {
        source_name,
        reason,
    };
    let total_bytes = blocks
        .checked_mul(fragment_size)
        .ok_or_else(|| bad(format!("size overflows: {blocks} x {fragment_size}")))?;
    if total_bytes == 0 {
        return Err(bad("file system reports size 0".into()));
    }
    if blocks_available > blocks {
        return Err(bad(format!("{blocks_available} free of {blocks} blocks")));
    }
    Ok(DiskSpace {
        free_bytes: blocks_available * fragment_size,
        total_bytes,
    })
}

/// Reads the space of the file system holding `path`.
pub fn disk_space(source_name: &'static str, path: &Path) -> Result<DiskSpace> {
    let read_err = |source| Error::ReadSample {
        path: path.to_owned(),
        source,
    };
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| read_err(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    let mut buf = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c_path` is a valid NUL-terminated string that outlives the call, and `buf`
    // is a properly sized and aligned `statvfs` the call fills in on success.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), buf.as_mut_ptr()) };
    if rc != 0 {
        return Err(read_err(std::io::Error::last_os_error()));
    }
    // SAFETY: `statvfs` returned 0, so it initialised the whole struct.
    let st = unsafe { buf.assume_init() };
    // The field types differ between platforms (u32 on macOS, u64 on Linux); all widen.
    #[allow(clippy::useless_conversion, clippy::unnecessary_cast)]
    let (frsize, blocks, bavail) = (st.f_frsize as u64, st.f_blocks as u64, st.f_bavail as u64);
    disk_space_from(source_name, frsize, blocks, bavail)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Raw numbers convert to bytes; size 0 and more-free-than-total are errors.
    #[test]
    fn validation() {
        assert_eq!(
            disk_space_from("t", 4096, 100, 25).unwrap(),
            DiskSpace {
                free_bytes: 102_400,
                total_bytes: 409_600
            }
        );
        assert!(disk_space_from("t", 4096, 0, 0).is_err());
        assert!(disk_space_from("t", 0, 10, 0).is_err());
        assert!(disk_space_from("t", 4096, 10, 11).is_err());
        assert!(disk_space_from("t", u64::MAX, 2, 1).is_err());
    }

    /// The real call works on this machine's temporary directory and fails on a missing path.
    #[test]
    fn real_statvfs() {
        let space = disk_space("t", &std::env::temp_dir()).unwrap();
        assert!(space.total_bytes > 0 && space.free_bytes <= space.total_bytes);
        assert!(disk_space("t", Path::new("/nonexistent/really/not")).is_err());
    }
}
