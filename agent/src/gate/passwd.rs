//! A uid's user name, with `getpwuid_r(3)`, so that users from NSS (LDAP, systemd's
//! dynamic users) are found as the system finds them, not only those in `/etc/passwd`.
//!
//! The crate's second `unsafe` (the first is `sample::statvfs`): one FFI call writing into
//! buffers owned here. `std` has no user lookup, and a dependency for one call is not worth
//! it.
#![allow(unsafe_code)]

use std::ffi::CStr;

/// The user name of `uid`, or `None` when the system knows no such user (or the name is
/// not UTF-8).
pub(crate) fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0u8; 1024];
    loop {
        let mut pwd = std::mem::MaybeUninit::<libc::passwd>::uninit();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: `pwd` is a properly sized and aligned `passwd`, `buf` is writable for
        // `buf.len()` bytes and outlives every use of the pointers `pwd` holds into it, and
        // `result` is a valid out-pointer.
        let rc = unsafe {
            libc::getpwuid_r(
                uid,
                pwd.as_mut_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if rc != 0 || result.is_null() {
            return None;
        }
        // SAFETY: the call succeeded and set `result` to `pwd`, whose `pw_name` points to a
        // NUL-terminated string inside `buf`, which is still alive.
        let name = unsafe { CStr::from_ptr((*result).pw_name) };
        return name.to_str().ok().map(str::to_owned);
    }
}

#[cfg(test)]
mod tests {
    /// Root is uid 0 on every Unix, and a uid nobody has is no user.
    #[test]
    fn root_and_a_missing_uid() {
        assert_eq!(super::user_name(0).as_deref(), Some("root"));
        assert_eq!(super::user_name(3_999_999_999), None);
    }
}
