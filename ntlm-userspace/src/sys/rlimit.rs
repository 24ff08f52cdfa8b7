//! Resource limits.

use std::io;

/// Raises the soft open-files limit to the hard limit (each connection holds two sockets);
/// `Ok(None)` if it already was there, else the new limit.
pub fn raise_nofile() -> io::Result<Option<u64>> {
    let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if l.rlim_cur >= l.rlim_max {
        return Ok(None);
    }
    let raised = libc::rlimit { rlim_cur: l.rlim_max, rlim_max: l.rlim_max };
    // SAFETY: valid pointer to an initialised rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Some(l.rlim_max))
}
