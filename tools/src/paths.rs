//! Default locations of the daemon's state directory and socket.
//!
//! The daemon and the CLI must agree without a config file, so both derive the socket the same way:
//! `$SHALE_SOCKET`, else `STATE_DIR/shale.sock` with `STATE_DIR` = `$SHALE_STATE_DIR`, else the system directory
//! `/var/lib/shale` when this user can use it (root, typically), else the per-user data directory
//! (`$XDG_DATA_HOME/shale` or `~/.local/share/shale`).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The system-wide state directory.
pub const SYSTEM_STATE_DIR: &str = "/var/lib/shale";
/// Socket file name inside the state directory.
pub const SOCKET_NAME: &str = "shale.sock";

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Whether this process may write `path` (checked with `access(2)`, which honours root's privileges).
fn can_write(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call; access() only reads it.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

/// Whether the system state directory is usable: it exists and is writable, or it can be created.
fn system_dir_usable() -> bool {
    let sys = Path::new(SYSTEM_STATE_DIR);
    if sys.is_dir() {
        return can_write(sys);
    }
    sys.parent().is_some_and(|p| p.is_dir() && can_write(p))
}

/// The per-user state directory.
fn user_state_dir() -> PathBuf {
    if let Some(xdg) = env_path("XDG_DATA_HOME") {
        return xdg.join("shale");
    }
    let home = env_path("HOME").unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".local/share/shale")
}

/// The daemon's default state directory.
pub fn default_state_dir() -> PathBuf {
    if let Some(d) = env_path("SHALE_STATE_DIR") {
        return d;
    }
    if system_dir_usable() {
        return PathBuf::from(SYSTEM_STATE_DIR);
    }
    user_state_dir()
}

/// The default socket for the CLI: prefer a socket that exists (a daemon is running there), then the path the
/// daemon would pick.
pub fn default_socket() -> PathBuf {
    if let Some(d) = env_path("SHALE_STATE_DIR") {
        return d.join(SOCKET_NAME);
    }
    let sys = Path::new(SYSTEM_STATE_DIR).join(SOCKET_NAME);
    let user = user_state_dir().join(SOCKET_NAME);
    if sys.exists() {
        return sys;
    }
    if user.exists() {
        return user;
    }
    default_state_dir().join(SOCKET_NAME)
}

/// Make a path absolute against the current directory (the daemon runs elsewhere), without touching the
/// filesystem.
pub fn absolute(path: &Path) -> std::io::Result<PathBuf> {
    std::path::absolute(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_paths() {
        let p = absolute(Path::new("x/y")).unwrap();
        assert!(p.is_absolute());
        assert!(p.ends_with("x/y"));
        assert!(can_write(&std::env::temp_dir()));
        assert!(!can_write(Path::new("/nonexistent/dir")));
    }
}
