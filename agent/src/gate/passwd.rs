//! Users as the system knows them, with `getpwuid_r(3)` and `getpwnam_r(3)`, so that users
//! from NSS (LDAP, systemd's dynamic users) are found as the system finds them, not only
//! those in `/etc/passwd`.
//!
//! The crate's second `unsafe` (the first is `sample::statvfs`): FFI calls writing into
//! buffers owned here. `std` has no user lookup, and a dependency for two calls is not
//! worth it.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};

/// The user name of `uid`, or `None` when the system knows no such user (or the name is
/// not UTF-8).
pub(crate) fn user_name(uid: u32) -> Option<String> {
    lookup(|pwd, buf, len, result| {
        // SAFETY: the pointers are those `lookup` documents: valid for the call.
        unsafe { libc::getpwuid_r(uid, pwd, buf, len, result) }
    })
    .map(|(_, name)| name)
}

/// The uid of the user named `name`, or `None` when the system knows no such user.
pub(crate) fn uid_of(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    lookup(|pwd, buf, len, result| {
        // SAFETY: as above, and `name` is a NUL-terminated string alive for the call.
        unsafe { libc::getpwnam_r(name.as_ptr(), pwd, buf, len, result) }
    })
    .map(|(uid, _)| uid)
}

/// Runs one `getpw*_r` call as `call(pwd, buf, buf_len, result)`, with `pwd` a properly
/// sized and aligned `passwd`, `buf` writable for `buf_len` bytes and outliving every use
/// of the pointers `pwd` gets into it, and `result` a valid out-pointer; grows the buffer
/// on `ERANGE`. The user's uid and name, if found (and the name is UTF-8).
fn lookup(
    call: impl Fn(*mut libc::passwd, *mut libc::c_char, usize, *mut *mut libc::passwd) -> i32,
) -> Option<(u32, String)> {
    let mut buf = vec![0u8; 1024];
    loop {
        let mut pwd = std::mem::MaybeUninit::<libc::passwd>::uninit();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = call(
            pwd.as_mut_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        );
        if rc == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if rc != 0 || result.is_null() {
            return None;
        }
        // SAFETY: the call succeeded and set `result` to `pwd`, whose `pw_name` points to a
        // NUL-terminated string inside `buf`, which is still alive.
        let (uid, name) = unsafe { ((*result).pw_uid, CStr::from_ptr((*result).pw_name)) };
        return name.to_str().ok().map(|n| (uid, n.to_owned()));
    }
}

#[cfg(test)]
mod tests {
    /// Root is uid 0 on every Unix, both ways, and a uid or name nobody has is no user.
    #[test]
    fn root_and_a_missing_user() {
        assert_eq!(super::user_name(0).as_deref(), Some("root"));
        assert_eq!(super::uid_of("root"), Some(0));
        assert_eq!(super::user_name(3_999_999_999), None);
        assert_eq!(super::uid_of("no-such-user-nixdispatch"), None);
        assert_eq!(super::uid_of("a\0b"), None);
    }
}
